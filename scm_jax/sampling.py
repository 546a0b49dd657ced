"""Samplers: multistep consistency sampling and the TrigFlow teacher ODE solvers (sCM Sec. 5.2, App. B.1, G).

Model convention: `F_fn(x_scaled, t) -> F`, with x_scaled = x_t / sigma_d of shape [B, H, W, C] and
t of shape [B] (radians); F has the shape of x. Callers close over params, class labels and guidance.

TrigFlow (sCM Sec. 3): x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I), PF-ODE
dx/dt = sigma_d F(x_t / sigma_d, t) (Eq. 3), and denoiser / consistency function
f(x_t, t) = cos(t) x_t - sin(t) sigma_d F (Eq. 5 / 23).
"""
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import trigflow

FFn = Callable[[jax.Array, jax.Array], jax.Array]

SOLVERS = ("dpm2s", "heun")
T_MID = 1.1  # fixed 2-step intermediate time for every dataset (sCM Tables 6 and 8)


def _F(F_fn: FFn, x: jax.Array, t, sigma_d: float) -> jax.Array:
    """Evaluates the model at x_t = x and a scalar time t, broadcast to the [B] times F_fn expects."""
    t_b = jnp.full((x.shape[0],), t, dtype=x.dtype)
    return F_fn(x / sigma_d, t_b)


def _denoise(F_fn: FFn, x: jax.Array, t, sigma_d: float) -> jax.Array:
    """D(x, t) = f(x, t) = cos t x - sin t sigma_d F (Eq. 5 / 23) for a scalar t; x: [B, ...]."""
    t_b = jnp.full((x.shape[0],), t, dtype=x.dtype)
    return trigflow.consistency_fn(x, t_b, F_fn(x / sigma_d, t_b), sigma_d)


# ----------------------------------------------------------------------------------------------
# Consistency-model sampling (sCM Sec. 5.2; Song et al. 2023, Alg. 1 "multistep CM sampling").


def one_step_times(sigma_d: float) -> tuple:
    """(t_max,) with t_max = arctan(80 / sigma_d) (sCM Table 5): 1-step sampling starts there, not at pi/2."""
    return (trigflow.t_max(sigma_d),)


def two_step_times(sigma_d: float, t_mid: float = T_MID) -> tuple:
    """(t_max, t_mid): 2-step sampling with the paper's fixed t_mid = 1.1 (sCM Tables 6, 8)."""
    return (trigflow.t_max(sigma_d), float(t_mid))


def _check_times(times: Sequence[float]) -> tuple:
    """Times must be concrete, strictly decreasing and inside (0, pi/2); raises ValueError otherwise."""
    ts = tuple(float(t) for t in np.asarray(times, dtype=np.float64).reshape(-1))
    if not ts:
        raise ValueError("times must contain at least one time, got an empty sequence")
    bad = [t for t in ts if not (0.0 < t < math.pi / 2)]
    if bad:
        raise ValueError(f"times must lie in (0, pi/2); got out-of-range times {bad} in {ts}")
    if any(b >= a for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError(f"times must be strictly decreasing; got {ts}")
    return ts


def cm_sample(F_fn: FFn, key: jax.Array, shape, sigma_d: float, times: Sequence[float],
              dtype=jnp.float32) -> jax.Array:
    """Multistep consistency sampling in TrigFlow (sCM Sec. 5.2; Song et al. 2023 Alg. 1).

    keys = split(key, len(times)); z = sigma_d * N(0, I) drawn with keys[0]; x = f(z, times[0]);
    then for each later s = times[i]: x_s = cos(s) x + sin(s) z_i (z_i fresh, from keys[i]) and
    x = f(x_s, s). This re-noising is exact for TrigFlow's forward process x_s = cos s x0 + sin s z.

    Args:
      F_fn: model, F_fn(x_scaled [B, ...], t [B]) -> F [B, ...].
      key: PRNG key. shape: sample shape [B, H, W, C]. sigma_d: data std.
      times: strictly decreasing Python floats in (0, pi/2), e.g. `one_step_times(sigma_d)`
        (1 NFE) or `two_step_times(sigma_d)` (2 NFE).
    Returns:
      x0 estimate [B, H, W, C] of dtype `dtype`.
    """
    ts = _check_times(times)
    keys = jax.random.split(key, len(ts))
    z = sigma_d * jax.random.normal(keys[0], shape, dtype)
    x = _denoise(F_fn, z, ts[0], sigma_d)
    for k, s in zip(keys[1:], ts[1:]):
        z_s = sigma_d * jax.random.normal(k, shape, dtype)
        x = _denoise(F_fn, math.cos(s) * x + math.sin(s) * z_s, s, sigma_d)
    return x


# ----------------------------------------------------------------------------------------------
# Teacher (diffusion model) ODE solvers (sCM App. B.1, G.1).


def edm_time_steps(num_steps: int, sigma_d: float, sigma_min: float = trigflow.SIGMA_MIN,
                   sigma_max: float = trigflow.SIGMA_MAX, rho: float = 7.0) -> jax.Array:
    """EDM's Karras grid (Karras et al. 2022, Eq. 5) mapped to TrigFlow times t = arctan(sigma/sigma_d) (Eq. 30).

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1,
    then t_N = 0 is appended. Returns [num_steps + 1], strictly decreasing, t_0 = arctan(sigma_max /
    sigma_d). Computed in float64 NumPy (the grid is a constant) and cast to JAX's default float.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = np.arange(num_steps, dtype=np.float64)
    frac = i / max(num_steps - 1, 1)  # num_steps = 1 gives just sigma_max
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    ts = np.append(np.arctan(sigmas / sigma_d), 0.0)
    return jnp.asarray(ts, dtype=jnp.result_type(float))


def nfe(num_steps: int) -> int:
    """Network evaluations of `heun_sampler` / `dpm_solver_2s` on N steps: 2N - 1 (35 for N = 18)."""
    return 2 * num_steps - 1


def _run_steps(step, x_T: jax.Array, ts: jax.Array, F_fn: FFn, sigma_d: float) -> jax.Array:
    """Applies a 2nd-order `step(x, s, t)` on ts[0..N-1] with fori_loop (compile time independent of N),
    then a first-order DDIM step ts[N-1] -> ts[N] = 0 (Eq. 26), i.e. x_0 = f(x, ts[N-1]); as in EDM,
    the last step is Euler because second-order corrections need the model at t = 0."""
    ts = jnp.asarray(ts, x_T.dtype)
    n = ts.shape[0] - 1
    x = jax.lax.fori_loop(0, n - 1, lambda i, x: step(x, ts[i], ts[i + 1]), x_T)
    s = jnp.full((x.shape[0],), ts[n - 1], x.dtype)
    t = jnp.full((x.shape[0],), ts[n], x.dtype)
    return trigflow.ddim_step(x, s, t, F_fn(x / sigma_d, s), sigma_d)


def heun_sampler(F_fn: FFn, x_T: jax.Array, ts: jax.Array, sigma_d: float) -> jax.Array:
    """Heun's 2nd-order method on the PF-ODE dx/dt = sigma_d F(x/sigma_d, t) (Eq. 3) in the t variable.

    Per step s -> t (h = t - s < 0): d_s = sigma_d F(x_s, s); x' = x_s + h d_s;
    d' = sigma_d F(x', t); x_t = x_s + h (d_s + d') / 2. The last step to t = 0 is DDIM (Eq. 26).

    Args: x_T [B, ...] at ts[0]; ts [N + 1] decreasing with ts[N] = 0 (see `edm_time_steps`).
    Returns: x_0 [B, ...]. NFE = 2N - 1.
    """
    def step(x, s, t):
        h = t - s
        d_s = sigma_d * _F(F_fn, x, s, sigma_d)
        x_pred = x + h * d_s
        d_t = sigma_d * _F(F_fn, x_pred, t, sigma_d)
        return x + 0.5 * h * (d_s + d_t)

    return _run_steps(step, x_T, ts, F_fn, sigma_d)


def dpm_solver_2s(F_fn: FFn, x_T: jax.Array, ts: jax.Array, sigma_d: float, r: float = 1.0) -> jax.Array:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1) in data-prediction form with TrigFlow coefficients (Eq. 28).

    TrigFlow is x_t = alpha_t x0 + sigma_t z with alpha_t = cos t, sigma_t = sin t, so the half
    log-SNR is lambda_t = log(alpha_t / sigma_t) = -log tan t and the data prediction is
    D(x, t) = f(x, t) = cos t x - sin t sigma_d F (Eq. 23). The exact PF-ODE solution from s to t is
        x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda D(x_lambda) dlambda.
    Holding D = D_s gives the first-order step (h = lambda_t - lambda_s > 0)
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s,
    which, with e^{-h} = tan t / tan s, simplifies to cos(s-t) x_s - sin(s-t) sigma_d F_s, i.e.
    exactly `trigflow.ddim_step` (Eq. 26). The 2S step takes an intermediate s' with
    lambda_{s'} = lambda_s + r h, i.e. s' = arctan(tan(s) e^{-r h}):
        u   = (sigma_{s'} / sigma_s) x_s - alpha_{s'} (e^{-r h} - 1) D_s,
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) [(1 - 1/(2r)) D_s + 1/(2r) D(u, s')],
    a linear interpolation/extrapolation of D in lambda. r = 1 ("Heun's intermediate time",
    sCM App. G.1) puts s' = t and averages D_s and D(u, t); r = 0.5 is the midpoint variant.
    Note: with r = 1 this data-prediction form agrees with EDM's Heun sampler to second order;
    the noise-prediction DPM-Solver-2 (Eq. 27) is the form that coincides with it exactly.

    Args: x_T [B, ...] at ts[0]; ts [N + 1] decreasing with ts[N] = 0; r in (0, 1].
    Returns: x_0 [B, ...]. NFE = 2N - 1 (the final step to t = 0 is first order).
    """
    if not 0.0 < r <= 1.0:
        raise ValueError(f"r must be in (0, 1], got {r}")

    def step(x, s, t):
        lam_s, lam_t = -jnp.log(jnp.tan(s)), -jnp.log(jnp.tan(t))
        h = lam_t - lam_s
        s_mid = t if r == 1.0 else jnp.arctan(jnp.tan(s) * jnp.exp(-r * h))  # r = 1: exactly t
        d_s = _denoise(F_fn, x, s, sigma_d)
        # expm1 keeps e^{-rh} - 1 accurate when steps are small.
        u = (jnp.sin(s_mid) / jnp.sin(s)) * x - jnp.cos(s_mid) * jnp.expm1(-r * h) * d_s
        d_u = _denoise(F_fn, u, s_mid, sigma_d)
        d = (1.0 - 0.5 / r) * d_s + (0.5 / r) * d_u
        return (jnp.sin(t) / jnp.sin(s)) * x - jnp.cos(t) * jnp.expm1(-h) * d

    return _run_steps(step, x_T, ts, F_fn, sigma_d)


def teacher_sample(F_fn: FFn, key: jax.Array, shape, sigma_d: float, *, num_steps: int = 18,
                   solver: str = "dpm2s", r: float = 1.0, dtype=jnp.float32) -> jax.Array:
    """Samples a TrigFlow diffusion teacher (sCM App. G.1): x_T = sigma_d z, z ~ N(0, I), at
    t_0 = arctan(80 / sigma_d) on `edm_time_steps(num_steps, sigma_d)`, solved to t = 0.

    solver: 'dpm2s' (`dpm_solver_2s` with ratio r; the paper's choice with r = 1) or 'heun'
    (`heun_sampler`). Returns x_0 [*shape]; costs `nfe(num_steps)` = 2N - 1 evaluations.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; options are {SOLVERS}")
    ts = edm_time_steps(num_steps, sigma_d).astype(dtype)
    x_T = sigma_d * jax.random.normal(key, shape, dtype)
    if solver == "heun":
        return heun_sampler(F_fn, x_T, ts, sigma_d)
    return dpm_solver_2s(F_fn, x_T, ts, sigma_d, r=r)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022; sCM Sec. 7 guides the sCD teacher on IN512).


def classifier_free_guidance(F_cond: jax.Array, F_uncond: jax.Array, scale) -> jax.Array:
    """F_uncond + scale (F_cond - F_uncond); scale 1 is conditional, 0 unconditional.

    F_cond, F_uncond: [B, ...]; scale: scalar or per-sample [B] (broadcast over trailing axes).
    """
    scale = jnp.asarray(scale)
    scale = scale.reshape(scale.shape + (1,) * (F_cond.ndim - scale.ndim)).astype(F_cond.dtype)
    # Same value as F_uncond + scale (F_cond - F_uncond), but written as a lerp so that scale = 1
    # (and 0) returns the conditional (unconditional) output bit-exactly in floating point.
    return scale * F_cond + (1 - scale) * F_uncond


def guided_fn(F_fn_with_labels: Callable, labels: jax.Array, null_label, scale) -> FFn:
    """Wraps `F_fn_with_labels(x_scaled, t, labels) -> F` into a guided `F_fn(x_scaled, t)`.

    Both branches run in one call on a 2B batch (conditional first, then `null_label` broadcast to
    labels' shape: an integer class index or, for one-hot labels [B, K], a [K] vector), so the
    network sees one large batch. If `scale` is the Python number 1 the unconditional pass is
    skipped, since guidance then equals the conditional output. scale: scalar or [B].
    """
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale == 1.0:
        return lambda x, t: F_fn_with_labels(x, t, labels)

    labels = jnp.asarray(labels)
    null = jnp.broadcast_to(jnp.asarray(null_label, labels.dtype), labels.shape)
    labels2 = jnp.concatenate([labels, null], axis=0)

    def F_fn(x, t):
        out = F_fn_with_labels(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), labels2)
        F_cond, F_uncond = jnp.split(out, 2, axis=0)
        return classifier_free_guidance(F_cond, F_uncond, scale)

    return F_fn
