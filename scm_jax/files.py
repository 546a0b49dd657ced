"""The one path layer: every file a run reads or writes beside its arrays goes through here.

Paths are `etils.epath.Path`s (what orbax uses), so a workdir may be a local folder or a bucket
(`gs://bucket/run`; needs `gcsfs`, which the `[tpu]` extra installs). Writes are atomic where
the filesystem allows: a temporary file beside the target, then a rename (a copy on object
stores, where a reader still never sees a partial object).

On a multi-process run only the primary process (`jax.process_index() == 0`) writes metrics,
TensorBoard, JSON and images; callers test `is_primary()`. Checkpoint arrays are orbax's
business (every process writes its own shards).
"""
import io
import json
import os
import uuid

import numpy as np
from etils import epath


def path(p) -> epath.Path:
    """A str / os.PathLike / epath.Path as an epath.Path (bucket URIs kept intact)."""
    return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p))


def is_local(p) -> bool:
    """True for a path on this machine's filesystem (where appends and renames are cheap)."""
    return "://" not in os.fspath(p)


def is_primary() -> bool:
    """True on the process that writes the run's side files (metrics, JSON, images)."""
    import jax

    return jax.process_index() == 0


def join(p, *parts) -> epath.Path:
    return path(p).joinpath(*parts)


def exists(p) -> bool:
    return path(p).exists()


def makedirs(p) -> epath.Path:
    out = path(p)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _tmp_beside(target: epath.Path) -> epath.Path:
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def write_bytes(p, data: bytes) -> None:
    """Writes `data` to p atomically (temporary file + rename); creates the parent folder."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(target)
    with tmp.open("wb") as f:
        f.write(data)
    tmp.replace(target)


def write_text(p, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def read_text(p) -> str:
    return path(p).read_text()


def write_json(p, payload) -> None:
    """Pretty, key-sorted JSON written atomically; values JSON cannot hold become strings."""
    write_text(p, json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")


def read_json(p):
    return json.loads(read_text(p))


def save_npz(p, **arrays) -> None:
    """np.savez of `arrays`, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(p, buffer.getvalue())


def load_npz(p) -> dict:
    """All arrays of an .npz file as a dict of numpy arrays."""
    with path(p).open("rb") as f:
        with np.load(io.BytesIO(f.read())) as data:
            return {k: data[k] for k in data.files}


def save_png(p, pixels: np.ndarray) -> None:
    """uint8 pixels [H, W] or [H, W, 3] -> a PNG file, written atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    write_bytes(p, buffer.getvalue())
