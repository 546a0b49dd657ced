"""Converting pretrained PyTorch weights once into the .npz file an evaluation network loads
(the command is `python -m scm_jax.convert_weights`, `scm_jax/convert_weights.py`).

The source is any file `weights.load_state_dict` reads: a `torch.save` state dict (.pth / .pt /
.bin, read without torch), .safetensors or .npz. The network's module
(`scm_jax.evaluation.<network>`) converts it with `convert_state_dict(state)`, which checks
every key and shape; the result (nested dicts flattened to '/'-joined names) is written
atomically (a temporary file, then a rename; the output may be a gs:// path). Nothing is
downloaded.
"""
import importlib
import inspect
from collections.abc import Mapping

import numpy as np

from scm_jax.evaluation.features import NETWORKS as FEATURE_NETWORKS

NETWORKS = tuple(FEATURE_NETWORKS)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def parameter_count(arrays: dict) -> int:
    """Elements of the numeric arrays (a format marker string is not a parameter)."""
    return int(sum(a.size for a in arrays.values()
                   if np.issubdtype(a.dtype, np.number) or a.dtype == bool))


def convert(network: str, src, out) -> dict:
    """Reads the state dict at `src`, converts it for `network` and writes the .npz to `out`;
    returns the arrays written. ConfigError for an unknown network or an `out` that is not
    .npz; the loader's errors (MissingInputError, TorchFileError) and the converter's
    (ValueError, KeyError) pass through."""
    from scm_jax import files
    from scm_jax.errors import ConfigError
    from scm_jax.evaluation import weights

    if network not in NETWORKS:
        raise ConfigError(f"--network={network!r} is not one of {', '.join(NETWORKS)}")
    if not str(out).endswith(".npz"):
        # weights.load_state_dict tells formats apart by the file name.
        raise ConfigError(f"--out={str(out)!r} must name a .npz file")
    state = weights.load_state_dict(src, what=f"the {network} weights (--src)")
    # Imported by name: each network's module is independent of this command.
    converter = importlib.import_module(f"scm_jax.evaluation.{network}").convert_state_dict
    kwargs = {}
    if "source" in inspect.signature(converter).parameters:
        kwargs["source"] = repr(str(src))
    arrays = _flatten(converter(state, **kwargs))
    files.save_npz(out, **arrays)
    return arrays
