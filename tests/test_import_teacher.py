"""`python -m scm_jax.import_teacher`: an EDM2-format pickle (written by the tests' writer, random
weights) becomes the teacher stage of the runlocal ImageNet 512 preset with `teacher=edm2`; the
imported teacher's consistency function is EDM2's denoiser computed from the pickle's weights,
its checkpoint resumes as a finished stage, and sCD distills it."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import edm2_pickle, objectives, stage_restore, train
from scm_jax.errors import CheckpointMismatchError, ConfigError
from scm_jax.import_teacher import import_edm2_teacher
from scm_jax.networks.edm2_names import params_from_edm2
from tests import edm2_format, test_edm2_native as edm2_ref
from tests.helpers import REPO, load_experiment, tiny_latents

# EDM2's constructor arguments of the runlocal preset's network (edm2 'xs': 16 channels, levels
# (1, 2), one block, attention at 8x8, noise width 16 and embedding width 32) on 8x8x4 latents.
KWARGS = dict(img_resolution=8, img_channels=4, label_dim=1000, model_channels=16,
              channel_mult=[1, 2], channel_mult_noise=1, channel_mult_emb=2, num_blocks=1,
              attn_resolutions=[8], channels_per_head=8, sigma_data=0.5, logvar_channels=8)
ARCH = dict(resolution=8, img_channels=4, model_channels=16, channel_mult=(1, 2), num_blocks=1,
            attn_resolutions=(8,), channels_per_head=8, label_dim=1000)


def _config(tmp_path, *overrides):
    config = load_experiment("imagenet512", "variant=runlocal,teacher=edm2", list(overrides))
    config.data.path = str(tmp_path / "latents")
    return config


def _pickle(tmp_path, seed, **changes):
    rng = np.random.default_rng(seed)
    kwargs = dict(KWARGS, **changes)
    params = edm2_format.random_edm2_params(kwargs, rng)
    path = tmp_path / f"edm2-{seed}.pkl"
    edm2_format.write_edm2_pickle(path, params, kwargs)
    return path


@pytest.mark.slow
def test_the_imported_teacher_is_edm2s_denoiser_and_scd_distills_it(tmp_path):
    tiny_latents(tmp_path / "latents")
    config = _config(tmp_path)
    pkl = _pickle(tmp_path, seed=int(np.random.default_rng().integers(1 << 30)))
    workdir = tmp_path / "run"
    lines = []
    directory = import_edm2_teacher(config, str(pkl), str(workdir), log=lines.append)
    assert directory == str(workdir / "teacher") and "teacher checkpoint at step" in lines[-1]
    record = json.loads((workdir / "teacher" / "config.json").read_text())
    assert record["imported_from"]["kwargs"]["model_channels"] == 16
    assert len(record["imported_from"]["sha256"]) == 64

    # Restored as any teacher is: its EMA is the pickle's weights (float16-exact) in our layout.
    weights = edm2_pickle.load(pkl).params
    objective = objectives.build(config, "teacher")
    module = objective.networks["net"].module
    ema, step = stage_restore.restore_stage_ema(config, "teacher", str(workdir))
    assert step == config.teacher.steps
    expected = params_from_edm2(weights, module)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # f(x_t, t) = cos t x_t - sin t sd F(x_t / sd, t) is EDM2's D(x_t / cos t; sd tan t), computed
    # in float64 NumPy from the pickle's weights, at random t (the null label: EDM2's zeros).
    rng = np.random.default_rng()
    sd, b = 0.5, 4
    t = rng.uniform(0.05, np.pi / 2 - 0.05, b)
    x_t = sd * rng.standard_normal((b, 8, 8, 4))
    y = np.append(rng.integers(0, 1000, b - 1), 1000)
    F = np.asarray(module.apply({"params": ema}, jnp.asarray(x_t / sd, jnp.float32),
                                jnp.asarray(t, jnp.float32), jnp.asarray(y)), np.float64)
    c, s = np.cos(t)[:, None, None, None], np.sin(t)[:, None, None, None]
    f = np.transpose(c * x_t - s * sd * F, (0, 3, 1, 2))
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}
    labels = np.eye(1001)[y][:, :1000]
    D = edm2_ref.edm2_denoiser(w64, np.transpose(x_t, (0, 3, 1, 2)) / c, sd * np.tan(t), labels,
                               ARCH, sd=sd)
    np.testing.assert_allclose(f, D, rtol=0, atol=2e-4 * np.abs(D).max())

    # The teacher stage is complete: re-running it resumes at its last step and trains nothing.
    resumed = train.train_stage(config, "teacher", str(workdir), log=lines.append)
    assert int(resumed.step) == config.teacher.steps
    assert any("the data pipeline starts at its beginning" in line for line in lines)

    # sCD distills it: the guided student starts from the imported weights and trains.
    config.scd.sample_every = -1
    state = train.train_stage(config, "scd", str(workdir), log=lambda m: None)
    assert int(state.step) == config.scd.steps
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.nets))
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(state.nets["net"].params)[0]
            if "guidance" not in jax.tree_util.keystr(p)}
    teacher = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(ema)[0]}
    assert flat.keys() == teacher.keys()
    assert max(float(np.abs(np.asarray(flat[k]) - np.asarray(teacher[k])).max())
               for k in flat) > 0

    # sCD + aVSD too: the generator and F_phi both start from the imported weights.
    config.scd_vsd.sample_every = -1
    vsd = train.train_stage(config, "scd_vsd", str(workdir), log=lambda m: None)
    assert int(vsd.step) == config.scd_vsd.steps
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(vsd.nets))

    # A second import into the same workdir would overwrite a teacher: refused.
    with pytest.raises(CheckpointMismatchError, match="already holds a teacher checkpoint"):
        import_edm2_teacher(config, str(pkl), str(workdir), log=lambda m: None)


def test_a_pickle_of_another_network_is_named_with_the_override(tmp_path):
    config = _config(tmp_path)
    pkl = _pickle(tmp_path, seed=1, model_channels=24, sigma_data=0.6)
    with pytest.raises(ConfigError) as err:
        import_edm2_teacher(config, str(pkl), str(tmp_path / "run"), log=lambda m: None)
    message = str(err.value)
    assert "config.model.channels = 16 where the pickle has 24" in message
    assert "--config.model.channels=24" in message and "data.sigma_d" in message
    assert "\n" not in message and not (tmp_path / "run").exists()
    # A config that does not build EDM2's own network cannot take its weights.
    plain = load_experiment("imagenet512", "variant=runlocal")
    with pytest.raises(ConfigError, match="edm2_native"):
        import_edm2_teacher(plain, str(pkl), str(tmp_path / "run"), log=lambda m: None)


def test_the_command_is_one_line_errors_and_help(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "scm_jax.import_teacher", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))

    proc = run("--help")
    assert proc.returncode == 0 and "  --pkl:" in proc.stdout and "  --workdir:" in proc.stdout
    proc = run("--config=experiments/imagenet512.py:variant=runlocal,teacher=edm2",
               f"--pkl={tmp_path / 'missing.pkl'}", f"--workdir={tmp_path / 'run'}")
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and "missing.pkl" in errors[0], proc.stderr
    bad = tmp_path / "bad.pkl"
    weights = edm2_format.random_edm2_params(KWARGS, np.random.default_rng(2))
    edm2_format.write_edm2_pickle(bad, weights, KWARGS,
                                  extra_globals={"x": (os.system, ("true",))})
    proc = run("--config=experiments/imagenet512.py:variant=runlocal,teacher=edm2",
               f"--pkl={bad}", f"--workdir={tmp_path / 'run'}")
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and "system" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_digits_end_to_end_through_an_edm2_pickle(tmp_path):
    """benchmarks/edm2_digits.py (tiny): a digits teacher trained in EDM2's parameterization,
    written as an EDM2 pickle, imported, distilled by sCD and evaluated."""
    out = tmp_path / "edm2_digits.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "edm2_digits.py"),
                           f"--workdir={tmp_path / 'run'}", f"--json={out}", "--variant=tiny"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["model"], r["nfe"]) for r in result["results"]["rows"]}
    assert {("teacher", 3), ("scd", 1), ("scd", 2)} <= rows
    assert result["scd_stability"]["all_losses_finite"]
    assert result["scd_stability"]["tangent_norm_max"] > 0
    # The imported teacher is the trained one, through the pickle's float16.
    config = load_experiment("digits", "variant=tiny,teacher=edm2")
    trained, _ = stage_restore.restore_stage_ema(config, "teacher",
                                                 str(tmp_path / "run" / "trained"))
    imported, _ = stage_restore.restore_stage_ema(config, "teacher",
                                                  str(tmp_path / "run" / "imported"))
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(imported)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))
