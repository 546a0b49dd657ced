r"""Convert pretrained PyTorch weights once into the .npz file an evaluation network loads.

    python -m scm_jax.convert_weights --network=inception \
        --src=/weights/pt_inception-2015-12-05-6726825d.pth --out=/weights/inception_fid.npz
    python -m scm_jax.convert_weights --network=dinov2 \
        --src=/weights/dinov2_vitl14_pretrain.pth --out=/weights/dinov2_vitl14.npz

--src is a `torch.save` state dict (.pth / .pt / .bin, read without torch), .safetensors or
.npz; every key and shape is checked (`scm_jax.evaluation.weight_conversion`), and --out is
written atomically (it may be a gs:// path). Nothing is downloaded. One line is printed: the
path, the number of arrays and of parameters.

Exit status: 0 on success; 2 for a known failure (a missing --src, an unknown --network, a file
that is not a state dict, weights that do not convert), printed as one line `error: ...`.
"""
import sys

from absl import flags

from scm_jax import cli
from scm_jax.errors import UserError
from scm_jax.evaluation import weight_conversion


def _define_flags(fv) -> None:
    flags.DEFINE_enum("network", None, list(weight_conversion.NETWORKS),
                      "which network the weights are for", flag_values=fv)
    flags.DEFINE_string("src", None, "the PyTorch state dict (.pth/.pt/.bin), .safetensors or "
                        ".npz to convert (local path or bucket URI)", flag_values=fv)
    flags.DEFINE_string("out", None, "the .npz to write (local path or bucket URI)",
                        flag_values=fv)
    flags.mark_flags_as_required(["network", "src", "out"], flag_values=fv)


def _convert(fv, overrides) -> int:
    network, src, out = fv.network, fv.src, fv.out
    try:
        arrays = weight_conversion.convert(network, src, out)
    except UserError:   # ConfigError is a ValueError too: its message stands as it is
        raise
    except (ValueError, KeyError) as err:
        message = f"missing entry {err}" if isinstance(err, KeyError) else cli.one_line(err)
        raise UserError(f"cannot convert {src!r} for --network={network}: {message}") from err
    print(f"wrote {out}: {len(arrays)} arrays, {weight_conversion.parameter_count(arrays):,} "
          f"parameters ({network}, from {src})", flush=True)
    return 0


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    return cli.run_command(__doc__, _define_flags, _convert, argv, takes_overrides=False)


if __name__ == "__main__":
    sys.exit(main())
