"""A small CNN for 8x8 digits whose penultimate layer is the evaluation feature space.

Inputs are images [N, 8, 8, 1] in [-1, 1] (pixel / 8 - 1) and labels int [N] in 0..9.
Training is deterministic given the seed: the batch order and augmentation come from
np.random.default_rng(seed), the init from jax.random.key(seed), and every step runs the
same compiled XLA program.
"""
from typing import Any, Mapping

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scm_jax import files

NUM_CLASSES = 10
FEATURE_DIM = 128
IMAGE_SHAPE = (8, 8, 1)

# Flax variables {'params': {...}} of DigitsCNN.
ClassifierParams = Mapping[str, Any]

# Fixed inference batch: every call pads up to it, so one compilation serves all N.
_EVAL_BATCH = 512


class DigitsCNN(nn.Module):
    """conv3x3(32) -> conv3x3(64) -> maxpool 2 -> dense(128) = features -> dense(10)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, 8, 8, 1] -> (logits [N, 10], features [N, 128])."""
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(nn.Dense(FEATURE_DIM)(x))
        logits = nn.Dense(NUM_CLASSES)(features)
        return logits, features


_MODEL = DigitsCNN()


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"expected images of shape [N, 8, 8, 1], got {images.shape}")
    return images.astype(np.float32)


def _init_params(seed: int = 0) -> ClassifierParams:
    return _MODEL.init(jax.random.key(seed), jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32))


def _shift(image: jax.Array, offset: jax.Array) -> jax.Array:
    """Translates one image [8, 8, 1] by offset [2] in {-1, 0, 1}, filling with background -1."""
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    return jax.lax.dynamic_slice(padded, (1 - offset[0], 1 - offset[1], 0), IMAGE_SHAPE)


_ADAM = optax.scale_by_adam()


def _loss(params, x, y):
    logits, _ = _MODEL.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# A Python loop over this jitted step, not lax.scan: XLA:CPU runs convolutions inside while
# loops through a slow path (measured ~25x slower per step than this).
@jax.jit
def _train_step(params, opt_state, x, y, offsets, lr):
    """One Adam step with step size lr on batch x [B, 8, 8, 1], y [B], shifted by offsets [B, 2]."""
    x = jax.vmap(_shift)(x, offsets)
    grads = jax.grad(_loss)(params, x, y)
    updates, opt_state = _ADAM.update(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda w, u: w - lr * u, params, updates)
    return params, opt_state


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    augment: bool = True,
) -> ClassifierParams:
    """Trains DigitsCNN on images [N, 8, 8, 1] in [-1, 1] and labels int [N] in 0..9.

    Batches are drawn epoch by epoch from permutations of np.random.default_rng(seed); with
    `augment`, each sample is shifted by at most one pixel per axis (offsets from the same
    generator), which makes the features less sensitive to the small misalignments that
    generated digits have.
    """
    images = _check_images(images)
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected integer labels of shape [{images.shape[0]}], got "
                         f"{labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}"
        )
    labels = labels.astype(np.int32)
    n = images.shape[0]
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    batch_idx = order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)
    if augment:
        offsets = rng.integers(-1, 2, size=(steps, batch_size, 2), dtype=np.int32)
    else:
        offsets = np.zeros((steps, batch_size, 2), np.int32)
    params = _init_params(seed)
    opt_state = _ADAM.init(params)
    for t in range(steps):
        # Cosine decay to 0; computed in Python so every step reuses one compilation.
        lr = np.float32(learning_rate * 0.5 * (1.0 + np.cos(np.pi * t / steps)))
        idx = batch_idx[t]
        params, opt_state = _train_step(
            params, opt_state, images[idx], labels[idx], offsets[t], lr
        )
    return jax.device_get(params)


_apply = jax.jit(_MODEL.apply)


def classifier_logits_and_features(params: ClassifierParams, images: np.ndarray):
    """(logits [N, 10], features [N, 128]) as float32 numpy arrays, computed in batches."""
    images = _check_images(images)
    n = images.shape[0]
    logits, features = [], []
    for start in range(0, n, _EVAL_BATCH):
        batch = images[start : start + _EVAL_BATCH]
        pad = _EVAL_BATCH - batch.shape[0]
        batch = np.pad(batch, ((0, pad), (0, 0), (0, 0), (0, 0)), constant_values=-1.0)
        out_logits, out_features = _apply(params, batch)
        logits.append(np.asarray(out_logits)[: _EVAL_BATCH - pad])
        features.append(np.asarray(out_features)[: _EVAL_BATCH - pad])
    if not logits:
        return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(logits), np.concatenate(features)


def classifier_features(params: ClassifierParams, images: np.ndarray) -> np.ndarray:
    """Penultimate (post-ReLU dense) activations [N, 128] of images [N, 8, 8, 1]."""
    return classifier_logits_and_features(params, images)[1]


def classifier_predict(params: ClassifierParams, images: np.ndarray) -> np.ndarray:
    """Predicted classes int32 [N] of images [N, 8, 8, 1]."""
    logits = classifier_logits_and_features(params, images)[0]
    return logits.argmax(axis=-1).astype(np.int32)


def save_classifier(params: ClassifierParams, path) -> None:
    """Writes params as flax msgpack, atomically (readers never see a half-written file)."""
    files.write_bytes(path, flax.serialization.to_bytes(jax.device_get(params)))


def load_classifier(path) -> ClassifierParams:
    """Reads params written by save_classifier, checking them against DigitsCNN's layout."""
    path = str(path)
    if not files.exists(path):
        raise FileNotFoundError(f"no digits classifier file at {path!r}")
    with files.path(path).open("rb") as f:
        data = f.read()
    template = _init_params(0)
    try:
        params = flax.serialization.from_bytes(template, data)
    except Exception as e:  # msgpack and flax raise several types for bad input
        raise ValueError(f"{path!r} is not a DigitsCNN classifier file: {e}") from e
    # from_bytes checks the tree's keys but not the array shapes, so check those too.
    want = jax.tree_util.tree_flatten_with_path(template)[0]
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    for (key, w), (_, g) in zip(want, got, strict=True):
        if np.shape(g) != w.shape or np.asarray(g).dtype != w.dtype:
            raise ValueError(
                f"{path!r} does not match the DigitsCNN architecture: parameter "
                f"{jax.tree_util.keystr(key)} is {np.asarray(g).dtype} {np.shape(g)}, "
                f"expected {w.dtype} {w.shape}"
            )
    return params


def load_or_train_classifier(
    path, images: np.ndarray, labels: np.ndarray, *, seed: int = 0, save: bool = True,
    **train_kwargs
) -> ClassifierParams:
    """Loads the classifier at path if the file exists, else trains one (deterministically)
    and, with `save`, writes it there (on a multi-process run only the primary saves).

    train_kwargs (steps, batch_size, ...) go to `train_classifier`.
    """
    if files.exists(path):
        return load_classifier(path)
    params = train_classifier(images, labels, seed=seed, **train_kwargs)
    if save:
        save_classifier(params, path)
    return params
