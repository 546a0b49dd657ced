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
from scm_jax import main as entry
from scm_jax import train
from tests.helpers import load_experiment

STAGES = ("teacher", "scd", "sct", "dscd")


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
    return jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.parametrize("name", STAGES)
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


def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    config = tiny_config(**{"mesh.data": 1, "teacher.steps": 5, "teacher.checkpoint_every": 2})
    straight = train.train_stage(config, "teacher", str(tmp_path / "straight"), log=_quiet)

    original = train.MetricLogger.write

    def crash_at_step_3(self, step, metrics, **kw):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step, metrics, **kw)

    monkeypatch.setattr(train.MetricLogger, "write", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.train_stage(config, "teacher", str(tmp_path / "killed"), log=_quiet)
    monkeypatch.setattr(train.MetricLogger, "write", original)
    assert ckpt.CheckpointStore(str(tmp_path / "killed" / "teacher")).latest_step() == 2
    lines = []
    resumed = train.train_stage(config, "teacher", str(tmp_path / "killed"), log=lines.append)
    assert any("resumed from step 2" in line for line in lines), lines
    assert int(resumed.step) == 5
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(straight.ema), jax.tree.leaves(resumed.ema)):
        np.testing.assert_array_equal(a, b)


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


def test_unknown_config_key_and_argument_fail(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "scm_jax.main", "--config=experiments/digits.py:variant=tiny",
         "--config.scd.loss.bogus_knob=3", f"--workdir={tmp_path}"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode != 0 and "unknown config key 'bogus_knob'" in proc.stderr, proc.stderr
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
