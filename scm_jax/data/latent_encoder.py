"""Encoding ImageNet 512x512 into SD-VAE latents for latent-space training (sCM App. G); the
command is `python -m scm_jax.encode_latents` (`scm_jax/encode_latents.py`).

Every worker of a pod runs the same command (with --distributed): process p encodes its own
share of the data into shards named p<p>-s<k>. Re-running resumes: shards already on disk are
skipped (each shard is written to a temporary directory and renamed into place, so a shard on
disk is complete). When the last process finishes it writes index.json, which makes the directory
readable by `scm_jax.data.latents.build_latent_batches`. Each shard stores the raw posterior
mean and std (so training can use the mean or a fresh posterior sample) and the labels; the
paper's normalization is applied at read time. The output directory must be shared by all
processes (an NFS/Filestore mount, or a gs:// bucket: every path goes through
`scm_jax.files`) for index.json to see every shard.
"""
import hashlib
import io
import os
import time

import numpy as np

from scm_jax import files
from scm_jax.data.latents import ARRAYS, FORMAT, INDEX_FILE, LATENT_MEAN, LATENT_STD, load_shard_array
from scm_jax.errors import ConfigError

CONFIG_FILE = "encode_config.json"
STORAGE_DTYPES = ("float32", "float16")


def _write_shard(out_dir, name: str, arrays: dict) -> None:
    """Writes <name>/{mean,std,label}.npy through a temporary directory and one rename (on a
    bucket a copy, after which a shard counts only with all its arrays present)."""
    tmp = files.join(out_dir, f".tmp-{name}-{os.getpid()}")
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir(parents=True)
    for key, value in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, value)
        with (tmp / f"{key}.npy").open("wb") as f:
            f.write(buffer.getvalue())
    tmp.rename(files.join(out_dir, name))


def _shard_count(out_dir, name: str) -> int | None:
    """Examples in a finished shard, or None when it is not (wholly) on disk."""
    shard = files.join(out_dir, name)
    if not all((shard / f"{key}.npy").is_file() for key in ARRAYS):
        return None
    return len(load_shard_array(shard / "label.npy"))


def _check_config(out_dir, config: dict) -> None:
    path = files.join(out_dir, CONFIG_FILE)
    if path.is_file():
        old = files.read_json(path)
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            raise ConfigError(f"{out_dir} was encoded with other settings {{key: (then, now)}}: "
                              f"{diff}; re-run with the same settings or choose a new --out")
    else:
        files.write_json(path, config)


def _check_batch(batch) -> tuple:
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    if images.ndim != 4 or images.shape[-1] != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected image [B, H, W, 3] and label [B], got {images.shape} and "
                         f"{labels.shape}")
    if not len(labels):
        return images, labels
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"images must be in [-1, 1] (x / 127.5 - 1), got values in [{lo}, {hi}]")
    return images.astype(np.float32), labels.astype(np.int32)


class _Progress:
    """A line every `every_s` seconds: images done, images/s (encoded only), ETA."""

    def __init__(self, total: int | None, log, every_s: float, tag: str):
        self.total, self.log, self.every_s, self.tag = total, log, every_s, tag
        self.done = self.encoded = 0
        self.start = self.last = time.time()

    def update(self, n: int, *, encoded: bool, force: bool = False) -> None:
        self.done += n
        self.encoded += n if encoded else 0
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.encoded / max(now - self.start, 1e-9)
        total = f"/{self.total}" if self.total else ""
        eta = "?"
        if self.total and rate > 0:
            eta = f"{max(self.total - self.done, 0) / rate / 60:.1f} min"
        self.log(f"[{self.tag}] {self.done}{total} images | {rate:.1f} images/s | ETA {eta}")


def encode_batches(batches, encode_fn, out_dir: str, *, shard_batches: int = 32,
                   process_index: int = 0, process_count: int = 1, storage_dtype: str = "float32",
                   settings: dict | None = None, metadata: dict | None = None,
                   num_examples: int | None = None, log=print,
                   log_every_s: float = 30.0) -> dict | None:
    """Encodes this process's batches into shards of `shard_batches` batches under `out_dir`.

    batches: iterable of dict(image=float32 [B, H, W, 3] in [-1, 1], label=int [B]), in a fixed
      order (re-runs must see the same batches). encode_fn(images) -> (mean, std) [B, h, w, c]
      (numpy or jax arrays; results are fetched one batch behind, so device work overlaps the
      input pipeline). settings: what determines the shards' contents (batch size, VAE hash,
      split...); a re-run with other settings is refused. metadata: facts recorded in the index
      only (file paths). Both JSON-serializable. num_examples: this process's total, for the ETA.
    Returns the index if this call completed the directory (all processes done), else None.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype {storage_dtype!r} not in {STORAGE_DTYPES}")
    if shard_batches < 1:
        raise ValueError(f"shard_batches must be >= 1, got {shard_batches}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    files.makedirs(out_dir)
    _check_config(out_dir, dict(settings or {}, shard_batches=shard_batches,
                                process_count=process_count, storage_dtype=storage_dtype))
    metadata = dict(metadata or {})
    for entry in files.path(out_dir).iterdir():   # shards a killed run of this process left
        if entry.name.startswith(f".tmp-p{process_index:05d}-"):
            entry.rmtree()
    done_path = files.join(out_dir, f"p{process_index:05d}.done.json")
    tag = f"encode p{process_index}/{process_count}"
    if done_path.is_file():
        log(f"[{tag}] already done ({done_path})")
        return finalize(out_dir, process_count, metadata)

    progress = _Progress(num_examples, log, log_every_s, tag)
    shards, latent_shape, image_size = [], None, None
    pending, parts = None, []   # pending: (mean, std, labels) not yet fetched from the device

    def fetch():
        nonlocal pending, latent_shape
        if pending is not None:
            mean, std, labels = pending
            mean = np.asarray(mean).astype(storage_dtype)
            parts.append((mean, np.asarray(std).astype(storage_dtype), labels))
            latent_shape = list(mean.shape[1:])
            progress.update(len(labels), encoded=True)
            pending = None

    def close_shard(name):
        fetch()
        if parts:
            arrays = {key: np.concatenate([p[i] for p in parts]) for i, key in enumerate(ARRAYS)}
            _write_shard(out_dir, name, arrays)
            shards.append(dict(name=name, count=len(arrays["label"])))
            parts.clear()

    name, skipping = None, False
    for i, batch in enumerate(batches):
        if image_size is None:
            image_size = list(np.shape(batch["image"])[1:3])
        if i % shard_batches == 0:
            name = f"p{process_index:05d}-s{i // shard_batches:06d}"
            count = _shard_count(out_dir, name)
            skipping = count is not None
            if skipping:   # finished in an earlier run: consume its batches without encoding
                shards.append(dict(name=name, count=count))
                progress.update(count, encoded=False, force=True)
        if skipping:
            continue
        images, labels = _check_batch(batch)
        if len(labels):   # a host's share of the last global batch may be empty
            mean, std = encode_fn(images)
            fetch()
            pending = (mean, std, labels)
        if (i + 1) % shard_batches == 0:   # written now, so a failing input loses no shard
            close_shard(name)
    if parts or pending is not None:      # the last, partial shard
        close_shard(name)
    progress.update(0, encoded=False, force=True)

    if latent_shape is None and shards:   # every shard skipped: read the shape back
        latent_shape = list(load_shard_array(files.join(out_dir, shards[0]["name"], "mean.npy"))
                            .shape[1:])
    files.write_json(done_path, dict(shards=shards, latent_shape=latent_shape, image_size=image_size))
    log(f"[{tag}] done: {sum(s['count'] for s in shards)} images in {len(shards)} shards")
    return finalize(out_dir, process_count, metadata)


def finalize(out_dir, process_count: int, metadata: dict) -> dict | None:
    """Writes index.json once every process has written its done file (the last one does it)."""
    done = [files.join(out_dir, f"p{p:05d}.done.json") for p in range(process_count)]
    if not all(p.is_file() for p in done):
        return None
    shards, shapes = [], set()
    for path in done:
        part = files.read_json(path)
        shards += part["shards"]
        if part["latent_shape"] is not None:
            shapes.add((tuple(part["image_size"]), tuple(part["latent_shape"])))
    if len(shapes) != 1:
        raise ConfigError(f"{out_dir}: processes encoded (image size, latent shape) pairs "
                         f"{sorted(shapes)}; expected one pair")
    image_size, latent_shape = shapes.pop()
    config = files.read_json(files.join(out_dir, CONFIG_FILE))
    index = dict(
        format=FORMAT,
        num_examples=sum(s["count"] for s in shards),
        image_size=list(image_size),
        latent_shape=list(latent_shape),
        dtype=config["storage_dtype"],
        arrays=dict(mean="posterior mean, raw VAE latents", std="posterior std",
                    label="int32 class labels"),
        shards=shards,
        normalization=dict(
            images="[-1, 1]", formula="x = (z - mean) * sigma_d / std",
            mean=LATENT_MEAN.tolist(), std=LATENT_STD.tolist(), sigma_d=0.5,
            source="sCM (Lu & Song 2025) App. G"),
        settings=config,
    )
    for key, value in metadata.items():   # recorded facts never override the format's own keys
        index.setdefault(key, value)
    files.write_json(files.join(out_dir, INDEX_FILE), index)
    return index


# ------------------------------------------------------------------------------------------------
# CLI: ImageNet 512 through scm_jax.data.images, the VAE on this host's local devices.
# ------------------------------------------------------------------------------------------------

def make_encode_fn(vae, params, batch_size: int):
    """Jitted encode on a mesh of this process's devices; pads short batches to `batch_size`
    (one compiled shape) and drops the padding. images [b, H, W, 3] -> (mean, std) [b, h, w, c]."""
    import jax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from scm_jax.networks.vae import AutoencoderKL

    devices = jax.local_devices()
    if batch_size % len(devices):
        raise ValueError(f"per-process batch size {batch_size} is not divisible by the "
                         f"{len(devices)} local devices")
    # Process-local mesh: the processes never communicate, each encodes its own share.
    mesh = Mesh(np.asarray(devices), ("batch",), axis_types=(AxisType.Auto,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    params = jax.device_put(params, replicated)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode),
                     in_shardings=(replicated, split), out_shardings=split)

    def encode_fn(images):
        n = len(images)
        if n < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]),
                                                      images.dtype)])
        mean, std = encode(params, images)
        return mean[:n], std[:n]

    return encode_fn


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encode_imagenet(*, vae_path: str, out: str, data_dir: str = "", split: str = "train",
                    batch_size: int = 64, shard_batches: int = 32, storage_dtype: str = "float32",
                    compute_dtype: str = "float32", num_workers: int = 0, vae=None, log=print):
    """The CLI's work: this process's share of ImageNet 512 (`scm_jax.data.images`) -> `out`.

    batch_size is global (over all processes); num_workers: grain worker processes decoding
    JPEGs; `vae` overrides the module (tests use a small one).
    """
    import jax

    from scm_jax.data import images as image_data   # lazy: only the CLI needs the image pipeline
    from scm_jax.networks.vae import VAE_FILE, VAE_REPO, AutoencoderKL, load_vae_params

    pid, nproc = jax.process_index(), jax.process_count()
    if batch_size % nproc:
        raise ValueError(f"batch_size {batch_size} is not divisible by {nproc} processes")
    dtypes = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}
    if compute_dtype not in dtypes:
        raise ValueError(f"compute_dtype {compute_dtype!r} not in {sorted(dtypes)}")
    vae = vae or AutoencoderKL(dtype=dtypes[compute_dtype])
    params = load_vae_params(vae_path, vae)
    vae_file = os.path.join(vae_path, VAE_FILE) if os.path.isdir(vae_path) else vae_path

    config = image_data.image_data_config("imagenet512", data_dir=data_dir, split=split,
                                          num_workers=num_workers)
    # One ordered pass, the last partial batch kept: every image is encoded exactly once.
    batches = image_data.build_image_batches(config, batch_size=batch_size, seed=0, shuffle=False,
                                             num_epochs=1, process_index=pid, process_count=nproc,
                                             drop_remainder=False)
    num_batches = getattr(batches, "num_batches", None)
    settings = dict(batch_size=batch_size, split=split, vae_sha256=_sha256(vae_file),
                    compute_dtype=compute_dtype)
    metadata = dict(
        vae=dict(file=os.path.abspath(vae_file), repository=VAE_REPO),
        source=dict(dataset="imagenet512", split=split, data_dir=data_dir,
                    images="ADM center crop, [-1, 1]"))
    return encode_batches(batches, make_encode_fn(vae, params, batch_size // nproc), out,
                          shard_batches=shard_batches, process_index=pid, process_count=nproc,
                          storage_dtype=storage_dtype, settings=settings, metadata=metadata,
                          num_examples=num_batches and num_batches * batch_size // nproc,
                          log=log)
