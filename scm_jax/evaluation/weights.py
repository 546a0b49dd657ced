"""Reading pretrained weights the user gives: a state dict as numpy arrays, without torch.

    state = load_state_dict("/weights/pt_inception-2015-12-05-6726825d.pth",
                            what="the FID Inception-v3 weights", source="https://...")
    # {'Conv2d_1a_3x3.conv.weight': np.ndarray [32, 3, 3, 3], ...}

Formats, by file name: `.npz` (numpy), `.safetensors` (the safetensors numpy loader), and
`.pth` / `.pt` / `.bin` (a PyTorch `torch.save` of a state dict, read here without torch).
Nothing is downloaded: a missing file is a `MissingInputError` naming the path, what it should
hold and where to get it.
"""
import os

import numpy as np

from scm_jax import files
from scm_jax.errors import MissingInputError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def require_file(path, what: str, source: str = "") -> None:
    """MissingInputError unless `path` exists: '<what> not found at <path>; <source>'."""
    if not path or not files.exists(path):
        hint = f"; {source}" if source else ""
        raise MissingInputError(f"{what} not found at {path!r}{hint}")


def load_state_dict(path, what: str = "weights", source: str = "") -> dict:
    """name -> np.ndarray of the weights file at `path` (see the module docstring)."""
    require_file(path, what, source)
    name = os.fspath(path).lower()
    if name.endswith(".npz"):
        with files.path(path).open("rb") as f:
            with np.load(f, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
    if name.endswith(".safetensors"):
        from safetensors.numpy import load as load_safetensors

        return dict(load_safetensors(files.path(path).read_bytes()))
    if name.endswith(TORCH_SUFFIXES):
        from scm_jax.evaluation import torch_pickle

        return torch_pickle.load(path)
    raise ValueError(f"{what}: cannot read {path!r}; expected a .npz, .safetensors or "
                     f"{'/'.join(TORCH_SUFFIXES)} file")
