"""The training objectives: normalization, Eq. 8 value and gradient, targets, discrete grid.

The tangent itself is tested against float64 finite differences in test_scm_tangent.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import losses
from tests.helpers import tiny_net_fn

SD = 0.75


def test_tangent_normalization_variants():
    g = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (4, 8, 8, 1)) * 3.0
    norms = jnp.sqrt(jnp.sum(g**2, axis=(1, 2, 3)))
    out = losses.normalize_tangent(g, kind="l2", c=0.1)
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(out**2, axis=(1, 2, 3))), norms / (norms + 0.1),
                               rtol=1e-5)
    rms = losses.normalize_tangent(g, kind="rms", c=0.1)
    np.testing.assert_allclose(rms, g / (norms / 8.0 + 0.1)[:, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(losses.normalize_tangent(g, kind="clip"), jnp.clip(g, -1, 1))
    np.testing.assert_array_equal(losses.normalize_tangent(g, kind="none"), g)
    with pytest.raises(ValueError, match="'bogus'"):
        losses.normalize_tangent(g, kind="bogus")


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
    targets = losses.Targets(jnp.zeros_like(F0), jnp.ones((2,)), {}, g, jax.random.PRNGKey(0),
                             consistency=True)
    fn = lambda p: losses.weighted_regression(  # noqa: E731
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
    grid, sigmas = losses.discrete_time_grid(16, SD)
    assert grid[0] == 0 and np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(sigmas[[1, -1]], [0.002, 80.0], rtol=1e-9)
    np.testing.assert_allclose(grid, np.arctan(sigmas / SD))
    probs = losses.discrete_time_probs(sigmas, -1.0, 1.6)
    assert probs.shape == (16,) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)


def test_diffusion_targets_are_velocity_over_sigma_d():
    x0 = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (5, 8, 8, 1))
    tg = losses.diffusion_targets(jax.random.PRNGKey(3), x0, {}, sigma_d=SD, p_mean=-0.8, p_std=1.6)
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
        return losses.scm_targets(jax.random.PRNGKey(0), x0, {}, net_fn=net_fn, params=p, step=5,
                                  sigma_d=SD, p_mean=-1.0, p_std=1.6, tangent_c=0.1,
                                  warmup_steps=10)

    def total(p):
        return losses.weighted_regression({"net": p, "weight": None}, targets(p), net_fn=net_fn,
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
    guided = losses.teacher_velocity(net_fn, params, x_t, t, {"y": y, "guidance": scale},
                                     sigma_d=SD, guidance_scale=scale, null_label=10)
    expected = SD * (uncond_out + scale[:, None, None, None] * (cond_out - uncond_out))
    np.testing.assert_allclose(guided, expected, rtol=1e-4, atol=1e-5)
    plain = losses.teacher_velocity(net_fn, params, x_t, t, {"y": y}, sigma_d=SD)
    np.testing.assert_allclose(plain, SD * cond_out, rtol=1e-6)
