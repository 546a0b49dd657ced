"""Tests for scm_jax.sampling against closed forms for Gaussian data.

For x0 ~ N(m, s0^2) per dimension, everything is known exactly: the posterior mean
D(x_t, t) = m + cos t s0^2 / (cos^2 t s0^2 + sin^2 t sigma_d^2) (x_t - cos t m), the teacher
F = (cos t x_t - D) / (sin t sigma_d), and the PF-ODE map from t to 0 is the affine quantile map
x0 = m + s0 (x_t - cos t m) / sqrt(cos^2 t s0^2 + sin^2 t sigma_d^2).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import guidance, sampling, trigflow

SIGMA_D = 0.5


def _bt(t, x):
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _gaussian(seed, feat_shape, dtype):
    rng = np.random.default_rng(seed)
    m = jnp.asarray(rng.uniform(-1.0, 1.0, feat_shape), dtype)
    s0 = jnp.asarray(rng.uniform(0.3, 0.8, feat_shape), dtype)
    return m, s0


def _exact_map(x, t, m, s0, sigma_d=SIGMA_D):
    """PF-ODE solution from (x, t) to time 0 for N(m, s0^2) data; t is [B] or scalar."""
    t = _bt(jnp.asarray(t, x.dtype), x)
    c, s = jnp.cos(t), jnp.sin(t)
    return m + s0 * (x - c * m) / jnp.sqrt(c**2 * s0**2 + s**2 * sigma_d**2)


def _teacher_F(m, s0, sigma_d=SIGMA_D):
    """Exact diffusion F for Gaussian data: F = (cos t x - E[x0 | x_t]) / (sin t sigma_d)."""
    def F_fn(x_scaled, t):
        x = x_scaled * sigma_d
        tb = _bt(t, x)
        c, s = jnp.cos(tb), jnp.sin(tb)
        D = m + c * s0**2 / (c**2 * s0**2 + s**2 * sigma_d**2) * (x - c * m)
        return (c * x - D) / (s * sigma_d)
    return F_fn


def _cm_F(m, s0, sigma_d=SIGMA_D):
    """F whose consistency function f(x, t) is the exact ODE map (an ideal consistency model)."""
    def F_fn(x_scaled, t):
        x = x_scaled * sigma_d
        tb = _bt(t, x)
        return (jnp.cos(tb) * x - _exact_map(x, t, m, s0, sigma_d)) / (jnp.sin(tb) * sigma_d)
    return F_fn


# --- paper constants ------------------------------------------------------------------------


def test_paper_constants():
    assert trigflow.t_max(0.5) == pytest.approx(math.atan(160.0), abs=1e-6)
    assert trigflow.t_max(0.5) == pytest.approx(1.564546, abs=1e-6)
    assert sampling.one_step_times(0.5) == pytest.approx((math.atan(160.0),), abs=1e-6)
    t2 = sampling.two_step_times(0.5)
    assert len(t2) == 2 and t2[0] == pytest.approx(math.atan(160.0), abs=1e-6) and t2[1] == 1.1
    assert sampling.nfe(18) == 35
    assert sampling.nfe(1) == 1


@pytest.mark.parametrize("num_steps,sigma_d", [(18, 0.5), (7, 1.0), (2, 0.5)])
def test_edm_time_steps(num_steps, sigma_d):
    ts = np.asarray(sampling.edm_time_steps(num_steps, sigma_d))
    assert ts.shape == (num_steps + 1,)
    np.testing.assert_allclose(ts[0], math.atan(80.0 / sigma_d), rtol=1e-6)
    np.testing.assert_allclose(ts[-2], math.atan(0.002 / sigma_d), rtol=1e-5)
    assert ts[-1] == 0.0
    assert np.all(np.diff(ts) < 0)
    # Interior points follow Karras' rho = 7 spacing in sigma = sigma_d tan t.
    sig = sigma_d * np.tan(ts[:-1].astype(np.float64))
    ramp = (sig ** (1 / 7) - 80.0 ** (1 / 7)) / (0.002 ** (1 / 7) - 80.0 ** (1 / 7))
    np.testing.assert_allclose(ramp, np.linspace(0, 1, num_steps), atol=1e-4)


def test_edm_time_steps_one_step():
    ts = np.asarray(sampling.edm_time_steps(1, 0.5))
    np.testing.assert_allclose(ts, [math.atan(160.0), 0.0], rtol=1e-6)
    with pytest.raises(ValueError):
        sampling.edm_time_steps(0, 0.5)


# --- teacher ODE solvers ----------------------------------------------------------------------

_SOLVERS = {
    "heun": sampling.heun_sampler,
    "dpm2s": sampling.dpm_solver_2s,
    "dpm2s_mid": lambda F, x, ts, sd: sampling.dpm_solver_2s(F, x, ts, sd, r=0.5),
}


@pytest.mark.parametrize("name", sorted(_SOLVERS))
def test_solvers_converge_second_order(x64, name):
    seed = np.random.default_rng().integers(1 << 31)
    m, s0 = _gaussian(seed, (2, 2, 3), jnp.float64)
    F_fn = _teacher_F(m, s0)
    x_T = SIGMA_D * jax.random.normal(jax.random.PRNGKey(seed), (16, 2, 2, 3), jnp.float64)
    errs, rel_rms = {}, {}
    for n in (4, 8, 16, 18, 32):
        ts = sampling.edm_time_steps(n, SIGMA_D)
        assert ts.dtype == jnp.float64
        x0 = _SOLVERS[name](F_fn, x_T, ts, SIGMA_D)
        diff = x0 - _exact_map(x_T, ts[0], m, s0)
        errs[n] = float(jnp.max(jnp.abs(diff)))
        rel_rms[n] = float(jnp.sqrt(jnp.mean((diff / s0) ** 2)))
    assert errs[4] > errs[8] > errs[16] > errs[18] > errs[32], errs
    # Second order: halving the step divides the error by ~4 (first order would give ~2).
    order = math.log2(errs[16] / errs[32])
    assert 1.6 < order < 2.6, (order, errs)
    # The 18-step (NFE 35) sample is accurate relative to the data scale (measured over seeds:
    # heun <= 0.014, dpm2s <= 0.055, dpm2s_mid <= 0.027), and well below first-order DDIM with
    # the same 18 steps (0.13 - 0.17), which a solver missing its correction would match.
    assert rel_rms[18] < 0.08, rel_rms
    ts = sampling.edm_time_steps(18, SIGMA_D)
    x_ddim = x_T
    for i in range(18):
        s, t = jnp.full((16,), ts[i]), jnp.full((16,), ts[i + 1])
        x_ddim = trigflow.ddim_step(x_ddim, s, t, F_fn(x_ddim / SIGMA_D, s), SIGMA_D)
    ddim_rel = float(jnp.sqrt(jnp.mean(((x_ddim - _exact_map(x_T, ts[0], m, s0)) / s0) ** 2)))
    assert rel_rms[18] < 0.5 * ddim_rel, (rel_rms, ddim_rel)


def test_single_step_solvers_are_ddim(x64):
    """With N = 1 both solvers are exactly one DDIM step to 0, i.e. f(x_T, t_0)."""
    seed = np.random.default_rng().integers(1 << 31)
    m, s0 = _gaussian(seed, (3,), jnp.float64)
    F_fn = _teacher_F(m, s0)
    x_T = jax.random.normal(jax.random.PRNGKey(seed), (5, 3), jnp.float64)
    ts = sampling.edm_time_steps(1, SIGMA_D)
    t0 = jnp.full((5,), ts[0])
    want = trigflow.consistency_fn(x_T, t0, F_fn(x_T / SIGMA_D, t0), SIGMA_D)
    for fn in _SOLVERS.values():
        np.testing.assert_allclose(fn(F_fn, x_T, ts, SIGMA_D), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["dpm2s", "heun"])
def test_teacher_sample_nfe_and_accuracy(x64, solver):
    """Counts real network evaluations (fori_loop runs the traced body N - 1 times) and checks the
    sample equals the exact ODE map of the same x_T."""
    seed = int(np.random.default_rng().integers(1 << 31))
    m, s0 = _gaussian(seed, (2, 2, 1), jnp.float64)
    F = _teacher_F(m, s0)
    calls = []

    def F_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return F(x, t)

    key = jax.random.PRNGKey(seed)
    shape = (32, 2, 2, 1)
    x0 = sampling.teacher_sample(F_fn, key, shape, SIGMA_D, num_steps=18, solver=solver,
                                 dtype=jnp.float64)
    jax.effects_barrier()
    assert len(calls) == sampling.nfe(18) == 35
    x_T = SIGMA_D * jax.random.normal(key, shape, jnp.float64)
    ref = _exact_map(x_T, trigflow.t_max(SIGMA_D), m, s0)
    assert x0.shape == shape and x0.dtype == jnp.float64
    assert float(jnp.sqrt(jnp.mean(((x0 - ref) / s0) ** 2))) < 0.08  # see the convergence test


def test_teacher_sample_unknown_solver():
    with pytest.raises(ValueError, match="euler.*dpm2s.*heun"):
        sampling.teacher_sample(lambda x, t: x, jax.random.PRNGKey(0), (1, 2), SIGMA_D,
                                solver="euler")
    with pytest.raises(ValueError):
        sampling.dpm_solver_2s(lambda x, t: x, jnp.zeros((1, 2)), sampling.edm_time_steps(3, SIGMA_D),
                               SIGMA_D, r=0.0)


# --- consistency-model sampling ---------------------------------------------------------------


def test_cm_one_step_matches_hand_computation():
    seed = int(np.random.default_rng().integers(1 << 31))
    m, s0 = _gaussian(seed, (4, 4, 3), jnp.float32)
    F_fn = _cm_F(m, s0)
    key = jax.random.PRNGKey(seed)
    shape = (8, 4, 4, 3)
    out = sampling.cm_sample(F_fn, key, shape, SIGMA_D, sampling.one_step_times(SIGMA_D))
    k0 = jax.random.split(key, 1)[0]
    z = SIGMA_D * jax.random.normal(k0, shape, jnp.float32)
    T = jnp.full((8,), trigflow.t_max(SIGMA_D), jnp.float32)
    want = jnp.cos(T)[:, None, None, None] * z - jnp.sin(T)[:, None, None, None] * SIGMA_D * F_fn(
        z / SIGMA_D, T)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    # ...and with the ideal CM that is the exact ODE map of z.
    np.testing.assert_allclose(out, _exact_map(z, T, m, s0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("times_fn", [sampling.one_step_times, sampling.two_step_times])
def test_cm_sample_distribution(times_fn):
    """An exact consistency function turns N(0, sigma_d^2) noise into N(m, s0^2) in 1 or 2 steps."""
    seed = int(np.random.default_rng().integers(1 << 31))
    feat = (4, 4, 2)
    m, s0 = _gaussian(seed, feat, jnp.float32)
    n = 16384
    calls = []
    F = _cm_F(m, s0)

    def F_fn(x, t):
        calls.append(1)
        return F(x, t)

    x = sampling.cm_sample(F_fn, jax.random.PRNGKey(seed), (n,) + feat, SIGMA_D, times_fn(SIGMA_D))
    assert len(calls) == len(times_fn(SIGMA_D))
    mean, std = np.asarray(x.mean(0)), np.asarray(x.std(0))
    se = np.asarray(s0) / math.sqrt(n)
    # z at t_max is not exactly the t_max marginal (cos t_max = 1/160), a bias <= ~0.01 s0 |m|.
    np.testing.assert_array_less(np.abs(mean - np.asarray(m)), 5 * se + 0.01)
    np.testing.assert_array_less(np.abs(std - np.asarray(s0)), 5 * se / math.sqrt(2) + 0.01)


def test_cm_two_step_renoises_with_fresh_noise():
    """The 2-step sample is not the 1-step sample: step 2 draws fresh z' and re-denoises at t_mid."""
    m, s0 = _gaussian(0, (3,), jnp.float32)
    key = jax.random.PRNGKey(1)
    x1 = sampling.cm_sample(_cm_F(m, s0), key, (4096, 3), SIGMA_D, sampling.one_step_times(SIGMA_D))
    x2 = sampling.cm_sample(_cm_F(m, s0), key, (4096, 3), SIGMA_D, sampling.two_step_times(SIGMA_D))
    corr = np.corrcoef(np.asarray(x1[:, 0]), np.asarray(x2[:, 0]))[0, 1]
    # x2 = m + s0 (cos t_mid (x1-m)/s0 + sin t_mid sigma_d eps')/..., so corr ~ cos t_mid s0 / sqrt(...)
    c, s = math.cos(1.1), math.sin(1.1)
    want = c * s0[0] / math.sqrt(c**2 * s0[0] ** 2 + s**2 * SIGMA_D**2)
    assert abs(corr - float(want)) < 0.05, (corr, want)


@pytest.mark.parametrize("times", [(1.0, 1.2), (1.1, 1.1), (2.0,), (0.0,), (1.5, -0.1), ()])
def test_cm_sample_bad_times(times):
    with pytest.raises(ValueError, match="times"):
        sampling.cm_sample(lambda x, t: x, jax.random.PRNGKey(0), (2, 3), SIGMA_D, times)


# --- classifier-free guidance -----------------------------------------------------------------


def _labelled_model(key):
    """A nonlinear toy F(x, t, labels) whose output depends on the label."""
    emb = jax.random.normal(key, (11, 3))

    def F(x, t, labels):
        return jnp.tanh(x * emb[labels][:, None, None, :] + _bt(t, x))
    return F


def test_cfg_combination():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(np.random.default_rng().integers(1 << 31)), 3)
    fc = jax.random.normal(k1, (4, 2, 2, 3))
    fu = jax.random.normal(k2, (4, 2, 2, 3))
    np.testing.assert_array_equal(guidance.classifier_free_guidance(fc, fu, 1.0), fc)
    np.testing.assert_array_equal(guidance.classifier_free_guidance(fc, fu, 0.0), fu)
    for w in (0.5, 1.3, 2.0):
        np.testing.assert_allclose(guidance.classifier_free_guidance(fc, fu, w),
                                   (1 - w) * fu + w * fc, rtol=1e-5, atol=1e-5)
    scales = jax.random.uniform(k3, (4,), minval=0.0, maxval=3.0)
    per = guidance.classifier_free_guidance(fc, fu, scales)
    for i in range(4):
        np.testing.assert_allclose(per[i], guidance.classifier_free_guidance(fc[i], fu[i], scales[i]),
                                   rtol=1e-5, atol=1e-5)


def test_guided():
    key = jax.random.PRNGKey(np.random.default_rng().integers(1 << 31))
    kx, kt, km, kl = jax.random.split(key, 4)
    F = _labelled_model(km)
    x = jax.random.normal(kx, (5, 2, 2, 3))
    t = jax.random.uniform(kt, (5,), minval=0.1, maxval=1.5)
    labels = jax.random.randint(kl, (5,), 0, 10)
    null = 10
    calls = []

    def F_counted(x_, t_, l_):
        calls.append(np.asarray(l_))
        return F(x_, t_, l_)

    # scale == 1: exactly the conditional output, one call with the real labels only.
    out1 = guidance.guided(F_counted, labels, null, 1.0)(x, t)
    np.testing.assert_array_equal(out1, F(x, t, labels))
    assert len(calls) == 1 and not np.any(calls[0] == null)

    cond, uncond = F(x, t, labels), F(x, t, jnp.full((5,), null))
    for scale in (0.0, 1.7, jnp.asarray([0.0, 0.5, 1.0, 1.5, 4.0])):
        calls.clear()
        out = guidance.guided(F_counted, labels, null, scale)(x, t)
        assert len(calls) == 1 and calls[0].shape == (10,)  # one batched call of size 2B
        np.testing.assert_allclose(out, guidance.classifier_free_guidance(cond, uncond, scale),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(guidance.guided(F, labels, null, 0.0)(x, t), uncond,
                               rtol=1e-6, atol=1e-6)
    # One-hot labels with a zero vector as the null label.
    onehot = jax.nn.one_hot(labels, 10)
    F_oh = lambda x_, t_, l_: jnp.tanh(x_ * (l_ @ jnp.arange(10.0))[:, None, None, None] + _bt(t_, x_))
    g = guidance.guided(F_oh, onehot, jnp.zeros(10), 2.0)(x, t)
    np.testing.assert_allclose(
        g, guidance.classifier_free_guidance(F_oh(x, t, onehot), F_oh(x, t, jnp.zeros((5, 10))), 2.0),
        rtol=1e-5, atol=1e-5)


# --- the one entry point ----------------------------------------------------------------------


def test_sample_dispatches_to_the_samplers_and_counts_nfe():
    m, s0 = _gaussian(3, (4, 4, 2), jnp.float32)
    key, shape = jax.random.PRNGKey(5), (6, 4, 4, 2)
    for method, direct in [
            (sampling.one_step(SIGMA_D),
             lambda: sampling.cm_sample(_cm_F(m, s0), key, shape, SIGMA_D,
                                        sampling.one_step_times(SIGMA_D))),
            (sampling.consistency((1.5, 1.1, 0.4)),
             lambda: sampling.cm_sample(_cm_F(m, s0), key, shape, SIGMA_D, (1.5, 1.1, 0.4))),
            (sampling.ode(4, "heun"),
             lambda: sampling.teacher_sample(_teacher_F(m, s0), key, shape, SIGMA_D,
                                             num_steps=4, solver="heun"))]:
        F = _teacher_F(m, s0) if method.kind == "ode" else _cm_F(m, s0)
        np.testing.assert_array_equal(sampling.sample(F, key, shape, SIGMA_D, method), direct())
    assert [sampling.one_step(SIGMA_D).nfe, sampling.two_step(SIGMA_D).nfe,
            sampling.ode(18).nfe] == [1, 2, 35]
    with pytest.raises(ValueError, match="decreasing"):
        sampling.consistency((1.1, 1.5))
    with pytest.raises(ValueError, match="solver"):
        sampling.ode(3, "euler")


def test_conditioned_guides_a_teacher_and_feeds_a_student_its_scale():
    """A conditional model without a guidance input is CFG-guided (one batched 2B call); a
    guided student receives the scale as its input instead; an unconditional model ignores
    labels."""
    F = _labelled_model(jax.random.PRNGKey(2))
    seen = []

    def net(params, x, t, cond):
        seen.append(dict(cond))
        return F(x, t, cond["y"]) * (1.0 + cond.get("guidance", 0.0)[:, None, None, None]
                                     if "guidance" in cond else 1.0)

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3))
    t = jnp.full((4,), 0.7)
    y = jnp.asarray([0, 3, 5, 9])
    teacher = sampling.conditioned(net, None, y, num_classes=10, scale=1.5)(x, t)
    assert seen[-1]["y"].shape == (8,) and "guidance" not in seen[-1]
    np.testing.assert_allclose(teacher, guidance.classifier_free_guidance(
        F(x, t, y), F(x, t, jnp.full((4,), 10)), 1.5), rtol=1e-6)
    student = sampling.conditioned(net, None, y, num_classes=10, guidance_input=True,
                                   scale=1.5)(x, t)
    np.testing.assert_allclose(seen[-1]["guidance"], 1.5)
    np.testing.assert_allclose(student, F(x, t, y) * 2.5, rtol=1e-6)
    out = sampling.conditioned(lambda p, x_, t_, c: (seen.append(dict(c)), x_)[1], None, y)(x, t)
    assert seen[-1] == {} and out is x


def test_sampler_is_jitted_once_per_batch_size():
    m, s0 = _gaussian(1, (4, 4, 1), jnp.float32)
    traces = []

    def net(params, x, t, cond):
        traces.append(1)
        return params * _cm_F(m, s0)(x, t)

    draw = sampling.sampler(net, (4, 4, 1), SIGMA_D, sampling.two_step(SIGMA_D))
    labels = jnp.zeros((3,), jnp.int32)
    a = draw(jnp.float32(1.0), jax.random.PRNGKey(0), labels)
    b = draw(jnp.float32(1.0), jax.random.PRNGKey(0), labels)
    draw(jnp.float32(2.0), jax.random.PRNGKey(1), labels)
    assert a.shape == (3, 4, 4, 1) and len(traces) == 2   # 2 evaluations traced once
    np.testing.assert_array_equal(a, b)


def test_each_objective_names_how_it_is_sampled():
    """`sampling.method_for` is the one place a model's kind picks its sampler."""
    from types import SimpleNamespace

    from scm_jax import objectives

    sigma_d = float(np.random.default_rng().uniform(0.3, 1.0))
    teacher = SimpleNamespace(sampler=objectives.get("diffusion").sampler, sigma_d=sigma_d)
    student = SimpleNamespace(sampler=objectives.get("scm").sampler, sigma_d=sigma_d)
    assert sampling.method_for(teacher, 7, solver="heun") == sampling.ode(7, "heun")
    assert sampling.method_for(student, 2) == sampling.two_step(sigma_d)
    assert sampling.method_for(student, 4, t_mid=0.9) == sampling.multistep(sigma_d, 4, 0.9)
    assert sampling.solves_ode(objectives.get("diffusion"))
    assert not any(sampling.solves_ode(objectives.get(n)) for n in ("scm", "dscd", "vsd")
                   if n in objectives.OBJECTIVES)
    with pytest.raises(ValueError, match="'flow'"):
        sampling.solves_ode(SimpleNamespace(sampler="flow"))
