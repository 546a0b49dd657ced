"""Training stages end to end on the tiny digits config: sharding, resumption, bad input.

All runs use `experiments/digits.py:variant=tiny`; the 1-device runs share compiled steps through
the persistent compilation cache.
"""
import hashlib
import os

import jax
import numpy as np
import pytest

from scm_jax import checkpoint as ckpt
from scm_jax import stage_identity, stage_restore
from scm_jax import main as entry
from scm_jax import objectives, train
from scm_jax.errors import ConfigError
from tests.helpers import load_experiment

STAGES = ("teacher", "scd", "sct", "dscd", "vsd", "scd_vsd")


def tiny_config(**overrides):
    config = load_experiment("digits", "variant=tiny")
    for name in STAGES:
        config[name].steps = 2
        config[name].log_every = 1
        config[name].checkpoint_every = 1
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        target = config
        for part in filter(None, section.split(".")):
            target = target[part]
        target[leaf] = value
    return config


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 2-step tiny teacher shared by the distillation tests."""
    workdir = str(tmp_path_factory.mktemp("teacher_run"))
    train.train_stage(tiny_config(**{"mesh.data": 1}), "teacher", workdir, log=_quiet)
    return os.path.join(workdir, "teacher")


def _params(state):
    return jax.tree.leaves(jax.device_get({n: net.params for n, net in state.nets.items()}))


# One diffusion and one distillation step; sCT and dsCD build theirs with the same base step
# (objectives/base.py), sharded by the same code.
@pytest.mark.slow
@pytest.mark.parametrize("name", ("teacher", "scd"))
def test_step_on_8_devices_equals_single_device(name, teacher_dir, tmp_path):
    assert len(jax.devices()) == 8
    results = []
    for devices in (1, 8):
        config = tiny_config(**{"mesh.data": devices})
        config[name].steps = 1
        if name != "teacher":
            config.teacher.checkpoint_dir = teacher_dir
            # Full tangent from step 0 (r = 1), and an Adam eps that keeps gradients at rounding
            # level (the student starts equal to its teacher) from becoming lr-sized steps.
            config[name].loss.warmup_steps = 0
            config[name].optimizer.eps = 1e-3
        state = train.train_stage(config, name, str(tmp_path / f"d{devices}"), log=_quiet)
        results.append(_params(state))
    for one, eight in zip(*results):
        np.testing.assert_allclose(one, eight, rtol=2e-5, atol=1e-6)


def _tree_digest(directory):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(teacher_dir, tmp_path, monkeypatch):
    # aVSD: the stage with the most state (five networks, three optimizers, an EMA, the
    # teacher's parameters as an input; sCD + aVSD has the same state); every stage runs the
    # same loop.
    config = tiny_config(**{"mesh.data": 1, "vsd.steps": 5, "vsd.checkpoint_every": 2})
    config.teacher.checkpoint_dir = teacher_dir
    straight = train.train_stage(config, "vsd", str(tmp_path / "straight"), log=_quiet)
    assert set(straight.nets) == {"net", "weight", "fake", "fake_weight", "vsd_weight"}

    original = train.MetricLogger.write

    def crash_at_step_4(self, step, metrics, **kw):
        # Step 3 was logged but never checkpointed (checkpoints at 2, 4): its row must go.
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step, metrics, **kw)

    monkeypatch.setattr(train.MetricLogger, "write", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.train_stage(config, "vsd", str(tmp_path / "killed"), log=_quiet)
    monkeypatch.setattr(train.MetricLogger, "write", original)
    assert ckpt.CheckpointStore(str(tmp_path / "killed" / "vsd")).latest_step() == 2
    lines = []
    resumed = train.train_stage(config, "vsd", str(tmp_path / "killed"), log=lines.append)
    assert any("resumed from step 2" in line for line in lines), lines
    assert int(resumed.step) == 5
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(straight.nets["net"].ema),
                    jax.tree.leaves(resumed.nets["net"].ema)):
        np.testing.assert_array_equal(a, b)
    # metrics.jsonl holds every step once: the interrupted run's rows after step 2 are gone.
    import json

    rows = (tmp_path / "killed" / "vsd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5]
    # Both networks that start from the teacher's EMA did (sCM App. G.2; the fake score's
    # start is our choice): the fake score moved from it by a few Adam steps only (each moves
    # a weight by about the learning rate at most).
    fake_lr = config.vsd.vsd.fake_lr or config.vsd.optimizer.lr
    teacher_ema = stage_restore.restore_stage_ema(config, "teacher",
                                                  os.path.dirname(teacher_dir))[0]
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(straight.nets["fake"].params), jax.tree.leaves(teacher_ema))]
    assert 0 < max(moved) < 1.5 * config.vsd.steps * fake_lr


@pytest.mark.parametrize("key,value,expected", [
    ("scd.loss.tangent_c", -1.0, "scd.loss.tangent_c"),
    ("sct.loss.p_std", 0.0, "sct.loss.p_std"),
    ("teacher.loss.p_std", -1.0, "teacher.loss.p_std"),
    ("stage", "distill", "stage"),
    ("scd.loss.tangent_norm", "max", "scd.loss.tangent_norm"),
    ("model.attention_impl", "flash", "attention_impl"),
])
def test_invalid_values_fail_at_start_naming_the_key(key, value, expected, tmp_path):
    config = tiny_config(**{key: value})
    workdir = tmp_path / "wd"
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        entry.run(config, str(workdir), log=_quiet)
    assert not workdir.exists() or not any(workdir.iterdir())


def test_unknown_config_argument_fails():
    with pytest.raises(ValueError, match="variant"):
        load_experiment("digits", "variant=huge")
    with pytest.raises(ValueError, match="colour"):
        load_experiment("digits", "colour=red")


def test_distillation_without_teacher_checkpoint_fails_clearly(tmp_path):
    config = tiny_config(stage="scd")
    with pytest.raises(FileNotFoundError, match="no teacher checkpoint found in .*teacher"):
        entry.run(config, str(tmp_path), log=_quiet)
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_mismatched_checkpoint_is_refused_and_left_intact(teacher_dir, tmp_path):
    import shutil

    workdir = tmp_path / "wd"
    shutil.copytree(teacher_dir, workdir / "teacher")
    before = _tree_digest(workdir)
    wider = tiny_config(**{"model.channels": 16, "teacher.steps": 4})
    with pytest.raises(ckpt.CheckpointMismatchError, match="model"):
        train.train_stage(wider, "teacher", str(workdir), log=_quiet)
    assert _tree_digest(workdir) == before
    # Without config.json (a checkpoint copied by hand), the shape check itself names the entry.
    os.remove(workdir / "teacher" / "config.json")
    before = _tree_digest(workdir)
    with pytest.raises(ckpt.CheckpointMismatchError, match="conv_in"):
        train.train_stage(wider, "teacher", str(workdir), log=_quiet)
    assert _tree_digest(workdir) == before


def test_a_pipeline_checks_every_stage_before_writing(tmp_path):
    # stage=all: a bad sCD setting must stop the run before the teacher trains, not after.
    config = tiny_config(**{"scd.ema.value": 0.5})
    with pytest.raises(ConfigError, match=r"scd\.ema\.value"):
        entry.run(config, str(tmp_path), log=_quiet)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_only_what_changes_a_checkpoint_blocks_resuming_or_loading_it(teacher_dir, tmp_path):
    import shutil

    # A student whose config differs from the teacher's run in the teacher's optimizer, the
    # attention kernel and the cadence loads that teacher.
    other = {"teacher.optimizer.lr": 1e-4, "teacher.optimizer.warmup_steps": 7,
             "teacher.log_every": 3, "model.attention_impl": "pallas",
             "teacher.checkpoint_dir": teacher_dir, "mesh.data": 1}
    state = train.train_stage(tiny_config(**other), "scd", str(tmp_path / "student"), log=_quiet)
    assert int(state.step) == 2
    # The teacher itself resumes with another learning rate and a longer run.
    workdir = tmp_path / "wd"
    shutil.copytree(teacher_dir, workdir / "teacher")
    lines = []
    resumed = train.train_stage(
        tiny_config(**{"teacher.steps": 3, "teacher.optimizer.lr": 1e-4, "mesh.data": 1}),
        "teacher", str(workdir), log=lines.append)
    assert int(resumed.step) == 3 and any("resumed from step 2" in line for line in lines)
    # What does change the meaning (here sigma_d, part of the data's identity) is refused by name.
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"data\.sigma_d = 0\.75 there, 0\.5 now"):
        train.train_stage(tiny_config(**{"data.sigma_d": 0.5, "teacher.steps": 4}), "teacher",
                          str(workdir), log=_quiet)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"objective\.objective = 'diffusion'"):
        stage_identity.check_stage_config(workdir / "teacher", stage_identity.stage_record(
            tiny_config(), objectives.build(tiny_config(), "sct")))


@pytest.mark.slow
def test_the_train_loop_traces_its_step_once(tmp_path, monkeypatch):
    """chex counts the traces of the step train_stage jits: one for the whole run, across
    logging, checkpoints and sample grids."""
    import chex

    make_step = objectives.Objective.make_step
    monkeypatch.setattr(objectives.Objective, "make_step",
                        lambda self, teacher=None: chex.assert_max_traces(
                            make_step(self, teacher), n=1))
    config = tiny_config(**{"mesh.data": 1, "teacher.steps": 4, "teacher.sample_every": 2,
                            "teacher.eval_every": 2})
    lines = []
    state = train.train_stage(config, "teacher", str(tmp_path), log=lines.append)
    assert int(state.step) == 4
    assert (tmp_path / "teacher" / "samples_0000002.png").exists()
    # The in-training evaluation (config.eval.in_loop_samples of the EMA every eval_every
    # steps) writes its own rows, after the step's.
    import json

    rows = [json.loads(r) for r in
            (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval/fd"] > 0 and 0 <= r["eval/precision"] <= 1 for r in evals)
    assert evals[0]["eval/fd"] != evals[1]["eval/fd"]   # the EMA moved; the noise is fixed
    assert any("[teacher] step 4: eval/fd=" in line for line in lines)
