"""ImageNet 512x512 in SD-VAE latent space: normalization, the encoded shards, training batches.

Latent normalization (sCM App. G): images in [-1, 1] are encoded by
`stabilityai/sd-vae-ft-mse` into raw latents z [64, 64, 4]; the network sees
    x = (z - mu_c) * sigma_d / sigma_c,   mu_c = [1.56, -0.695, 0.483, 0.729],
                                           sigma_c = [5.27, 5.91, 4.21, 4.31],  sigma_d = 0.5,
and generated x are mapped back with the inverse before decoding. (EDM2's constants differ: it
encodes [0, 1] images.)

On disk (written by `python -m scm_jax.encode_latents`; see that module):
    <path>/index.json                       shapes, counts, shard list, VAE file, constants
    <path>/<shard>/{mean,std,label}.npy     raw posterior mean and std [n, 64, 64, 4], labels [n]
Arrays are read with memory mapping, so the dataset never has to fit in host memory.
"""
import functools
import io
import os
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scm_jax import files
from scm_jax.errors import ConfigError, MissingInputError
from scm_jax.data.signed_iterator import SignedIterator, process_rows
from scm_jax.networks.vae import AutoencoderKL

# Paper constants (sCM App. G): per-channel mean and std of sd-vae-ft-mse latents of [-1, 1] images.
LATENT_MEAN = np.array([1.56, -0.695, 0.483, 0.729])
LATENT_STD = np.array([5.27, 5.91, 4.21, 4.31])
LATENT_SHAPE = (64, 64, 4)   # of a 512x512 image

INDEX_FILE = "index.json"
FORMAT = "scm_jax.latents.v1"
ARRAYS = ("mean", "std", "label")
ENCODE_COMMAND = ("python -m scm_jax.encode_latents --vae=<path to sd-vae-ft-mse "
                  "diffusion_pytorch_model.safetensors> --data_dir=<TFDS data dir> --out={path}")


# x = (z - mu_c) * sigma_d / sigma_c (sCM App. G): unit-free latents with std ~sigma_d per channel.
def normalize_latents(z, sigma_d: float = 0.5):
    """Raw VAE latents z [..., 4] -> the network's data space x [..., 4], in z's dtype."""
    mean, std = _constants(z)
    return (z - mean) * (sigma_d / std).astype(mean.dtype)


def denormalize_latents(x, sigma_d: float = 0.5):
    """Inverse of `normalize_latents`: x [..., 4] -> raw latents z = x sigma_c / sigma_d + mu_c."""
    mean, std = _constants(x)
    return x * (std / sigma_d).astype(mean.dtype) + mean


def _constants(x):
    """mu_c, sigma_c in x's float dtype (float32 batches stay float32; float64 tests stay exact)."""
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else np.float32
    return LATENT_MEAN.astype(dtype), LATENT_STD.astype(dtype)


def latent_data_config(**overrides) -> ml_collections.ConfigDict:
    """The `config.data` section of the latent ImageNet 512 experiments."""
    cfg = ml_collections.ConfigDict(dict(
        name="imagenet512_latents",
        path="",                 # the directory written by scm_jax.encode_latents
        resolution=512,          # of the encoded images; latents are resolution / 8 on a side
        num_classes=1000,
        sigma_d=0.5,
        sample_posterior=True,   # z = mean + std * eps, fresh eps per epoch (see build_latent_batches)
        num_threads=16,          # grain reader threads
        prefetch=4,              # batches read ahead
    ))
    cfg.update(overrides)
    return cfg


def _missing(path: str, why: str) -> MissingInputError:
    return MissingInputError(
        f"encoded latents at {path!r} are missing or incomplete ({why}). Create them with "
        f"`{ENCODE_COMMAND.format(path=path)}`; re-running the same command finishes an "
        f"interrupted encoding.")


def read_index(path) -> dict:
    """The JSON index of an encoded directory; MissingInputError if absent or incomplete."""
    root = files.path(path)
    index_path = root / INDEX_FILE
    if not root.is_dir():
        raise _missing(path, "no such directory")
    if not index_path.is_file():
        raise _missing(path, f"no {INDEX_FILE}: the encoding has not finished on every process")
    index = files.read_json(index_path)
    if index.get("format") != FORMAT:
        raise ConfigError(f"{index_path} has format {index.get('format')!r}, expected {FORMAT!r}")
    for shard in index["shards"]:
        for name in ARRAYS:
            if not (root / shard["name"] / f"{name}.npy").is_file():
                raise _missing(path, f"shard {shard['name']} has no {name}.npy")
    return index


def load_shard_array(path):
    """A shard's .npy: memory-mapped on a local disk; read whole from a bucket (where a
    memory map is impossible: copy large latent sets to local disk for speed)."""
    if files.is_local(path):
        return np.load(os.fspath(path), mmap_mode="r")
    with files.path(path).open("rb") as f:
        return np.load(io.BytesIO(f.read()))


class LatentSource:
    """Random access over the memory-mapped shards: len() examples, [i] -> dict(mean, std, label).

    mean/std: [64, 64, 4] raw posterior (storage dtype), label: int. A grain data source.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.index = read_index(self.path)
        counts = [s["count"] for s in self.index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] != self.index["num_examples"]:
            raise ValueError(f"{self.path}: shard counts add up to {self._starts[-1]}, the index "
                             f"says num_examples={self.index['num_examples']}")
        self._arrays = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, k: int) -> dict:
        if k not in self._arrays:
            with self._lock:
                if k not in self._arrays:
                    shard = self.index["shards"][k]
                    arrays = {n: load_shard_array(files.join(self.path, shard["name"], f"{n}.npy"))
                              for n in ARRAYS}
                    shape = (shard["count"], *self.index["latent_shape"])
                    if arrays["mean"].shape != shape or arrays["std"].shape != shape or \
                            arrays["label"].shape != shape[:1]:
                        raise ValueError(f"{self.path}/{shard['name']}: arrays of shapes "
                                         f"{[a.shape for a in arrays.values()]}, expected "
                                         f"{shape} and ({shape[0]},) (a corrupt shard: delete it "
                                         f"and re-run the encoder)")
                    self._arrays[k] = arrays
        return self._arrays[k]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        arrays, j = self._shard(k), i - int(self._starts[k])
        return dict(mean=np.asarray(arrays["mean"][j]), std=np.asarray(arrays["std"][j]),
                    label=int(arrays["label"][j]))

    def __getstate__(self):   # picklable for grain worker processes: memmaps reopen lazily
        return dict(path=self.path)

    def __setstate__(self, state):
        self.__init__(state["path"])


def build_latent_batches(data_config, *, batch_size: int, seed: int, process_index: int = 0,
                         process_count: int = 1):
    """Endless shuffled batches of normalized latents: this host's rows of each global batch.

    `next(it)` -> dict(image=float32 [batch_size // process_count, 64, 64, 4], label=int32 [...]).
    `it.get_state()` is a JSON-serializable dict; `it.set_state(state)` resumes exactly, with
    any number of hosts.

    The global example stream is the same for any number of hosts: epoch e is the dataset under
    grain's seeded permutation for (seed, e); global batch b holds stream positions
    [bB, (b+1)B), of which host p of P takes bB + p, bB + p + P, ... so the hosts' rows are
    disjoint and together form the global batch.

    `sample_posterior=True` (the default) trains on z = mean + std * eps with eps drawn for every
    stream position (so afresh every epoch) from the seed and that position, as EDM2 does: each
    image contributes a slightly different latent every epoch, a free augmentation along the
    directions the VAE itself considers equivalent, and the model learns the distribution the
    decoder was trained to invert. `False` uses the posterior mean.
    """
    import grain

    if data_config.name != "imagenet512_latents":
        raise ConfigError(f"data.name {data_config.name!r} is not 'imagenet512_latents'")
    if not data_config.path:
        raise ConfigError("data.path is empty; expected the directory written by "
                          "`python -m scm_jax.encode_latents`")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed = {seed!r}; expected an int >= 0")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ConfigError(f"batch_size {batch_size} must be a positive multiple of the "
                          f"{process_count} processes")
    source = LatentSource(data_config.path)
    size = source.index["image_size"]
    if size != [data_config.resolution] * 2:
        raise ConfigError(f"data.resolution = {data_config.resolution} but {data_config.path} "
                          f"holds latents of {size[0]}x{size[1]} images")
    rows = _LatentRows(source, float(data_config.sigma_d), bool(data_config.sample_posterior),
                       int(seed), batch_size, process_index, process_count)
    keys = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
    batches = keys.batch(batch_size, drop_remainder=True).map_with_index(rows)
    options = grain.ReadOptions(num_threads=int(data_config.get("num_threads", 16)),
                                prefetch_buffer_size=int(data_config.get("prefetch", 4)))
    signature = dict(dataset=data_config.name, num_examples=len(source), batch_size=batch_size,
                     seed=int(seed), sample_posterior=bool(data_config.sample_posterior))
    return LatentBatches(lambda start: batches[start:].to_iter_dataset(options), signature)


class _LatentRows:
    """(global batch index b, its record indices [B]) -> this host's rows: dict(image=float32
    [B / P, 64, 64, 4] normalized latents, label=int32 [B / P])."""

    def __init__(self, source, sigma_d, sample_posterior, seed, batch_size, process_index,
                 process_count):
        self.source, self.sigma_d, self.sample_posterior = source, sigma_d, sample_posterior
        self.seed, self.batch_size = seed, batch_size
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, b: int, records: np.ndarray) -> dict:
        images, labels = [], []
        for j in process_rows(len(records), self.process_index, self.process_count):
            example = self.source[int(records[j])]
            z = example["mean"].astype(np.float32)
            if self.sample_posterior:
                position = b * self.batch_size + j    # in the global stream
                eps = np.random.default_rng([self.seed, position]).standard_normal(
                    z.shape, dtype=np.float32)
                z = z + example["std"].astype(np.float32) * eps
            images.append(normalize_latents(z, self.sigma_d))
            labels.append(example["label"])
        return dict(image=np.stack(images), label=np.asarray(labels, np.int32))


class LatentBatches(SignedIterator):
    """The data protocol over grain's iterator. Its state names the pipeline it belongs to, so
    restoring a state into a different pipeline (batch size, seed...) fails instead of drifting."""

    kind = "latent"


@functools.partial(jax.jit, static_argnames=("vae", "sigma_d"))
def decode_for_eval(vae_params, latents_normalized, *, vae=None, sigma_d: float = 0.5):
    """Generated latents x [B, 64, 64, 4] (network space) -> images [B, 512, 512, 3] in [-1, 1].

    Un-normalizes (inverse of `normalize_latents`), decodes with the VAE (`vae`: the module the
    params belong to; default the full sd-vae-ft-mse) and clips to the image range.
    """
    vae = vae or AutoencoderKL()
    z = denormalize_latents(jnp.asarray(latents_normalized, jnp.float32), sigma_d)
    images = vae.apply({"params": vae_params}, z, method=AutoencoderKL.decode)
    return jnp.clip(images, -1.0, 1.0)
