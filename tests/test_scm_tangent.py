"""The sCM tangent (Eq. 6-8, Alg. 1/2) against float64 finite differences on random tiny U-Nets.

One float64 student, one float64 teacher and one random batch per run (fresh seeds each time);
the jitted functions are compiled once for the module.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import types

from scm_jax import objectives, trigflow
from scm_jax.objectives.discrete import discrete_tangent
from scm_jax.objectives.scm import scm_tangent
from tests.helpers import tiny_net_fn

SD = 0.75


@pytest.fixture(scope="module")
def case(x64_module):
    seed = np.random.randint(1 << 30)
    net_fn, params = tiny_net_fn(jnp.float64, key=seed)
    teacher_fn, teacher_params = tiny_net_fn(jnp.float64, key=seed + 1)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed + 2), 3)
    x0 = jax.random.normal(k1, (3, 8, 8, 1), jnp.float64) * SD
    z = jax.random.normal(k2, (3, 8, 8, 1), jnp.float64) * SD
    t = jax.random.uniform(k3, (3,), jnp.float64, 0.2, 1.4)
    x_t = trigflow.add_noise(x0, z, t)

    teacher = jax.jit(lambda x, tt, c: SD * teacher_fn(teacher_params, x / SD, tt, c))
    f = jax.jit(lambda x, tt: trigflow.consistency_fn(x, tt, net_fn(params, x / SD, tt, {}), SD))
    tangent = jax.jit(lambda dxdt, r: scm_tangent(
        net_fn, params, x_t, t, dxdt, {}, None, sigma_d=SD, warmup_ratio=r))
    discrete = jax.jit(lambda t_prev: discrete_tangent(
        net_fn, params, teacher, x_t, t, t_prev, {}, None, sigma_d=SD, warmup_ratio=1.0))
    return dict(net_fn=net_fn, params=params, x0=x0, z=z, t=t, x_t=x_t, teacher=teacher, f=f,
                tangent=tangent, discrete=discrete, tb=t[:, None, None, None])


def _close(actual, expected, rtol):
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.slow
def test_scd_tangent_matches_finite_difference_along_teacher_ode(case):
    """g = cos t df^-/dt with dx/dt = sigma_d F_teacher: central difference along the ODE."""
    x_t, t, f = case["x_t"], case["t"], case["f"]
    dxdt = case["teacher"](x_t, t, {})
    _, g = case["tangent"](dxdt, 1.0)
    h = 1e-5
    fd = (f(x_t + h * dxdt, t + h) - f(x_t - h * dxdt, t - h)) / (2 * h)
    _close(g, jnp.cos(case["tb"]) * fd, 1e-6)


def test_sct_tangent_matches_finite_difference_along_straight_path(case):
    """sCT: dx/dt = cos t z - sin t x0 is the derivative of x(t) = cos t x0 + sin t z."""
    x0, z, t, f = case["x0"], case["z"], case["t"], case["f"]
    _, g = case["tangent"](trigflow.velocity_target(x0, z, t), 1.0)
    h = 1e-5
    path = lambda s: f(trigflow.add_noise(x0, z, s), s)  # noqa: E731
    _close(g, jnp.cos(case["tb"]) * (path(t + h) - path(t - h)) / (2 * h), 1e-6)


def test_rearranged_jvp_equals_naive_jvp_times_cos_sin(case):
    """Sec. 5.1: tangents (cos sin dx/dt, cos sin sigma_d) give sigma_d cos sin dF/dt."""
    net_fn, params, x_t, t, tb = case["net_fn"], case["params"], case["x_t"], case["t"], case["tb"]
    dxdt = jax.random.normal(jax.random.PRNGKey(7), x_t.shape, jnp.float64)
    fn = lambda x, tt: net_fn(params, x, tt, {})  # noqa: E731
    F, dF_naive = jax.jit(lambda d: jax.jvp(fn, (x_t / SD, t), (d / SD, jnp.ones_like(t))))(dxdt)
    expected = (-jnp.cos(tb) ** 2 * (SD * F - dxdt)
                - jnp.cos(tb) * jnp.sin(tb) * (x_t + SD * dF_naive))
    F_minus, g = case["tangent"](dxdt, 1.0)
    np.testing.assert_allclose(F_minus, F, rtol=1e-12)
    _close(g, expected, 1e-10)


def test_tangent_warmup_scales_only_the_second_term(case):
    net_fn, params, x_t, t, tb = case["net_fn"], case["params"], case["x_t"], case["t"], case["tb"]
    dxdt = trigflow.velocity_target(case["x0"], case["z"], t)
    first = -jnp.cos(tb) ** 2 * (SD * net_fn(params, x_t / SD, t, {}) - dxdt)
    g0, g3, g1 = (case["tangent"](dxdt, r)[1] for r in (0.0, 0.3, 1.0))
    _close(g0, first, 1e-12)
    _close(g3 - first, 0.3 * (g1 - first), 1e-10)


def test_discrete_tangent_is_exact_finite_difference_and_converges(case):
    """Alg. 2: cos t (f(x_t,t) - f(x_t',t'))/sin(t-t') -> the continuous g as t' -> t."""
    x_t, t, tb, f, teacher = case["x_t"], case["t"], case["tb"], case["f"], case["teacher"]
    dxdt = teacher(x_t, t, {})
    _, g_cont = case["tangent"](dxdt, 1.0)
    errors = []
    for delta in (1e-2, 1e-3, 1e-4):   # asymptotic: at 1e-1 the second-order term still shows
        g = case["discrete"](t - delta)
        x_prev = trigflow.ddim_step(x_t, t, t - delta, dxdt / SD, SD)
        exact = (f(x_t, t) - f(x_prev, t - delta)) / np.sin(delta)
        _close(g, jnp.cos(tb) * exact, 1e-8)
        errors.append(float(jnp.max(jnp.abs(g - g_cont))))
    # First order in t - t': the error falls ~10x per decade.
    assert errors[0] > 5 * errors[1] > 25 * errors[2], errors


def test_consistency_function_is_identity_at_t_zero(case):
    """f(x, 0) = x for any network (Eq. 5's boundary condition)."""
    x = case["x_t"]
    np.testing.assert_allclose(case["f"](x, jnp.zeros_like(case["t"])), x, rtol=0, atol=1e-15)


def test_guided_scd_tangent_matches_finite_difference(x64_module):
    """Guided sCD (sCM Sec. 6): a class-conditional CFG teacher with scale s and a student that
    takes s as an input. s is constant along the PF-ODE (zero tangent), so g must still be
    cos t df/dt along dx/dt = sigma_d (F_u + s (F_c - F_u))."""
    seed = np.random.randint(1 << 30)
    net_fn, params = tiny_net_fn(jnp.float64, key=seed, num_classes=10, guidance_input=True)
    teacher_fn, teacher_params = tiny_net_fn(jnp.float64, key=seed + 1, num_classes=10)
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(seed + 2), 5)
    x_t = jax.random.normal(k1, (3, 8, 8, 1), jnp.float64) * SD
    t = jax.random.uniform(k2, (3,), jnp.float64, 0.2, 1.4)
    cond = {"y": jax.random.randint(k3, (3,), 0, 10),
            "guidance": jax.random.uniform(k4, (3,), jnp.float64, 1.0, 2.0)}
    teacher = objectives.Teacher(types.SimpleNamespace(
        net_eval=teacher_fn, sigma_d=SD, model_cfg=types.SimpleNamespace(num_classes=10)))
    dxdt = teacher.velocity(teacher_params, x_t, t, cond, cond["guidance"])
    assert dxdt.shape == x_t.shape
    dxdt = dxdt.astype(jnp.float64)
    _, g = jax.jit(lambda d: scm_tangent(net_fn, params, x_t, t, d, cond, None, sigma_d=SD,
                                                warmup_ratio=1.0))(dxdt)
    f = jax.jit(lambda x, tt: trigflow.consistency_fn(x, tt, net_fn(params, x / SD, tt, cond), SD))
    h = 1e-5
    fd = (f(x_t + h * dxdt, t + h) - f(x_t - h * dxdt, t - h)) / (2 * h)
    _close(g, jnp.cos(t[:, None, None, None]) * fd, 1e-6)
    # The scale matters: another s changes F (so a zero tangent on s is a real choice).
    other = dict(cond, guidance=cond["guidance"] + 0.5)
    assert not np.allclose(net_fn(params, x_t / SD, t, cond), net_fn(params, x_t / SD, t, other))
