"""The training objectives: normalization, Eq. 8 value and gradient, targets, discrete grid,
the guided teacher, and the registry's shape (named networks, name-derived keys, per-section
schemas and checks).

The tangent itself is tested against float64 finite differences in test_scm_tangent.py.
"""
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import objectives
from scm_jax.errors import ConfigError
from scm_jax.objectives.consistency import normalize_tangent
from scm_jax.objectives.diffusion import diffusion_targets
from scm_jax.objectives.discrete import discrete_time_grid, discrete_time_probs
from scm_jax.objectives.randomness import Randomness
from scm_jax.objectives.regression import Targets, weighted_regression
from scm_jax.objectives.scm import scm_targets
from tests.helpers import load_experiment, tiny_net_fn

SD = 0.75


def test_tangent_normalization_variants():
    g = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (4, 8, 8, 1)) * 3.0
    norms = jnp.sqrt(jnp.sum(g**2, axis=(1, 2, 3)))
    out = normalize_tangent(g, kind="l2", c=0.1)
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(out**2, axis=(1, 2, 3))), norms / (norms + 0.1),
                               rtol=1e-5)
    rms = normalize_tangent(g, kind="rms", c=0.1)
    np.testing.assert_allclose(rms, g / (norms / 8.0 + 0.1)[:, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(normalize_tangent(g, kind="clip"), jnp.clip(g, -1, 1))
    np.testing.assert_array_equal(normalize_tangent(g, kind="none"), g)
    with pytest.raises(ValueError, match="'bogus'"):
        normalize_tangent(g, kind="bogus")


def _output_as_params_net(params, x, t, cond, key=None):
    """A 'network' whose output is its parameter tensor: dLoss/dparams = dLoss/dF."""
    return jnp.broadcast_to(params, x.shape)


def test_loss_gradient_pushes_F_along_plus_g_and_value_is_eq8():
    """Alg. 1: grad_F of (e^w/D)||F - F^- - g||^2 - w is -2 e^w g / D; its value is e^w||g||^2/D - w."""
    key = jax.random.PRNGKey(np.random.randint(1 << 30))
    k1, k2, k3 = jax.random.split(key, 3)
    F0 = jax.random.normal(k1, (2, 8, 8, 1))
    g = jax.random.normal(k2, (2, 8, 8, 1))
    w = jax.random.normal(k3, (2,))
    targets = Targets(jnp.zeros_like(F0), jnp.ones((2,)), {}, g, jax.random.PRNGKey(0),
                             consistency=True)
    fn = lambda p: weighted_regression(  # noqa: E731
        p, targets, net_fn=_output_as_params_net, weight_fn=lambda wp, t: wp)
    (loss, _), grads = jax.value_and_grad(fn, has_aux=True)({"net": F0, "weight": w})
    d = 64
    bw = jnp.exp(w)[:, None, None, None]
    np.testing.assert_allclose(grads["net"], -2 * bw * g / d / 2, rtol=1e-5)  # mean over B=2
    expected = jnp.mean(jnp.exp(w) * jnp.sum(g**2, axis=(1, 2, 3)) / d - w)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Optimal weight: d/dw = e^w ||g||^2/D - 1 (App. D).
    np.testing.assert_allclose(grads["weight"], (jnp.exp(w) * jnp.sum(g**2, (1, 2, 3)) / d - 1) / 2,
                               rtol=1e-5)


def test_discrete_grid_and_probabilities():
    grid, sigmas = discrete_time_grid(16, SD)
    assert grid[0] == 0 and np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(sigmas[[1, -1]], [0.002, 80.0], rtol=1e-9)
    np.testing.assert_allclose(grid, np.arctan(sigmas / SD))
    probs = discrete_time_probs(sigmas, -1.0, 1.6)
    assert probs.shape == (16,) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)


def test_diffusion_targets_are_velocity_over_sigma_d():
    x0 = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (5, 8, 8, 1))
    tg = diffusion_targets(Randomness.for_batch(jax.random.PRNGKey(3), 5), x0, {}, sigma_d=SD,
                           p_mean=-0.8, p_std=1.6)
    tb = tg.t[:, None, None, None]
    # x_t = cos t x0 + sin t z and v = cos t z - sin t x0  =>  z = sin t x_t + cos t v.
    x_t = tg.x_scaled * SD
    v = tg.target * SD
    z = jnp.sin(tb) * x_t + jnp.cos(tb) * v
    np.testing.assert_allclose(jnp.cos(tb) * x_t - jnp.sin(tb) * v, x0, atol=1e-5)
    assert not tg.consistency and abs(float(jnp.std(z)) - SD) < 0.1


def test_cm_targets_are_stop_gradient_and_grad_traces():
    """jax.grad of the whole train objective only differentiates the second pass."""
    net_fn, params = tiny_net_fn(jnp.float32, key=1)
    x0 = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 1))

    def targets(p):
        return scm_targets(Randomness.for_batch(jax.random.PRNGKey(0), 3), x0, {},
                           net_fn=net_fn, params=p, step=5,
                           sigma_d=SD, p_mean=-1.0, p_std=1.6, tangent_c=0.1, warmup_steps=10)

    def total(p):
        return weighted_regression({"net": p, "weight": None}, targets(p), net_fn=net_fn,
                                   weight_fn=lambda wp, t: jnp.zeros_like(t))[0]

    grads = jax.jit(jax.grad(total))(params)
    tg = jax.jit(targets)(params)
    # With the targets frozen, the gradient equals that of <F, -2 g / D> averaged over the batch.
    lin = lambda p: jnp.mean(jnp.sum(net_fn(p, tg.x_scaled, tg.t, {}) * tg.target,  # noqa: E731
                                     axis=(1, 2, 3))) * (-2.0 / 64)
    expected = jax.jit(jax.grad(lin))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_teacher_velocity_applies_classifier_free_guidance():
    """sCD's dx/dt = sigma_d (F_u + s (F_c - F_u)), with the null label for F_u (Alg. 1, CFG)."""
    net_fn, params = tiny_net_fn(jnp.float32, key=3, num_classes=10)
    x_t = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (3, 8, 8, 1))
    t = jnp.asarray([0.3, 0.9, 1.4])
    y = jnp.asarray([1, 4, 7])
    scale = jnp.asarray([1.0, 1.5, 2.5])
    cond_out = net_fn(params, x_t / SD, t, {"y": y})
    uncond_out = net_fn(params, x_t / SD, t, {"y": jnp.full_like(y, 10)})
    teacher = objectives.Teacher(types.SimpleNamespace(
        net_eval=net_fn, sigma_d=SD, model_cfg=types.SimpleNamespace(num_classes=10)))
    guided = teacher.velocity(params, x_t, t, {"y": y, "guidance": scale}, scale)
    expected = SD * (uncond_out + scale[:, None, None, None] * (cond_out - uncond_out))
    np.testing.assert_allclose(guided, expected, rtol=1e-4, atol=1e-5)
    plain = teacher.velocity(params, x_t, t, {"y": y})
    np.testing.assert_allclose(plain, SD * cond_out, rtol=1e-6)


# --- The registry's shape --------------------------------------------------------------------
def test_every_stage_is_an_objective_with_named_networks():
    config = load_experiment("digits", "variant=tiny")
    kinds = {name: config[name].objective for name in ("teacher", "scd", "sct", "dscd")}
    assert kinds == dict(teacher="diffusion", scd="scm", sct="scm", dscd="discrete")
    for name in kinds:
        objective = objectives.build(config, name)
        state, _ = objective.abstract_state((8, 8, 1))
        # Each network has its own params and optimizer state; only the backbone keeps an EMA.
        assert set(state.nets) == {"net", "weight"}
        assert state.nets["weight"].ema is None
        assert jax.tree.structure(state.nets["net"].ema) == jax.tree.structure(
            state.nets["net"].params)
        assert objective.distills == (name in ("scd", "dscd"))
        assert objective.teacher_stage == (None if name == "teacher" else "teacher")
    # The diffusion objective never builds the guidance input; a guided student does.
    guided = load_experiment("imagenet512", "variant=runlocal")
    assert not objectives.build(guided, "teacher").model_cfg.guidance_input
    assert objectives.build(guided, "scd").model_cfg.guidance_input


def test_stage_key_comes_from_the_name_not_the_position():
    key = objectives.stage_key(3, "sct")
    expected = jax.random.fold_in(jax.random.PRNGKey(3), zlib.crc32(b"sct") & 0x7FFFFFFF)
    np.testing.assert_array_equal(key, expected)
    assert not np.array_equal(key, objectives.stage_key(3, "scd"))


def test_sections_own_their_schema_and_checks():
    teacher = objectives.section("diffusion")
    assert "label_dropout" in teacher and "tangent_c" not in teacher.loss
    scm = objectives.section("scm", tangent="teacher")
    assert scm.tangent == "teacher" and scm.loss.prior_weighting == "paper"
    assert objectives.section("discrete").loss.num_points == 1024
    with pytest.raises(ConfigError, match="num_points"):
        objectives.section("scm", loss=dict(num_points=4))
    with pytest.raises(ConfigError, match="unknown objective 'vsd'"):
        objectives.get("vsd")
    config = load_experiment("digits", "variant=tiny")
    config.dscd.loss.num_points = 1
    with pytest.raises(ConfigError, match=r"dscd\.loss\.num_points"):
        objectives.get("discrete").validate_section(config, "dscd")


@pytest.mark.slow
def test_a_new_objective_needs_its_class_and_its_config_section_only(tmp_path, monkeypatch):
    """An objective defined here (diffusion at one fixed time, a toy) trains through the
    unchanged entry point once it is registered and the config has a section for it."""
    from scm_jax import main as entry
    from scm_jax.objectives.diffusion import Diffusion
    from scm_jax.objectives.regression import Targets, draw_noisy

    class FixedTimeDiffusion(Diffusion):
        name = "fixed_time_diffusion"
        SCHEMA = dict(Diffusion.SCHEMA, time=0.8)

        def targets(self, rng, batch, params, step, teacher, teacher_params):
            x0 = batch["image"]
            _, z, _ = draw_noisy(rng, x0, sigma_d=self.sigma_d, p_mean=0.0, p_std=1.0)
            t = jnp.full(x0.shape[:1], self.cfg.time, jnp.float32)
            x_t = jnp.cos(t)[:, None, None, None] * x0 + jnp.sin(t)[:, None, None, None] * z
            v = jnp.cos(t)[:, None, None, None] * z - jnp.sin(t)[:, None, None, None] * x0
            return Targets(x_t / self.sigma_d, t, self.conditioning(rng, batch),
                           v / self.sigma_d, rng.dropout_key, consistency=False)

    monkeypatch.setitem(objectives.OBJECTIVES, FixedTimeDiffusion.name, FixedTimeDiffusion)
    config = load_experiment("digits", "variant=tiny")
    with config.unlocked():
        config.fixed = FixedTimeDiffusion.section(steps=2, batch_size=16, log_every=1,
                                                  checkpoint_every=2, sample_every=-1)
    config.stage = "fixed"
    config.mesh.data = 1
    lines = []
    entry.run(config, str(tmp_path), log=lines.append)
    assert any("[fixed] step 2/2" in line for line in lines)
    record = (tmp_path / "fixed" / "config.json").read_text()
    assert '"objective": "fixed_time_diffusion"' in record


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch():
    """microbatches = 4: the same per-sample randomness, gradients averaged over the parts, one
    update: equal to the whole batch's step up to float rounding (no dropout here). sCT draws
    every kind of per-sample randomness the teacher does (time, noise) plus the tangent's; the
    accumulation is the base step's, shared by every objective."""
    name = "sct"
    overrides = [f"{name}.dropout=0.0", f"{name}.optimizer.eps=0.001", "sct.loss.warmup_steps=0"]
    rng = np.random.default_rng()
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (16, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, (16,)), jnp.int32)}
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    results = []
    for parts in (1, 4):
        config = load_experiment("digits", "variant=tiny",
                                 overrides + [f"{name}.microbatches={parts}"])
        objective = objectives.build(config, name)
        state = objective.init_state(key, (8, 8, 1))
        results.append(jax.jit(objective.make_step())(state, batch, None))
    (one, m_one), (four, m_four) = results
    np.testing.assert_allclose(m_four["loss"], m_one["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_four["grad_norm"], m_one["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(four.nets), jax.tree.leaves(one.nets)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
