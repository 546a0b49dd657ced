"""Classifier-free guidance (Ho & Salimans 2022), as sCD distills a guided teacher (sCM Sec. 7)
and as the samplers guide a conditional diffusion model: one combination and one batching.

`F_fn(x_scaled, t, y) -> F` is a class-conditional network with its parameters bound; label
`null_label` (= num_classes) is the unconditional input that label dropout trained.
"""
import jax
import jax.numpy as jnp


def classifier_free_guidance(F_cond: jax.Array, F_uncond: jax.Array, scale) -> jax.Array:
    """F_uncond + scale (F_cond - F_uncond); scale 1 is conditional, 0 unconditional.

    F_cond, F_uncond: [B, ...]; scale: scalar or per-sample [B] (broadcast over trailing axes).
    Written as the lerp scale F_cond + (1 - scale) F_uncond, the same value, so that scale = 1
    (and 0) returns the conditional (unconditional) output bit-exactly. Since the TrigFlow
    denoiser is affine in F (sCM Eq. 23), guiding F guides the denoiser identically.
    """
    scale = jnp.asarray(scale)
    scale = scale.reshape(scale.shape + (1,) * (F_cond.ndim - scale.ndim)).astype(F_cond.dtype)
    return scale * F_cond + (1 - scale) * F_uncond


def is_unguided(scale) -> bool:
    """True when `scale` is the Python number 1 (guidance is then the conditional output)."""
    return isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale == 1.0


def guided(F_fn, labels: jax.Array, null_label, scale):
    """The guided network (x_scaled [B, ...], t [B]) -> F [B, ...] for `labels` [B].

    Both branches run as one call on a 2B batch (conditional rows first, then `null_label`), so
    the network sees one large batch. `scale` is a scalar or [B]; the Python number 1 skips the
    unconditional branch, since guidance then equals the conditional output.
    """
    if is_unguided(scale):
        return lambda x, t: F_fn(x, t, labels)
    labels = jnp.asarray(labels)
    null = jnp.broadcast_to(jnp.asarray(null_label, labels.dtype), labels.shape)
    both = jnp.concatenate([labels, null], axis=0)

    def F_guided(x, t):
        out = F_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        F_cond, F_uncond = jnp.split(out, 2, axis=0)
        return classifier_free_guidance(F_cond, F_uncond, scale)

    return F_guided
