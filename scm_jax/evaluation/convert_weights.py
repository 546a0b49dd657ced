r"""Convert pretrained PyTorch weights once into the .npz file an evaluation network loads.

    python -m scm_jax.evaluation.convert_weights --network=inception \
        --src=/weights/pt_inception-2015-12-05-6726825d.pth --out=/weights/inception_fid.npz
    python -m scm_jax.evaluation.convert_weights --network=dinov2 \
        --src=/weights/dinov2_vitl14_pretrain.pth --out=/weights/dinov2_vitl14.npz

--src is any file `weights.load_state_dict` reads: a `torch.save` state dict (.pth / .pt /
.bin, read without torch), .safetensors or .npz. The network's module
(`scm_jax.evaluation.<network>`) converts it with `convert_state_dict(state)`, which checks
every key and shape; the result (nested dicts flattened to '/'-joined names) is written to
--out atomically (a temporary file, then a rename; --out may be a gs:// path). Nothing is
downloaded. One line is printed: the path, the number of arrays and of parameters.

Exit status: 0 on success; 2 for a known failure (a missing --src, an unknown --network, a file
that is not a state dict, weights that do not convert), printed as one line `error: ...`.
"""
import importlib
import inspect
import sys
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


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_enum("network", None, list(NETWORKS), "which network the weights are for",
                      flag_values=fv)
    flags.DEFINE_string("src", None, "the PyTorch state dict (.pth/.pt/.bin), .safetensors or "
                        ".npz to convert (local path or bucket URI)", flag_values=fv)
    flags.DEFINE_string("out", None, "the .npz to write (local path or bucket URI)",
                        flag_values=fv)
    flags.mark_flags_as_required(["network", "src", "out"], flag_values=fv)


def _convert(fv, overrides) -> int:
    from scm_jax import cli
    from scm_jax.errors import UserError

    network, src, out = fv.network, fv.src, fv.out
    try:
        arrays = convert(network, src, out)
    except UserError:   # ConfigError is a ValueError too: its message stands as it is
        raise
    except (ValueError, KeyError) as err:
        message = f"missing entry {err}" if isinstance(err, KeyError) else cli.one_line(err)
        raise UserError(f"cannot convert {src!r} for --network={network}: {message}") from err
    print(f"wrote {out}: {len(arrays)} arrays, {parameter_count(arrays):,} parameters "
          f"({network}, from {src})", flush=True)
    return 0


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    from scm_jax import cli

    return cli.run_command(__doc__, _define_flags, _convert, argv,
                           takes_overrides=False)


if __name__ == "__main__":
    sys.exit(main())
