"""Pixel preprocessing shared by the image pipelines and the latent-encoding script.

ImageNet images come in every size; the paper uses ADM's preprocessing, as EDM2 does (sCM
App. G): repeatedly halve with a box filter while the short side is at least twice the target, then
resize the short side to the target with a bicubic filter and take the center square. The
halvings are kept, although PIL's bicubic filter antialiases on its own, so that the pixels are
the ones those models were trained on.
"""
import numpy as np
import PIL.Image


def adm_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """ADM-style resize of the short side plus center crop.

    image: uint8 [H, W, 3] (or [H, W] / [H, W, 1] grayscale, repeated to 3 channels).
    Returns uint8 [resolution, resolution, 3].
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution}")
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.shape[2:] not in ((), (3,)):
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if image.shape[:2] == (resolution, resolution):
        return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    pil = PIL.Image.fromarray(image).convert("RGB")
    while min(pil.size) >= 2 * resolution:
        pil = pil.resize((pil.width // 2, pil.height // 2), resample=PIL.Image.BOX)
    scale = resolution / min(pil.size)
    # max(): a rounding of width * scale must never fall below the crop size.
    size = tuple(max(resolution, round(s * scale)) for s in pil.size)
    pil = pil.resize(size, resample=PIL.Image.BICUBIC)
    arr = np.asarray(pil)  # [h, w, 3], min(h, w) == resolution
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def uint8_to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)
