"""The paper's configs (experiments/cifar10.py, imagenet64.py, imagenet512.py): they resolve to the
paper's settings, build their networks abstractly at full size, and their tiny 'runlocal'
versions train on mock data (TFDS mock data for pixels, a tiny encoded-latent directory for
ImageNet 512), including under an FSDP mesh.
"""
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds


from scm_jax import stage_restore
from scm_jax import compile_cache
from scm_jax import main as scm_main
from scm_jax import objectives, train
from scm_jax.data import data_shape
from tests.helpers import load_experiment, tiny_latents


def _count(config):
    lines = []
    count = scm_main.dry_run(config, log=lines.append)
    return count, lines


@pytest.mark.parametrize("name,arg,paper_m", [
    ("imagenet512", "variant=xxl,stage=scd", 1523.4),
    ("imagenet512", "variant=s", 280.2),
    ("imagenet64", "variant=m", 497.8),
])
def test_edm2_configs_resolve_with_paper_counts(name, arg, paper_m):
    config = load_experiment(name, arg)
    count, lines = _count(config)
    # ADN doubles each block's embedding projection (sCM Sec. 4.1); the rest is EDM2's network,
    # which tests/test_edm2.py checks against the paper's counts with EDM2's modulation.
    assert 1.03 < count / (paper_m * 1e6) < 1.06, count
    assert f"{paper_m}M" in lines[-1]


def test_imagenet512_settings_are_the_papers():
    c = load_experiment("imagenet512", "variant=xxl,stage=scd")
    assert c.teacher.optimizer.lr == 6.5e-3 and c.scd.optimizer.lr == pytest.approx(6.5e-5)
    assert c.teacher.optimizer.eps == 1e-11 and c.scd.optimizer.b2 == 0.99
    assert c.scd.optimizer.schedule == "inv_sqrt" and c.scd.optimizer.t_ref == 70_000
    assert (c.teacher.loss.p_mean, c.teacher.loss.p_std) == (-0.4, 1.0)
    assert (c.scd.loss.p_mean, c.scd.loss.p_std) == (-0.8, 1.6)
    assert c.scd.loss.tangent_c == 0.1 and c.scd.loss.warmup_steps == 10_000
    assert (c.scd.guidance.scale_min, c.scd.guidance.scale_max) == (1.0, 2.0)
    assert c.model.guidance_input and c.teacher.label_dropout == 0.1
    assert c.teacher.ema.value == 0.015 and c.scd.ema.value == 0.05
    assert (c.sct.dropout, c.scd.dropout, c.model.dropout_max_resolution) == (0.35, 0.1, 16)
    assert (c.teacher.steps, c.sct.steps, c.scd.steps) == (376_000, 100_000, 200_000)
    assert c.teacher.batch_size == c.scd.batch_size == 2048
    assert c.data.sigma_d == 0.5 and data_shape(c.data) == (64, 64, 4)
    c64 = load_experiment("imagenet64", "variant=s")
    assert c64.sct.dropout == 0.45 and c64.teacher.ema.value == 0.075
    assert not c64.model.guidance_input and c64.scd.guidance.scale_max == 1.0
    cifar = load_experiment("cifar10")
    assert cifar.scd.optimizer.name == "radam" and cifar.scd.optimizer.lr == 1e-4
    assert (cifar.sct.loss.p_mean, cifar.sct.loss.p_std) == (-1.0, 1.4)
    assert cifar.sct.dropout == 0.2 and cifar.scd.dropout == 0.0 and cifar.model.num_classes == 0
    assert cifar.scd.ema.kind == "halflife" and cifar.scd.ema.value == 500_000


@pytest.mark.parametrize("name,arg", [("cifar10", "variant=large"),
                                      ("imagenet512", "variant=b"),
                                      ("imagenet64", "variant=xxl"),
                                      ("imagenet64", "backbone=dit")])
def test_bad_variant_is_named(name, arg):
    with pytest.raises(ValueError, match=arg.split("=")[1]):
        load_experiment(name, arg)


def test_dry_run_command_prints_config_and_count(tmp_path):
    cmd = [sys.executable, "-m", "scm_jax.main",
           "--config=experiments/imagenet512.py:variant=xxl,stage=scd",
           f"--workdir={tmp_path}", "--config.dry_run=True", "--config.scd.optimizer.lr=3e-5"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=_repo(), timeout=600,
                         env=_cpu_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "backbone parameters (stage scd): 1,5" in out.stdout and "1523.4M" in out.stdout
    assert "| Name " in out.stdout   # clu's parameter table
    assert "lr: 3.0e-05" in out.stdout and "steps: 200000" in out.stdout
    assert not any(tmp_path.iterdir())   # a dry run writes nothing


def _repo():
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_env():
    import os

    return dict(os.environ, JAX_PLATFORMS="cpu")


def _train(config, stages, workdir):
    states = {}
    for name in stages:
        states[name] = train.train_stage(config, name, str(workdir), log=lambda m: None)
        metrics = [line for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        assert metrics, name
    return states


def _moved(state, before):
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         state.nets["net"].params, before)
    return max(jax.tree.leaves(diffs))


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=64):
        yield


@pytest.mark.slow
def test_cifar10_runlocal_trains_its_teacher(mock_tfds, tmp_path):
    """DDPM++ through the real train stage on (mock) CIFAR-10; the CM stages run the same loop
    (tests/test_train.py, and the EDM2/DiT tests below)."""
    config = load_experiment("cifar10", "variant=runlocal")
    config.teacher.sample_every = -1   # no grid: compile time
    # One resolution level: a quarter of the two-level network's compile time; DDPM++'s down-
    # and up-sampling paths are checked in tests/test_ddpmpp_dit.py.
    config.model.channel_mult = (1,)
    # Not through JAX's persistent cache: this scanned DDPM++ step on 8 virtual CPU devices,
    # loaded back from the cache, deadlocks in an all-reduce (XLA's CPU rendezvous aborts after
    # 40 s; compiled fresh it runs), so no entry is written that a later run could read.
    with compile_cache.without_jax_cache():
        state = _train(config, ("teacher",), tmp_path)["teacher"]
    assert int(state.step) == config.teacher.steps
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.nets))
    resumed = train.train_stage(config, "teacher", str(tmp_path), log=lambda m: None)
    assert int(resumed.step) == config.teacher.steps   # re-running resumes at the end


@pytest.mark.slow
def test_imagenet64_runlocal_trains_under_fsdp(mock_tfds, tmp_path):
    config = load_experiment("imagenet64", "variant=runlocal")
    config.mesh.fsdp = 2
    config.teacher.sample_every = -1
    config.model.channel_mult = (1,)   # one level: compile time (test_edm2.py checks the rest)
    state = _train(config, ("teacher",), tmp_path)["teacher"]
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.nets["net"].params)]
    assert any("fsdp" in str(spec) for spec in specs), "no weight is split over the fsdp axis"
    # EDM2's forced weight normalization ran after the updates: MP weights have unit RMS rows.
    from scm_jax.networks import edm2

    projected = edm2.project_params(state.nets["net"].params)
    for a, b in zip(jax.tree.leaves(projected), jax.tree.leaves(state.nets["net"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_imagenet512_runlocal_trains_guided_scd(tmp_path):
    tiny_latents(tmp_path / "latents")
    config = load_experiment("imagenet512", "variant=runlocal,stage=scd")
    config.data.path = str(tmp_path / "latents")
    config.teacher.sample_every = -1
    config.model.channel_mult = (1,)   # one level (with attention at 8x8): compile time
    assert data_shape(config.data) == (8, 8, 4) and config.model.guidance_input
    states = _train(config, ("teacher", "scd"), tmp_path / "run")
    teacher_ema, _ = stage_restore.restore_stage_ema(config, "teacher", str(tmp_path / "run"))
    # The guided student starts from the unguided teacher (its guidance layer zero-initialized)
    # and the guidance path is trained.
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(states["scd"].nets["net"].params)[0]}
    guidance = [v for k, v in flat.items() if "guidance" in k]
    assert guidance and max(float(np.abs(np.asarray(v)).max()) for v in guidance) > 0
    student = {k: v for k, v in flat.items() if "guidance" not in k}
    teacher = {jax.tree_util.keystr(p): v for p, v in
               jax.tree_util.tree_flatten_with_path(teacher_ema)[0]}
    assert student.keys() == teacher.keys()
    assert max(float(np.abs(np.asarray(student[k]) - np.asarray(teacher[k])).max())
               for k in student) > 0
    assert (tmp_path / "run" / "scd" / "samples_0000004.png").exists()   # latent preview grid
    # sCD + aVSD and aVSD alone (App. C) on the same preset: the generator, F_phi (from the
    # teacher's EMA) and w_psi all train, guided as sCD is.
    for stage_name, vsd in _train(config, ("scd_vsd", "vsd"), tmp_path / "run").items():
        assert int(vsd.step) == config[stage_name].steps and set(vsd.nets) == {
            "net", "weight", "fake", "fake_weight", "vsd_weight"}
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(vsd.nets))
        for name in ("net", "fake"):   # both start from the teacher's EMA (+ a guidance layer)
            flat = {jax.tree_util.keystr(p): v for p, v in
                    jax.tree_util.tree_flatten_with_path(vsd.nets[name].params)[0]
                    if "guidance" not in jax.tree_util.keystr(p)}
            assert flat.keys() == teacher.keys(), (stage_name, name)
            assert max(float(np.abs(np.asarray(flat[k]) - np.asarray(teacher[k])).max())
                       for k in flat) > 0, (stage_name, name)


def test_missing_latents_name_the_encoding_command(tmp_path):
    config = load_experiment("imagenet512", "variant=runlocal,stage=teacher")
    config.data.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="scm_jax.encode_latents"):
        train.train_stage(config, "teacher", str(tmp_path / "run"), log=lambda m: None)
    assert not (tmp_path / "run" / "teacher" / "checkpoints").exists()


def test_paper_configs_default_to_the_fused_kernel_on_accelerators(monkeypatch):
    from scm_jax.networks import attention

    for name in ("cifar10", "imagenet64", "imagenet512"):
        assert load_experiment(name).model.attention_impl == "auto"
    assert attention.resolve_attention_impl("auto") == "xla"   # this CPU: no interpreter in training
    for backend, kernel in (("tpu", "mosaic_tpu"), ("gpu", "triton")):
        monkeypatch.setattr(attention.jax, "default_backend", lambda b=backend: b)
        assert attention.resolve_attention_impl("auto") == f"pallas:{kernel}"
    # The mesh's platform, when given, wins over the host's (a TPU step compiled on a CPU).
    assert attention.resolve_attention_impl("auto", "tpu") == "pallas:mosaic_tpu"
    assert attention.resolve_attention_impl("pallas", "cpu") == "pallas:interpret"
    with pytest.raises(ValueError, match="flash"):
        attention.resolve_attention_impl("flash")


def test_dit_backbone_takes_an_scm_step():
    """The DiT backbone through the real sCT train step (imagenet512 runlocal, backbone=dit):
    the loss is finite, the weights move, and the tangent pass saw the attention."""
    config = load_experiment("imagenet512", "variant=runlocal,backbone=dit,stage=sct")
    assert config.model.name == "dit"
    objective = objectives.build(config, "sct")
    shape = data_shape(config.data)
    state = objective.init_state(jax.random.PRNGKey(0), shape)
    before = jax.tree.map(np.asarray, state.nets["net"].params)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    batch = dict(image=0.5 * jax.random.normal(k1, (4,) + shape),
                 label=jax.random.randint(k2, (4,), 0, 1000))
    state, metrics = jax.jit(objective.make_step())(state, batch, None)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["tangent_norm"]) > 0
    assert _moved(state, before) > 0
