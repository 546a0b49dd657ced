"""The discrete-time consistency distillation baseline dsCD (sCM App. E, Alg. 2; Fig. 5c).

The tangent of `scm.SCM` is replaced by a finite difference on an N-point grid: EDM's Karras
sigmas (rho = 7, sigma in [0.002, 80]) mapped to t = arctan(sigma / sigma_d), t_0 = 0, with t
drawn from a categorical split of the same log-normal proposal, and x_t' the teacher's DDIM step
from t to the previous grid point t'.
"""
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import trigflow
from scm_jax.errors import check
from scm_jax.objectives.consistency import (ConsistencyObjective, extend, normalize_tangent,
                                            warmup_ratio)
from scm_jax.objectives.randomness import GRID_INDEX, NOISE, Randomness
from scm_jax.objectives.regression import Targets, bcast, f32


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
    F_t = f32(net_fn(params, x_t / sigma_d, t, cond, dropout_key))
    F_prev = f32(net_fn(params, x_prev / sigma_d, t_prev, cond, dropout_key))
    cos_d, sin_d = bcast(jnp.cos(delta), x_t), bcast(jnp.sin(delta), x_t)
    first = -bcast(jnp.cos(t_prev), x_t) * (sigma_d * F_t - dxdt)
    second = bcast(jnp.sin(t_prev), x_t) * (x_t + sigma_d * (cos_d * F_t - F_prev) / sin_d)
    return bcast(jnp.cos(t), x_t) * (first - warmup_ratio * second)


def discrete_cm_targets(rng: Randomness, x0, cond, *, net_fn, params, teacher, step, sigma_d,
                        p_mean, p_std, num_points, tangent_c, warmup_steps,
                        tangent_norm="l2") -> Targets:
    """Targets of the discrete-time baseline dsCD with an N-point grid (Alg. 2)."""
    k_drop = rng.dropout_key
    grid, sigmas = discrete_time_grid(num_points, sigma_d)
    probs = discrete_time_probs(sigmas, p_mean, p_std)
    idx = 1 + rng.choice(GRID_INDEX, num_points, jnp.asarray(probs, jnp.float32))
    grid = jnp.asarray(grid, jnp.float32)
    t, t_prev = grid[idx], grid[idx - 1]
    z = sigma_d * rng.normal(NOISE, x0.shape[1:])
    x_t = trigflow.add_noise(x0.astype(jnp.float32), z, t)
    g = discrete_tangent(net_fn, jax.lax.stop_gradient(params), teacher, x_t, t, t_prev, cond,
                         k_drop, sigma_d=sigma_d, warmup_ratio=warmup_ratio(step, warmup_steps))
    g = normalize_tangent(g, kind=tangent_norm, c=tangent_c)
    return jax.lax.stop_gradient(Targets(x_t / sigma_d, t, cond, g, k_drop, consistency=True))


class DiscreteCM(ConsistencyObjective):
    """dsCD: consistency distillation with a finite-difference tangent on N grid points."""

    name = "discrete"
    SCHEMA = extend(ConsistencyObjective.SCHEMA, loss=dict(num_points=1024))  # N of Alg. 2
    IDENTITY_KEYS = ()

    @classmethod
    def check_section(cls, config, where: str) -> None:
        super().check_section(config, where)
        n = config[where].loss.num_points
        check(n >= 2, f"{where}.loss.num_points", n, ">= 2")

    @property
    def distills(self) -> bool:
        return True

    def targets(self, rng, batch, params, step, teacher, teacher_params) -> Targets:
        return discrete_cm_targets(rng, batch["image"], self.conditioning(rng, batch),
                                   net_fn=self.net_tangent, params=params["net"],
                                   teacher=self.teacher_velocity(teacher, teacher_params),
                                   step=step, num_points=self.cfg.loss.num_points,
                                   **self.loss_settings())
