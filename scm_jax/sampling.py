"""Sampling: one entry point (`sample`, and `sampler` for a network) over multistep consistency
sampling and the TrigFlow teacher ODE solvers (sCM Sec. 5.2, App. B.1, G), with guidance.

    method = two_step(sigma_d)            # or one_step, consistency(times), ode(steps, solver)
    draw = sampler(objective.net_eval, image_shape, sigma_d, method, num_classes=10)
    images = draw(params, key, labels)    # jitted; [N, H, W, C]

The progress grids of training, the evaluation and the sampling command all go through it.

Model convention: `F_fn(x_scaled, t) -> F`, with x_scaled = x_t / sigma_d of shape [B, H, W, C] and
t of shape [B] (radians); F has the shape of x. `conditioned` closes a network over its params,
class labels and guidance (the student's guidance input, or classifier-free guidance of a
conditional diffusion model).

TrigFlow (sCM Sec. 3): x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I), PF-ODE
dx/dt = sigma_d F(x_t / sigma_d, t) (Eq. 3), and denoiser / consistency function
f(x_t, t) = cos(t) x_t - sin(t) sigma_d F (Eq. 5 / 23).
"""
import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import guidance, trigflow

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


def multistep_times(sigma_d: float, steps: int, t_mid: float = T_MID) -> tuple:
    """The times of M-step consistency sampling: (t_max,) for M = 1, (t_max, t_mid) for M = 2
    (the paper's samplers), and for M > 2 t_max followed by M - 1 times spaced evenly in t from
    t_mid down to t_mid / (M - 1).

    The paper reports multistep sCD at M = 2, 4, 8, 16 (Table 6) without its time grid; this one
    extends the 2-step sampler (the same first two times) and spends the extra evaluations on
    the low-noise end that t_mid leaves out.
    """
    if steps < 1:
        raise ValueError(f"multistep sampling needs steps >= 1, got {steps}")
    if steps == 1:
        return one_step_times(sigma_d)
    return (trigflow.t_max(sigma_d),) + tuple(
        float(t_mid) * (steps - 1 - i) / (steps - 1) for i in range(steps - 1))


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
# The entry point.

METHOD_KINDS = ("consistency", "ode")


@dataclasses.dataclass(frozen=True)
class Method:
    """How to sample: a consistency model over `times`, or an ODE solver for a diffusion model."""

    kind: str                  # 'consistency' | 'ode'
    times: tuple = ()          # consistency: strictly decreasing times in (0, pi/2)
    steps: int = 0             # ode: solver steps (NFE 2N - 1)
    solver: str = "dpm2s"      # ode: 'dpm2s' | 'heun'

    def __post_init__(self):
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"unknown sampling method {self.kind!r}; expected one of {METHOD_KINDS}")
        if self.kind == "consistency":
            object.__setattr__(self, "times", _check_times(self.times))
        else:
            if self.steps < 1:
                raise ValueError(f"an ODE sampler needs steps >= 1, got {self.steps}")
            if self.solver not in SOLVERS:
                raise ValueError(f"unknown solver {self.solver!r}; options are {SOLVERS}")

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (CFG's doubled batch counts once)."""
        return len(self.times) if self.kind == "consistency" else nfe(self.steps)


def consistency(times: Sequence[float]) -> Method:
    """Multistep consistency sampling over `times` (len(times) evaluations)."""
    return Method("consistency", times=tuple(times))


def one_step(sigma_d: float) -> Method:
    return consistency(one_step_times(sigma_d))


def two_step(sigma_d: float, t_mid: float = T_MID) -> Method:
    return consistency(two_step_times(sigma_d, t_mid))


def multistep(sigma_d: float, steps: int, t_mid: float = T_MID) -> Method:
    """M-step consistency sampling (`multistep_times`); M = 1, 2 are `one_step`, `two_step`."""
    return consistency(multistep_times(sigma_d, steps, t_mid))


def ode(steps: int, solver: str = "dpm2s") -> Method:
    """A teacher ODE solver on EDM's grid with `steps` steps (2 steps - 1 evaluations)."""
    return Method("ode", steps=int(steps), solver=solver)


def solves_ode(objective) -> bool:
    """Whether `objective`'s model is sampled by an ODE solver (a diffusion teacher, its
    `sampler` 'ode') rather than by consistency steps (its `sampler` 'consistency')."""
    if objective.sampler not in ("ode", "consistency"):
        raise ValueError(f"objective sampler {objective.sampler!r}: expected 'ode' or "
                         f"'consistency'")
    return objective.sampler == "ode"


def method_for(objective, steps: int, *, t_mid: float = T_MID, solver: str = "dpm2s") -> Method:
    """How `objective`'s model is sampled in `steps`: its ODE solver in `steps` solver steps
    (`ode`) for a diffusion model, else `steps`-step consistency sampling (`multistep`)."""
    if solves_ode(objective):
        return ode(steps, solver)
    return multistep(objective.sigma_d, steps, t_mid)


def sample(F_fn: FFn, key: jax.Array, shape, sigma_d: float, method: Method,
           dtype=jnp.float32) -> jax.Array:
    """Samples [*shape] from the model F_fn by `method` (see `cm_sample`, `teacher_sample`)."""
    if method.kind == "consistency":
        return cm_sample(F_fn, key, shape, sigma_d, method.times, dtype=dtype)
    return teacher_sample(F_fn, key, shape, sigma_d, num_steps=method.steps,
                          solver=method.solver, dtype=dtype)


def conditioned(net_fn: Callable, params, labels=None, *, num_classes: int = 0,
                guidance_input: bool = False, scale=1.0, guide=None) -> FFn:
    """F_fn(x_scaled, t) of `net_fn(params, x, t, cond)` for `labels` [B] at guidance `scale`.

    A guided student (guidance_input) takes the scale as its input (sCM Sec. 7); a conditional
    model without that input is classifier-free guided, its conditional and unconditional
    passes batched together (`guidance.guided`); scale 1.0 is the plain conditional model.
    An unconditional model (num_classes = 0) ignores labels. With `guide` = (guide_fn,
    conditional), the unconditional branch is another network instead (EDM2's guiding network:
    F_g + scale (F - F_g)); `params` is then {'net': ..., 'guide': ...}.
    """
    if guide is not None:
        guide_fn, guide_conditional = guide
        net_params = params["net"]

        def guided_by_network(x, t):
            cond = {"y": labels} if num_classes else {}
            F_cond = net_fn(net_params, x, t, cond)
            if guidance.is_unguided(scale):
                return F_cond
            F_guide = guide_fn(params["guide"], x, t, cond if guide_conditional else {})
            return guidance.classifier_free_guidance(F_cond, F_guide, scale)

        return guided_by_network

    def with_labels(x, t, y):
        cond = {"y": y} if num_classes else {}
        if guidance_input:
            cond["guidance"] = jnp.full((x.shape[0],), scale, jnp.float32)
        return net_fn(params, x, t, cond)

    if num_classes and not guidance_input:
        return guidance.guided(with_labels, labels, num_classes, scale)
    return lambda x, t: with_labels(x, t, labels)


def sampler(net_fn: Callable, image_shape, sigma_d: float, method: Method, *,
            num_classes: int = 0, guidance_input: bool = False, scale=1.0, out_sharding=None,
            guide=None):
    """A jitted draw(params, key, labels [N]) -> samples [N, *image_shape] of one network (or
    of a network guided by another: `guide`, see `conditioned`).

    `out_sharding` (e.g. replicated over the training mesh) places the result; by default XLA
    chooses. Every batch size compiles once.
    """
    image_shape = tuple(image_shape)

    def draw(params, key, labels):
        F_fn = conditioned(net_fn, params, labels, num_classes=num_classes,
                           guidance_input=guidance_input, scale=scale, guide=guide)
        return sample(F_fn, key, (labels.shape[0],) + image_shape, sigma_d, method)

    return jax.jit(draw, out_shardings=out_sharding)
