"""Images as the feature networks see them, exactly as the reference implementations prepare
them: samples quantized to 8 bits the way EDM / EDM2 save them, and PyTorch's resizes
(F.interpolate) written out with float64 weights.

    levels = pixel_levels(images)            # uint8 or [-1, 1] float -> 0..255 float32
    x = bilinear_resize(levels / 255, 299)   # FID's Inception (no antialiasing)
    x = resize_antialiased(levels, 224)      # FD-DINOv2 (bicubic, antialiased, a = -0.5)

Shapes: images [B, H, W, C]. jax.image.resize computes its taps in float32, which moves them by
up to ~3e-5 of a pixel at 512 -> 299 / 224; these compute them in float64 at trace time.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def quantize(images):
    """Samples in [-1, 1] -> the 8-bit levels 0..255 (float32) an image file of them would hold:
    clip(floor(x * 127.5 + 128), 0, 255), the rounding EDM / EDM2 (Karras et al. 2022, 2024)
    use when they save samples. FID and FD-DINOv2 compare 8-bit images, so generated samples go
    through the same rounding as the real ones went through. [B, H, W, 3] -> same."""
    x = jnp.asarray(images).astype(jnp.float32)
    return jnp.clip(jnp.floor(x * 127.5 + 128.0), 0.0, 255.0)


def pixel_levels(images):
    """images [B, H, W, 3], uint8 0..255 or float in [-1, 1] -> 0..255 float32 levels (floats
    quantized by `quantize`); ValueError for another shape or dtype."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return quantize(images)
    raise ValueError(f"expected uint8 images (0..255) or float images in [-1, 1], got dtype "
                     f"{images.dtype}")


def to_uint8(images):
    """[-1, 1] float images -> uint8 (`quantize`), as image files of them would hold."""
    return quantize(images).astype(jnp.uint8)


def _bilinear_axis(x, size: int, axis: int):
    """PyTorch's bilinear resize (align_corners=False, no antialiasing) along one axis: output i
    reads the source coordinate s = (i + 0.5) * n / size - 0.5, clamped at 0, from its two
    neighbours floor(s) and floor(s) + 1 (clamped at n - 1). The taps are computed in float64 at
    trace time; jax.image.resize computes them in float32, which moves them by up to ~3e-5 of a
    pixel at 512 -> 299."""
    n = x.shape[axis]
    src = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int32), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = (src - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return (1.0 - frac) * jnp.take(x, lo, axis=axis) + frac * jnp.take(x, hi, axis=axis)


def bilinear_resize(x, size: int):
    """x [B, H, W, C] -> [B, size, size, C]: PyTorch's F.interpolate(mode='bilinear',
    align_corners=False) without antialiasing (also when downscaling), as FID's Inception."""
    for axis in (1, 2):
        if x.shape[axis] != size:
            x = _bilinear_axis(x, size, axis)
    return x


def cubic(x, a):
    """Keys' (1981) cubic convolution kernel with parameter a (0 for |x| >= 2)."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=None)
def antialiased_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 weights of torch's F.interpolate(mode='bicubic', antialias=True,
    align_corners=False) along one axis (PIL's separable filter):

      scale = n_in / n_out, f = max(scale, 1), centre c_i = scale (i + 0.5);
      w_ij = k((j + 0.5 - c_i) / f) for j in [trunc(c_i - 2f + 0.5), trunc(c_i + 2f + 0.5))
      cut to [0, n_in), then normalized to sum 1; k is Keys' cubic with a = -0.5 (as PIL; the
      non-antialiased path uses -0.75).

    Downscaling widens the kernel by f (a low-pass filter); upscaling is bicubic interpolation
    whose taps past the border are dropped and the rest renormalized, not clamped.
    jax.image.resize('bicubic', antialias=True) is this formula but computes the weights in
    float32, where c_i - j loses ~1e-5 of a pixel to cancellation (512 -> 224).
    """
    scale = n_in / n_out
    f = max(scale, 1.0)
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = scale * (i + 0.5)
        j = np.arange(max(int(c - 2 * f + 0.5), 0), min(int(c + 2 * f + 0.5), n_in))
        w = cubic((j + 0.5 - c) / f, -0.5)
        out[i, j] = w / w.sum()
    return out


def resize_antialiased(x, size: int):
    """x [B, H, W, C] -> [B, size, size, C] float32: `antialiased_bicubic_matrix` along H and W,
    float64 weights applied in float32 at full precision."""
    x = jnp.asarray(x, jnp.float32)
    for axis, spec in ((1, "oh,bhwc->bowc"), (2, "ow,bhwc->bhoc")):
        if x.shape[axis] != size:   # n -> n is the identity
            m = antialiased_bicubic_matrix(x.shape[axis], size).astype(np.float32)
            x = jnp.einsum(spec, m, x, precision=HIGHEST)
    return x


