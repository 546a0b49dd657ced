"""TrigFlow: the diffusion parameterization sCM is built on (sCM Sec. 3).

Everything here is plain `jax.numpy` on arrays; no network, no config. Notation follows the
paper: x0 is data with per-dimension std sigma_d, z ~ N(0, sigma_d^2 I), t in [0, pi/2].

Shapes: images are [B, H, W, C]; times `t` are [B] and are broadcast over the image axes.
"""
import math

import jax
import jax.numpy as jnp

# EDM's sigma range, used to define the sampling times (sCM App. G.2, Table 5).
SIGMA_MAX = 80.0
SIGMA_MIN = 0.002


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes per-sample [B] values to broadcast against x [B, ...]."""
    t = jnp.asarray(t)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def add_noise(x0: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = cos(t) x0 + sin(t) z (sCM Sec. 3). x0, z: [B, ...]; t: [B]."""
    t = _bcast(t, x0)
    return jnp.cos(t) * x0 + jnp.sin(t) * z


def velocity_target(x0: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """v_t = dx_t/dt = cos(t) z - sin(t) x0 (sCM Eq. 4); also the sCT tangent estimator."""
    t = _bcast(t, x0)
    return jnp.cos(t) * z - jnp.sin(t) * x0


def sample_time(key: jax.Array, shape, p_mean: float, p_std: float, sigma_d: float) -> jax.Array:
    """Log-normal proposal: tan(t) = exp(tau) / sigma_d with tau ~ N(P_mean, P_std^2) (Alg. 1).

    Computed in float32 whatever the compute dtype.
    """
    tau = p_mean + p_std * jax.random.normal(key, shape, jnp.float32)
    return time_from_sigma(jnp.exp(tau), sigma_d)


def consistency_fn(x_t: jax.Array, t: jax.Array, F: jax.Array, sigma_d: float) -> jax.Array:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t/sigma_d, t) (sCM Eq. 5).

    F is the network output at (x_t / sigma_d, t). f(x, 0) = x by construction. Also the
    TrigFlow denoiser D(x_t, t) (Eq. 23) and one DDIM step from t to 0.
    """
    t = _bcast(t, x_t)
    return jnp.cos(t) * x_t - jnp.sin(t) * sigma_d * F


def ddim_step(x_s: jax.Array, s: jax.Array, t: jax.Array, F_s: jax.Array, sigma_d: float):
    """First-order PF-ODE step from s to t: x_t = cos(s-t) x_s - sin(s-t) sigma_d F(x_s, s) (Eq. 26)."""
    d = _bcast(s - t, x_s)
    return jnp.cos(d) * x_s - jnp.sin(d) * sigma_d * F_s


def time_from_sigma(sigma, sigma_d: float):
    """EDM noise level -> TrigFlow time: t = arctan(sigma / sigma_d) (sCM Eq. 30)."""
    return jnp.arctan(jnp.asarray(sigma) / sigma_d)


def sigma_from_time(t, sigma_d: float):
    """TrigFlow time -> EDM noise level: sigma = sigma_d tan(t) (sCM Eq. 30)."""
    return sigma_d * jnp.tan(jnp.asarray(t))


def edm_to_trigflow_x(x_sigma: jax.Array, sigma, sigma_d: float) -> jax.Array:
    """EDM's VE sample x_sigma = x0 + sigma eps -> TrigFlow x_t = cos(t) x_sigma (sCM Eq. 30)."""
    t = time_from_sigma(sigma, sigma_d)
    return _bcast(jnp.cos(t), x_sigma) * x_sigma


def trigflow_to_edm_x(x_t: jax.Array, t, sigma_d: float) -> jax.Array:
    """Inverse of `edm_to_trigflow_x`: x_sigma = x_t / cos(t)."""
    return x_t / _bcast(jnp.cos(jnp.asarray(t)), x_t)


def schedule_to_trigflow(x_tp: jax.Array, alpha, sigma, sigma_d: float):
    """General schedule x' = alpha x0 + sigma eps (eps ~ N(0, I)) -> TrigFlow (sCM Eq. 29).

    Returns (x_t, t) with t = arctan(sigma / (sigma_d alpha)) and
    x_t = sigma_d / sqrt(alpha^2 sigma_d^2 + sigma^2) * x'.
    """
    alpha = jnp.asarray(alpha)
    sigma = jnp.asarray(sigma)
    t = jnp.arctan(sigma / (sigma_d * alpha))
    scale = sigma_d / jnp.sqrt(alpha**2 * sigma_d**2 + sigma**2)
    return _bcast(scale, x_tp) * x_tp, t


def edm_denoiser_to_F(x_t: jax.Array, t: jax.Array, denoised: jax.Array, sigma_d: float):
    """F implied by a denoiser output D(x_t, t) ~ E[x0 | x_t]: inverts Eq. 23.

    F = (cos(t) x_t - D) / (sin(t) sigma_d). Lets an EDM denoiser act as a TrigFlow teacher.
    """
    tb = _bcast(t, x_t)
    return (jnp.cos(tb) * x_t - denoised) / (jnp.sin(tb) * sigma_d)


def t_max(sigma_d: float, sigma_max: float = SIGMA_MAX) -> float:
    """Starting time of 1-step sampling: arctan(sigma_max / sigma_d), not pi/2 (Table 5)."""
    return math.atan(sigma_max / sigma_d)


def log_snr(t):
    """log SNR(t) = -2 log tan(t), independent of sigma_d (sCM Eq. 34)."""
    return -2.0 * jnp.log(jnp.tan(t))
