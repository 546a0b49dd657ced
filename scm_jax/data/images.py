"""Pixel-space image datasets through `tfds.data_source` (array_record) and grain; no TensorFlow.

    'cifar10'      TFDS cifar10, 32x32, 10 classes (unconditional in the paper; the label is kept)
    'imagenet64'   TFDS imagenet2012, ADM preprocessing to 64x64, 1000 classes (sCM App. G)
    'imagenet512'  the same at 512x512, read by the latent-encoding script (not pixel training)

Images are float32 [H, W, 3] in [-1, 1] (x / 127.5 - 1), labels int32. Nothing is ever
downloaded: a dataset that is not prepared fails with a FileNotFoundError that says how to
prepare it (TensorFlow is needed for that one step only, through the package's [data] extra).

Batch order, like the digits dataset's, is a function of the seed alone: global sample g is
record perm_e[g mod N] of epoch e = g // N (grain's index_shuffle, reseeded per epoch), global
batch b holds samples [bB, (b+1)B), and host p of P takes rows [n p // P, n (p+1) // P) of a
batch of n rows. Hosts read disjoint samples (within an epoch, disjoint records), the global
batches do not depend on the number of hosts, and the random flips are drawn per global batch,
so they do not either. The iterator's state is the number of global batches delivered, with a
signature of the pipeline that `set_state` checks (`signed_iterator.py`): a checkpoint resumes
with any number of hosts and grain worker processes.
"""

import grain
import ml_collections
import numpy as np

from scm_jax.errors import ConfigError, MissingInputError, check
from scm_jax.data.image_preprocessing import adm_center_crop, uint8_to_unit_range
from scm_jax.data.signed_iterator import SignedIterator, process_rows

IMAGE_DATASETS = {
    "cifar10": dict(tfds_name="cifar10", resolution=32, num_classes=10),
    "imagenet64": dict(tfds_name="imagenet2012", resolution=64, num_classes=1000),
    "imagenet512": dict(tfds_name="imagenet2012", resolution=512, num_classes=1000),
}

_IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


# --- Config --------------------------------------------------------------------------------------

def image_data_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """The `config.data` section of an image experiment; `overrides` replace defaults."""
    if name not in IMAGE_DATASETS:
        raise ConfigError(f"unknown image dataset {name!r}; expected one of "
                         f"{sorted(IMAGE_DATASETS)}")
    cfg = ml_collections.ConfigDict(dict(
        name=name,
        **IMAGE_DATASETS[name],
        data_dir="",            # '' = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
        split="train",          # any TFDS split string, e.g. 'validation' or 'train[:1%]'
        sigma_d=0.5,            # data std of TrigFlow (EDM's value)
        random_flip=False,      # the paper uses no flips
        num_workers=0,          # grain worker processes; 0 = in-process
        read_threads=4,         # threads per process, each loading a whole batch
        prefetch_batches=4,     # batches buffered per process
    ))
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ConfigError(f"unknown data config keys {unknown}; expected some of "
                         f"{sorted(cfg.keys())}")
    cfg.update(overrides)
    validate_image_data_config(cfg)
    return cfg


def validate_image_data_config(cfg) -> None:
    """Raises ConfigError naming the bad key, its value and what was expected."""
    def check_key(ok, key, expected):
        check(ok, f"data.{key}", cfg[key], expected)

    check_key(cfg.name in IMAGE_DATASETS, "name", f"one of {sorted(IMAGE_DATASETS)}")
    check_key(isinstance(cfg.tfds_name, str) and cfg.tfds_name, "tfds_name",
              "a TFDS dataset name")
    check_key(isinstance(cfg.resolution, int) and cfg.resolution >= 1, "resolution",
              "a positive int")
    check_key(cfg.sigma_d > 0, "sigma_d", "> 0")
    check_key(isinstance(cfg.num_workers, int) and cfg.num_workers >= 0, "num_workers",
              "an int >= 0")
    check_key(isinstance(cfg.read_threads, int) and cfg.read_threads >= 0, "read_threads",
              "an int >= 0")
    check_key(isinstance(cfg.prefetch_batches, int) and cfg.prefetch_batches >= 1,
              "prefetch_batches", "an int >= 1")


# --- Source and missing data ---------------------------------------------------------------------

def image_source(data_config):
    """The random-access TFDS source of `data_config.split`: len() and [i] -> dict(image uint8
    [h, w, 3], label int64, ...), decoded with PIL (no TensorFlow). Never downloads.

    Raises FileNotFoundError with preparation instructions when the dataset is absent or not
    in array_record format.
    """
    import tensorflow_datasets as tfds

    validate_image_data_config(data_config)
    data_dir = data_config.data_dir or None
    try:
        return tfds.data_source(data_config.tfds_name, split=data_config.split, data_dir=data_dir,
                                download=False, try_gcs=False)
    except Exception as err:  # noqa: BLE001 - diagnosed below, re-raised when not about files
        _raise_if_not_prepared(data_config, err)
        raise


def _raise_if_not_prepared(data_config, err: Exception) -> None:
    """TFDS reports an unprepared dataset as a file-format error; say what to do instead.

    Diagnosed only after tfds.data_source failed, so tfds.testing.mock_data (which patches the
    builder, not the files) keeps working.
    """
    import tensorflow_datasets as tfds

    name = data_config.tfds_name
    try:
        builder = tfds.builder(name, data_dir=data_config.data_dir or None, try_gcs=False)
    except Exception:  # noqa: BLE001 - e.g. an unknown TFDS name: TFDS's own error says more
        return
    root = str(builder.data_dir_root)
    if not builder.is_prepared():
        raise MissingInputError(_prepare_instructions(name, root, builder)) from err
    formats = sorted(f.value for f in builder.info.available_file_formats())
    if "array_record" not in formats:
        raise MissingInputError(
            f"TFDS dataset {name!r} is prepared at {builder.data_dir} in format {formats}, but "
            f"training reads array_record files (random access, no TensorFlow), and none are "
            f"there. Rebuild it in array_record format into another data_dir (or delete "
            f"{builder.data_dir} first):\n  " + _build_command(name, root, builder)) from err


def _build_command(name: str, root: str, builder) -> str:
    cmd = f"tfds build {name} --file_format=array_record --data_dir={root}"
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        cmd += f" --manual_dir={root}/downloads/manual"
    return cmd


def _prepare_instructions(name: str, root: str, builder) -> str:
    lines = [f"TFDS dataset {name!r} is not prepared under data_dir {root!r} (nothing is "
             f"downloaded at train time). Prepare it once, on any machine:"]
    step = 1
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        files = " and ".join(_IMAGENET_TARS) if name.split(":")[0].split("/")[0].startswith(
            "imagenet2012") else "the files TFDS's manual-download instructions name"
        lines.append(f"  {step}. Download {files} (from https://image-net.org, after signing "
                     f"in) and put them in {root}/downloads/manual/")
        step += 1
    lines += [
        f"  {step}. pip install -e '.[data]'   (in the scm_jax checkout: TensorFlow, needed only "
        f"to prepare datasets)",
        f"  {step + 1}. {_build_command(name, root, builder)}",
        f"then set config.data.data_dir={root} (or leave it '' if that is your TFDS default).",
    ]
    return "\n".join(lines)


# --- Batches -------------------------------------------------------------------------------------

class _HostRows:
    """Global batch keys [n] -> (this host's keys, flip bits), flips drawn for all n rows."""

    def __init__(self, process_index: int, process_count: int, random_flip: bool):
        self.process_index, self.process_count = process_index, process_count
        self.random_flip = random_flip

    def __call__(self, keys: np.ndarray, rng: np.random.Generator):
        n = len(keys)
        flips = rng.random(n) < 0.5 if self.random_flip else np.zeros(n, bool)
        rows = process_rows(n, self.process_index, self.process_count)
        return keys[rows.start:rows.stop], flips[rows.start:rows.stop]


class _LoadRows:
    """(keys [L], flips [L]) -> dict(image=float32 [L, R, R, 3] in [-1, 1], label=int32 [L])."""

    def __init__(self, source, resolution: int):
        self.source, self.resolution = source, resolution

    def __call__(self, rows):
        keys, flips = rows
        r = self.resolution
        images = np.empty((len(keys), r, r, 3), np.uint8)
        labels = np.empty((len(keys),), np.int32)
        for i, (key, flip) in enumerate(zip(keys, flips)):
            example = self.source[int(key)]
            image = adm_center_crop(example["image"], r)
            images[i] = image[:, ::-1] if flip else image
            labels[i] = example["label"]
        return dict(image=uint8_to_unit_range(images), label=labels)


class ImageBatches(SignedIterator):
    """Iterator over this host's rows of the global batches; checkpointable.

    next(it) -> dict(image=float32 [B/P, R, R, 3], label=int32 [B/P]); get_state() -> a JSON
    dict; set_state(state) continues exactly where the saved iterator was, with any number of
    hosts or workers. `num_batches` is the length of a finite pass (None when repeating forever).
    """

    kind = "image"

    def __init__(self, make, signature: dict, num_batches: int | None):
        super().__init__(make, signature)
        self.num_batches = num_batches

    def __next__(self) -> dict:
        batch = super().__next__()
        # Worker outputs live in shared memory; a copy lets grain free it right away.
        return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}


def build_image_batches(data_config, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, shuffle: bool = True, num_epochs: int | None = None,
                        drop_remainder: bool = True) -> ImageBatches:
    """This host's batches of `data_config` (module docstring: order, sharding, state).

    shuffle=False, num_epochs=1 is one ordered pass. With drop_remainder=False the last global
    batch is partial and split across hosts as evenly as rows allow; every host yields the same
    number of batches (a host's last one may be empty when fewer rows than hosts remain).
    """
    validate_image_data_config(data_config)
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
        raise ConfigError(f"batch_size = {batch_size!r}; expected a positive int divisible by "
                         f"process_count = {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index = {process_index} not in "
                         f"[0, process_count = {process_count})")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"num_epochs = {num_epochs!r}; expected None (repeat forever) or an "
                         f"int >= 1")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed = {seed!r}; expected an int >= 0")

    source = image_source(data_config)
    num_records = len(source)
    if num_records == 0:
        raise ConfigError(f"TFDS split {data_config.split!r} of {data_config.tfds_name!r} is empty")
    # Independent 32-bit seeds (grain's index_shuffle and RngPool want < 2**32) for any int seed.
    shuffle_seed, flip_seed = (int(s) for s in np.random.SeedSequence(int(seed)).generate_state(2))

    keys = grain.MapDataset.range(num_records)
    if shuffle:
        keys = keys.shuffle(seed=shuffle_seed)   # epoch e reshuffles with seed + e
    keys = keys.repeat(num_epochs)
    batches = keys.batch(batch_size, drop_remainder=drop_remainder)
    num_batches = None if num_epochs is None else len(batches)
    # Batching happens on the MapDataset, before grain slices work across worker processes, so
    # the batches are the same whatever num_workers is.
    batches = batches.random_map(_HostRows(process_index, process_count, data_config.random_flip),
                                 seed=flip_seed)
    batches = batches.map(_LoadRows(source, data_config.resolution))

    def make(start: int):
        # Sliced after the random map, so batch b keeps its flips whatever the start.
        dataset = batches[start:].to_iter_dataset(grain.ReadOptions(
            num_threads=data_config.read_threads,
            prefetch_buffer_size=data_config.prefetch_batches))
        if data_config.num_workers > 0:
            _mark_absl_flags_parsed()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=data_config.num_workers))
        return dataset

    signature = dict(dataset=data_config.name, tfds_name=data_config.tfds_name,
                     split=data_config.split, resolution=data_config.resolution,
                     random_flip=bool(data_config.random_flip), num_records=num_records,
                     batch_size=batch_size, seed=int(seed), shuffle=bool(shuffle),
                     num_epochs=num_epochs, drop_remainder=bool(drop_remainder))
    return ImageBatches(make, signature, num_batches)


def _mark_absl_flags_parsed() -> None:
    """grain's worker start-up reads its absl flags; outside an absl app (notebooks, tests)
    they are unparsed, and reading them would raise. Their defaults are what we want."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
