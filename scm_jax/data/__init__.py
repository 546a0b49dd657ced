"""Datasets. `build_dataset(config.data, ...)` returns the train batches and evaluation splits."""
from scm_jax.data.digits import DigitsBatches, load_digits_splits

DATASETS = ("digits",)


def build_dataset(data_config, *, batch_size, seed, process_index=0, process_count=1):
    """Returns (batches with .batch(step), splits dict with train/holdout images and labels)."""
    if data_config.name != "digits":
        raise ValueError(f"unknown data.name {data_config.name!r}; expected one of {DATASETS}")
    splits = load_digits_splits(data_config.holdout)
    batches = DigitsBatches(splits["train_images"], splits["train_labels"], batch_size=batch_size,
                            seed=seed, process_index=process_index, process_count=process_count)
    return batches, splits


__all__ = ["DATASETS", "DigitsBatches", "build_dataset", "load_digits_splits"]
