"""Datasets behind one protocol.

`build_train_batches(config.data, ...)` returns an iterator of host-local batches

    next(it) -> dict(image=float32 [B / P, H, W, C], label=int32 [B / P])
    it.get_state() -> JSON-serializable dict;   it.set_state(state)

whose state the checkpoints store, so a resumed run continues with exactly the batches an
uninterrupted one would have seen. `data_shape(config.data)` is the (H, W, C) the network sees.

- 'digits': the embedded dataset (scikit-learn's 8x8 digits), no files needed.
- 'cifar10', 'imagenet64': pixel images through `tfds.data_source` + grain (`images.py`).
- 'imagenet512_latents': SD-VAE latents pre-encoded by `python -m scm_jax.encode_latents`
  (`latents.py`).
"""
from scm_jax.data.digits import DigitsBatches, load_digits_splits
from scm_jax.errors import ConfigError

DATASETS = ("digits", "cifar10", "imagenet64", "imagenet512_latents")
# Entries of config.data that do not change what a checkpoint means: where the files are, how
# fast they are read, and augmentation. Everything else (name, resolution, classes, split,
# sigma_d, the digits hold-out) is the dataset's identity.
NON_IDENTITY_KEYS = ("data_dir", "path", "num_workers", "read_threads", "prefetch_batches",
                     "num_threads", "prefetch", "sample_posterior", "random_flip")
LATENT_DOWNSAMPLING = 8   # SD-VAE: 512x512x3 images -> 64x64x4 latents


class StepBatches:
    """The data protocol over batches that are a pure function of the step (digits)."""

    def __init__(self, batches: DigitsBatches, step: int = 0):
        self.batches, self.step = batches, step

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches.batch(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def _check_name(data_config):
    if data_config.name not in DATASETS:
        raise ConfigError(f"unknown data.name {data_config.name!r}; expected one of {DATASETS}")


def data_shape(data_config) -> tuple:
    """(H, W, C) of one training example as the network sees it."""
    _check_name(data_config)
    if data_config.name == "digits":
        return (8, 8, 1)
    if data_config.name == "imagenet512_latents":
        side = data_config.resolution // LATENT_DOWNSAMPLING
        return (side, side, 4)
    return (data_config.resolution, data_config.resolution, 3)


def build_train_batches(data_config, *, batch_size, seed, process_index=0, process_count=1):
    """This host's training batches (see the module docstring for the protocol)."""
    _check_name(data_config)
    kw = dict(batch_size=batch_size, seed=seed, process_index=process_index,
              process_count=process_count)
    if data_config.name == "digits":
        splits = load_digits_splits(data_config.holdout)
        return StepBatches(DigitsBatches(splits["train_images"], splits["train_labels"], **kw))
    if data_config.name == "imagenet512_latents":
        from scm_jax.data.latents import build_latent_batches

        return build_latent_batches(data_config, **kw)
    from scm_jax.data.images import build_image_batches

    return build_image_batches(data_config, **kw)


__all__ = ["DATASETS", "NON_IDENTITY_KEYS", "DigitsBatches", "StepBatches", "build_train_batches", "data_shape",
           "load_digits_splits"]
