"""Exponential moving averages of the parameters used for evaluation and for initializing CMs.

Two profiles (sCM App. G.2):
- 'power': EDM2's power-function EMA with relative std sigma_rel; beta_t = (1 - 1/t)^(gamma + 1)
  where gamma solves sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (EDM2 Eq. 3).
- 'halflife': a classic EMA whose half-life is given in training images (CIFAR: 0.5 Mimg).
"""
import jax
import jax.numpy as jnp
import numpy as np

EMA_KINDS = ("power", "halflife")


def power_ema_exponent(sigma_rel: float) -> float:
    """gamma of EDM2's power EMA: the real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2."""
    if not 0.0 < sigma_rel < 0.28:
        raise ValueError(f"power EMA sigma_rel must be in (0, 0.28), got {sigma_rel}")
    inv = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def ema_decay(kind: str, value: float, step, batch_size: int):
    """beta for the update after optimizer step `step` (0-based), as a float32 scalar."""
    if kind == "power":
        gamma = power_ema_exponent(value)
        t = jnp.asarray(step, jnp.float32) + 1.0
        return (1.0 - 1.0 / t) ** (gamma + 1.0)
    if kind == "halflife":
        if value <= 0:
            raise ValueError(f"EMA half-life must be > 0 images, got {value}")
        return jnp.float32(0.5 ** (batch_size / value))
    raise ValueError(f"unknown ema.kind {kind!r}; expected one of {EMA_KINDS}")


def update_ema(ema, params, beta):
    """ema <- beta ema + (1 - beta) params, leaf by leaf."""
    return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p.astype(e.dtype), ema, params)
