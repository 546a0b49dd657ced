"""Magnitude-preserving (MP) primitives of EDM2 (Karras et al. 2024, config G).

Every primitive keeps unit-variance inputs at unit variance, so activations and their JVP
tangents keep their scale through the whole U-Net without normalization layers. Weights of MP
layers are stored unnormalized under the param name `MP_WEIGHT` and normalized inside the forward
(`normalize`, a pure function); the in-place "forced" weight normalization of EDM2 is a
projection after each optimizer step (`edm2.project_params`), never part of the forward.

Layouts are Flax's: activations [..., C], conv kernels [kh, kw, C_in, C_out], dense [C_in, C_out].
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.networks.layers import DENSE_AXES, at_least_f32, positional_embedding

# The param name every MP layer stores its weight under; `edm2.project_params` finds weights by it.
MP_WEIGHT = "mp_weight"
CONV_AXES = ("conv_height", "conv_width", "embed_in", "embed_out")


# normalize(x) = x / (eps + ||x|| / sqrt(N)) over `axis` (EDM2 Eq. 66 for weights; for activations
# over channels it is EDM2's pixel norm, Fig. 21). The norm is taken in float32 at least.
def normalize(x: jax.Array, axis=-1, eps: float = 1e-4) -> jax.Array:
    x32 = x.astype(at_least_f32(x.dtype))
    rms = jnp.sqrt(jnp.mean(jnp.square(x32), axis=axis, keepdims=True))
    return x / (eps + rms).astype(x.dtype)


def normalize_weight(w: jax.Array) -> jax.Array:
    """Unit RMS per output channel (the last axis), in w's dtype: EDM2 Eq. 66."""
    return normalize(w.astype(at_least_f32(w.dtype)), axis=tuple(range(w.ndim - 1))).astype(w.dtype)


# The forced-normalization projection: exactly unit RMS per output channel. EDM2 divides by
# eps + rms here too, which is not idempotent (its fixed point is rms = 1 - eps, reached only in
# the limit); dividing by max(rms, eps) is, and differs from it by O(eps) only.
def project_weight(w: jax.Array, eps: float = 1e-4) -> jax.Array:
    w32 = w.astype(at_least_f32(w.dtype))
    rms = jnp.sqrt(jnp.mean(jnp.square(w32), axis=tuple(range(w.ndim - 1)), keepdims=True))
    return (w32 / jnp.maximum(rms, eps)).astype(w.dtype)


# mp_silu(x) = silu(x) / 0.596, where 0.596 = sqrt(E[silu(z)^2]) for z ~ N(0, 1) (EDM2 Eq. 81).
def mp_silu(x: jax.Array) -> jax.Array:
    return nn.silu(x) / 0.596


# mp_sum(a, b) = ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (EDM2 Eq. 88). The constants are
# Python floats (weakly typed): a numpy scalar would promote bfloat16 activations to float32.
def mp_sum(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    return (a + t * (b - a)) / float(np.sqrt((1 - t) ** 2 + t ** 2))


# mp_cat: concatenation over channels weighted so each part contributes by balance t and the
# result keeps unit RMS (EDM2 Eq. 103). a: [..., Na], b: [..., Nb] -> [..., Na + Nb].
def mp_cat(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    na, nb = a.shape[-1], b.shape[-1]
    c = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return jnp.concatenate([a * float(c / np.sqrt(na) * (1 - t)),
                            b * float(c / np.sqrt(nb) * t)], axis=-1)


# MP positional features: sqrt(2) [cos(c w_k), sin(c w_k)] has unit RMS like EDM2's MPFourier
# (Eq. 75), but with the deterministic low frequencies sCM needs (Sec. 4.1). c: [B] -> [B, N].
def mp_positional_features(c: jax.Array, num_channels: int) -> jax.Array:
    return positional_embedding(c, num_channels) * np.sqrt(2.0)


# EDM2's MPFourier draws its buffers once from torch's global generator; here they are drawn
# from numpy's with a fixed seed, so every init (whatever its key) gives the same ones.
MP_FOURIER_SEED = 0


def mp_fourier_buffers(num_channels: int, bandwidth: float = 1.0,
                       seed: int = MP_FOURIER_SEED) -> tuple[np.ndarray, np.ndarray]:
    """EDM2's MPFourier buffers, drawn as EDM2 draws them (EDM2 Eq. 75): freqs = 2 pi N(0, 1)
    bandwidth and phases = 2 pi U[0, 1), each [num_channels] float64 (numpy)."""
    rng = np.random.default_rng(seed)
    freqs = 2 * np.pi * rng.standard_normal(num_channels) * bandwidth
    return freqs, 2 * np.pi * rng.random(num_channels)


class MPFourier(nn.Module):
    """EDM2's magnitude-preserving Fourier features (EDM2 Eq. 75): c [B] -> [B, N],

        y = sqrt(2) cos(c freqs + phases),   freqs, phases: [N],

    unit RMS for random phases. freqs and phases are params (`freqs`, `phases`) so that an
    imported EDM2 network (`edm2_names.params_from_edm2`) can carry its own buffers, but they
    are constants of the network: the forward reads them through `jax.lax.stop_gradient`, so
    their gradient is exactly zero, and Adam / RAdam with a zero gradient and no weight decay
    (`scm_jax.optimizers` has none) leave them unchanged. Initialized by `mp_fourier_buffers`.
    Computed in float32 at least (float64 stays float64), as EDM2 computes it in float32.
    """

    num_channels: int
    bandwidth: float = 1.0

    @nn.compact
    def __call__(self, c: jax.Array) -> jax.Array:
        def init(which):
            def draw(key, shape, dtype=jnp.float32):   # the key is unused: a fixed seed
                del key
                return jnp.asarray(mp_fourier_buffers(shape[0], self.bandwidth)[which], dtype)
            return nn.with_logical_partitioning(draw, ("embed_in",))

        freqs = self.param("freqs", init(0), (self.num_channels,), jnp.float32)
        phases = self.param("phases", init(1), (self.num_channels,), jnp.float32)
        dtype = at_least_f32(c.dtype)
        freqs, phases = (jax.lax.stop_gradient(v).astype(dtype) for v in (freqs, phases))
        angles = c.astype(dtype)[:, None] * freqs[None, :] + phases[None, :]
        return jnp.cos(angles) * float(np.sqrt(2.0))


class MPConv(nn.Module):
    """MP convolution (kernel_size (kh, kw)) or dense layer (kernel_size ()): EDM2 Eq. 47.

    w = normalize(w) * gain / sqrt(fan_in), then an ordinary conv / matmul in `dtype` (the weight
    is normalized in float32 at least, then cast). Weights are initialized N(0, 1); their scale
    never matters to the output. x: [..., C_in] (dense) or [B, H, W, C_in] (conv).
    """

    features: int
    kernel_size: Sequence[int] = ()
    axes: Sequence[str] | None = None   # logical axis names; CONV_AXES / DENSE_AXES by default
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, gain=1.0) -> jax.Array:
        ks = tuple(self.kernel_size)
        if len(ks) not in (0, 2):
            raise ValueError(f"MPConv kernel_size must be () or (kh, kw), got {ks}")
        axes = tuple(self.axes) if self.axes is not None else (CONV_AXES if ks else DENSE_AXES)
        shape = ks + (x.shape[-1], self.features)
        w = self.param(MP_WEIGHT, nn.with_logical_partitioning(nn.initializers.normal(1.0), axes),
                       shape, self.param_dtype)
        fan_in = int(np.prod(shape[:-1]))
        w = normalize_weight(w.astype(at_least_f32(w.dtype))) * (gain / np.sqrt(fan_in))
        w = w.astype(self.dtype)
        x = x.astype(self.dtype)
        if not ks or ks == (1, 1):
            return x @ w.reshape(-1, self.features)
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
