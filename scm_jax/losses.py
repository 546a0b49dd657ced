"""Training objectives: TrigFlow diffusion (teacher), continuous-time sCM, discrete-time CM.

Every objective is split in two passes, as DESIGN.md §3 prescribes:

1. `*_targets(...)`: everything that is not differentiated: sampling (t, z, x_t), the teacher, and
   for sCM the tangent `jax.jvp` of the student at stop-gradient parameters. Returns `Targets`.
2. `weighted_regression(...)`: the one differentiated pass, `F_theta` at the same inputs with the
   same dropout key, and the adaptive weighting w_phi(t) of EDM2 / sCM Eq. 8.

Network functions have the form `net_fn(params, x_scaled, t, cond, dropout_key) -> F` (see
`networks.bind_apply`); `cond` holds optional 'y' labels and 'guidance' scales, constants with
zero tangent. t, the embedding inputs, g, its norm and the loss are float32.

Shapes: x0 [B, H, W, C]; t [B]; cond entries [B].
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from scm_jax import trigflow
from scm_jax.sampling import classifier_free_guidance

TANGENT_NORMS = ("l2", "rms", "clip", "none")
PRIOR_WEIGHTINGS = ("paper", "uniform")


@struct.dataclass
class Targets:
    """Inputs of the differentiated pass; all stop-gradient.

    x_scaled: [B,H,W,C] network input x_t / sigma_d; t: [B]; cond: dict of [B] arrays;
    target: [B,H,W,C], either the regression target (diffusion) or g (consistency, where the
    residual is F - stopgrad(F) - g); dropout_key: the key both passes share.
    """

    x_scaled: jax.Array
    t: jax.Array
    cond: dict
    target: jax.Array
    dropout_key: jax.Array
    consistency: bool = struct.field(pytree_node=False)


def _f32(a):
    """At least float32: bf16/f16 network outputs are upcast, float64 (tests) is kept."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _bcast(a, x):
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _per_sample_sq_norm(a):
    return jnp.sum(jnp.square(_f32(a)), axis=tuple(range(1, a.ndim)))


def draw_noisy(key, x0, *, sigma_d, p_mean, p_std):
    """t from the log-normal proposal, z ~ N(0, sigma_d^2 I), x_t (Alg. 1 lines 1-3)."""
    k_t, k_z = jax.random.split(key)
    t = trigflow.sample_time(k_t, x0.shape[:1], p_mean, p_std, sigma_d)
    z = sigma_d * jax.random.normal(k_z, x0.shape, jnp.float32)
    return t, z, trigflow.add_noise(x0.astype(jnp.float32), z, t)


# ---------------------------------------------------------------------------------------------
# Diffusion (teacher): || F - v_t / sigma_d ||^2 with adaptive weighting (sCM Eq. 4, App. D).
# ---------------------------------------------------------------------------------------------
def diffusion_targets(key, x0, cond, *, sigma_d, p_mean, p_std) -> Targets:
    """EDM2-style diffusion targets in TrigFlow: target = v_t / sigma_d (digest §1)."""
    k_noise, k_drop = jax.random.split(key)
    t, z, x_t = draw_noisy(k_noise, x0, sigma_d=sigma_d, p_mean=p_mean, p_std=p_std)
    target = trigflow.velocity_target(x0.astype(jnp.float32), z, t) / sigma_d
    return Targets(x_t / sigma_d, t, cond, target, k_drop, consistency=False)


# ---------------------------------------------------------------------------------------------
# Continuous-time sCM (Alg. 1, Eq. 6-8).
# ---------------------------------------------------------------------------------------------
def scm_tangent(net_fn, params, x_t, t, dxdt, cond, dropout_key, *, sigma_d, warmup_ratio,
                prior_weighting="paper"):
    """g = cos(t) df^-/dt with tangent warmup, via the rearranged JVP (sCM Sec. 5.1, Alg. 1).

    One `jax.jvp` of F^- at primal (x_t/sigma_d, t) with tangents (cos t sin t dx_t/dt,
    cos t sin t sigma_d) returns F^- and sigma_d cos t sin t dF^-/dt (digest §3.8: sigma_d is
    already inside the result, not multiplied again). Then
        g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt).
    `params` must already be stop-gradient. Returns (F^- [B,...], g [B,...]) in float32.
    prior_weighting='uniform' replaces w(t) = 1/(sigma_d tan t) of Eq. 8 by 1, i.e. multiplies
    g by sigma_d tan t.
    """
    cs = _bcast(jnp.cos(t) * jnp.sin(t), x_t)
    fn = lambda x, tt: net_fn(params, x, tt, cond, dropout_key)  # noqa: E731
    F_minus, dF = jax.jvp(fn, (x_t / sigma_d, t),
                          (cs * dxdt, jnp.cos(t) * jnp.sin(t) * sigma_d))
    F_minus = _f32(F_minus)
    cos_t = _bcast(jnp.cos(t), x_t)
    g = -jnp.square(cos_t) * (sigma_d * F_minus - dxdt)
    g = g - warmup_ratio * (cs * x_t + _f32(dF))
    if prior_weighting == "uniform":
        g = g * _bcast(sigma_d * jnp.tan(t), x_t)
    return F_minus, g


def normalize_tangent(g, *, kind="l2", c=0.1):
    """Tangent normalization g / (||g|| + c) with the per-sample l2 norm (sCM Sec. 4.2).

    'rms' divides by ||g||/sqrt(D) + c instead (changes the effective c by sqrt(D), digest §9.5);
    'clip' is clip(g, -1, 1) (Fig. 5a); 'none' leaves g alone.
    """
    if kind == "l2":
        return g / (_bcast(jnp.sqrt(_per_sample_sq_norm(g)), g) + c)
    if kind == "rms":
        d = np.prod(g.shape[1:])
        return g / (_bcast(jnp.sqrt(_per_sample_sq_norm(g) / d), g) + c)
    if kind == "clip":
        return jnp.clip(g, -1.0, 1.0)
    if kind == "none":
        return g
    raise ValueError(f"unknown tangent normalization {kind!r}; expected one of {TANGENT_NORMS}")


def warmup_ratio(step, warmup_steps):
    """r = min(1, step / H) (Alg. 1); H counts optimizer steps. H = 0 disables warmup."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def teacher_velocity(teacher_fn, teacher_params, x_t, t, cond, *, sigma_d, guidance_scale=None,
                     null_label=None):
    """dx_t/dt = sigma_d F_pretrain(x_t/sigma_d, t), CFG-guided when a scale is given (Alg. 1).

    guidance_scale: None (no guidance) or [B] scales; with it, the conditional and unconditional
    teacher passes run as one batch and are combined as F_u + s (F_c - F_u).
    """
    x = x_t / sigma_d
    # The teacher sees labels only: the guidance scale is an input of the student alone.
    teacher_cond = {"y": cond["y"]} if cond.get("y") is not None else {}
    if guidance_scale is None:
        return sigma_d * _f32(teacher_fn(teacher_params, x, t, teacher_cond))
    y = teacher_cond["y"]
    both = {"y": jnp.concatenate([y, jnp.full_like(y, null_label)])}
    F = teacher_fn(teacher_params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    F_c, F_u = jnp.split(_f32(F), 2)
    return sigma_d * classifier_free_guidance(F_c, F_u, _bcast(guidance_scale, x))


def scm_targets(key, x0, cond, *, net_fn, params, step, sigma_d, p_mean, p_std, tangent_c,
                warmup_steps, tangent_norm="l2", prior_weighting="paper", teacher=None) -> Targets:
    """Targets of sCT (teacher=None: dx/dt = cos t z - sin t x0) or sCD (Alg. 1).

    teacher: a function (x_t, t, cond) -> dx_t/dt for sCD (see `teacher_velocity`).
    """
    k_noise, k_drop = jax.random.split(key)
    t, z, x_t = draw_noisy(k_noise, x0, sigma_d=sigma_d, p_mean=p_mean, p_std=p_std)
    if teacher is None:
        dxdt = trigflow.velocity_target(x0.astype(jnp.float32), z, t)
    else:
        dxdt = teacher(x_t, t, cond)
    _, g = scm_tangent(net_fn, jax.lax.stop_gradient(params), x_t, t, dxdt, cond, k_drop,
                       sigma_d=sigma_d, warmup_ratio=warmup_ratio(step, warmup_steps),
                       prior_weighting=prior_weighting)
    g = normalize_tangent(g, kind=tangent_norm, c=tangent_c)
    return jax.lax.stop_gradient(Targets(x_t / sigma_d, t, cond, g, k_drop, consistency=True))


# ---------------------------------------------------------------------------------------------
# Discrete-time consistency distillation baseline (sCM App. E, Alg. 2; Fig. 5c).
# ---------------------------------------------------------------------------------------------
def discrete_time_grid(num_points, sigma_d, sigma_min=trigflow.SIGMA_MIN,
                       sigma_max=trigflow.SIGMA_MAX, rho=7.0):
    """t_0 = 0 < t_1 < ... < t_N: EDM's Karras sigmas mapped by t = arctan(sigma/sigma_d).

    Returns (t [N+1], sigma [N+1]) as numpy float64, increasing, with sigma_0 = 0.
    """
    ramp = np.linspace(0.0, 1.0, num_points)
    sig = (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    sig = np.concatenate([[0.0], sig])
    return np.arctan(sig / sigma_d), sig


def discrete_time_probs(sigmas, p_mean, p_std):
    """P(index i) for i = 1..N: the log-normal proposal's mass between sigma_{i-1} and sigma_i.

    The categorical split of the same log-normal (App. E); the tail above sigma_N goes to N.
    """
    from scipy.stats import norm as normal_dist

    cdf = normal_dist.cdf((np.log(np.maximum(sigmas, 1e-300)) - p_mean) / p_std)
    cdf[0] = 0.0
    cdf[-1] = 1.0
    return np.diff(cdf)


def discrete_tangent(net_fn, params, teacher, x_t, t, t_prev, cond, dropout_key, *, sigma_d,
                     warmup_ratio):
    """Finite-difference tangent of dsCD: Delta = (f^-(x_t, t) - f^-(x_t', t')) / sin(t - t').

    x_t' is the teacher's DDIM step from t to t'. Written out (our derivation, with Delta -> df/dt
    as t' -> t; the r factor multiplies the second term as in Alg. 1):
        Delta = -cos t' (sigma_d F^-(x_t,t) - dx/dt) - r sin t' (x_t + sigma_d (cos(t-t')
                F^-(x_t,t) - F^-(x_t',t')) / sin(t-t')),   dx/dt = sigma_d F_teacher(x_t, t).
    Returns g = cos(t) Delta (float32), before normalization.
    """
    dxdt = teacher(x_t, t, cond)
    delta = t - t_prev
    x_prev = trigflow.ddim_step(x_t, t, t_prev, dxdt / sigma_d, sigma_d)
    F_t = _f32(net_fn(params, x_t / sigma_d, t, cond, dropout_key))
    F_prev = _f32(net_fn(params, x_prev / sigma_d, t_prev, cond, dropout_key))
    cos_d, sin_d = _bcast(jnp.cos(delta), x_t), _bcast(jnp.sin(delta), x_t)
    first = -_bcast(jnp.cos(t_prev), x_t) * (sigma_d * F_t - dxdt)
    second = _bcast(jnp.sin(t_prev), x_t) * (x_t + sigma_d * (cos_d * F_t - F_prev) / sin_d)
    return _bcast(jnp.cos(t), x_t) * (first - warmup_ratio * second)


def discrete_cm_targets(key, x0, cond, *, net_fn, params, teacher, step, sigma_d, p_mean, p_std,
                        num_points, tangent_c, warmup_steps, tangent_norm="l2") -> Targets:
    """Targets of the discrete-time baseline dsCD with an N-point grid (Alg. 2)."""
    k_i, k_z, k_drop = jax.random.split(key, 3)
    grid, sigmas = discrete_time_grid(num_points, sigma_d)
    probs = discrete_time_probs(sigmas, p_mean, p_std)
    idx = 1 + jax.random.choice(k_i, num_points, x0.shape[:1], p=jnp.asarray(probs, jnp.float32))
    grid = jnp.asarray(grid, jnp.float32)
    t, t_prev = grid[idx], grid[idx - 1]
    z = sigma_d * jax.random.normal(k_z, x0.shape, jnp.float32)
    x_t = trigflow.add_noise(x0.astype(jnp.float32), z, t)
    g = discrete_tangent(net_fn, jax.lax.stop_gradient(params), teacher, x_t, t, t_prev, cond,
                         k_drop, sigma_d=sigma_d, warmup_ratio=warmup_ratio(step, warmup_steps))
    g = normalize_tangent(g, kind=tangent_norm, c=tangent_c)
    return jax.lax.stop_gradient(Targets(x_t / sigma_d, t, cond, g, k_drop, consistency=True))


# ---------------------------------------------------------------------------------------------
# The differentiated pass, shared by all objectives (Eq. 8 / EDM2 adaptive weighting).
# ---------------------------------------------------------------------------------------------
def weighted_regression(params, targets: Targets, *, net_fn, weight_fn):
    """(e^{w(t)} / D) ||residual||^2 - w(t), averaged over the batch. Returns (loss, metrics).

    Diffusion: residual = F - target. Consistency: residual = F - stopgrad(F) - g, whose value is
    -g exactly and whose gradient pushes F along +g (Alg. 1).
    params: {'net': ..., 'weight': ...}.
    """
    F = net_fn(params["net"], targets.x_scaled, targets.t, targets.cond,
               targets.dropout_key)
    F = _f32(F)
    if targets.consistency:
        residual = F - jax.lax.stop_gradient(F) - targets.target
    else:
        residual = F - targets.target
    w = _f32(weight_fn(params["weight"], targets.t))
    d = np.prod(F.shape[1:])
    raw = _per_sample_sq_norm(residual) / d
    loss = jnp.mean(jnp.exp(w) * raw - w)
    metrics = {"loss": loss, "raw_loss": jnp.mean(raw), "weight_mean": jnp.mean(w)}
    if targets.consistency:
        metrics["tangent_norm"] = jnp.mean(jnp.sqrt(_per_sample_sq_norm(targets.target)))
    return loss, metrics

