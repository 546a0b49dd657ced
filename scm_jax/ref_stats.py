r"""Reference statistics of a dataset's real images: what FID and FD-DINOv2 compare against.

    python -m scm_jax.ref_stats --config=experiments/imagenet512.py:variant=xxl \
        --out=/data/in512_ref.npz [--data_dir=$TFDS_DIR] [--split=train] [--batch_size=500] \
        [--config.eval.inception_weights=...] [--config.eval.dinov2_weights=...] [--distributed]

One ordered pass over the split with every network of `config.eval.features`, over every device
and process (`scm_jax.evaluation.dataset_reference`); every --save_every batches its state is
saved beside --out, and re-running the same command resumes there. Then
`--config.eval.reference=<out>` scores against it.

Exit status: 0, or 2 with one line `error: ...` for a known failure (missing weights or data,
a bad flag).
"""
import sys

from absl import flags

from scm_jax import cli, files, sharding
from scm_jax.evaluation import dataset_reference


def _define_flags(fv) -> None:
    cli.define_config_flags(fv)
    flags.DEFINE_string("out", None, "the .npz to write (local path or gs://)", flag_values=fv)
    flags.DEFINE_string("data_dir", "", "TFDS data_dir of the real images (default: the "
                        "config's, or TFDS's)", flag_values=fv)
    flags.DEFINE_string("split", "train", "TFDS split", flag_values=fv)
    flags.DEFINE_integer("batch_size", 500, "images per step over all devices", flag_values=fv)
    flags.DEFINE_integer("save_every", 20, "batches between saved partial states", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)


def _run(fv, overrides) -> None:
    config = cli.load_config(fv, overrides)
    say = (lambda m: print(m, flush=True)) if files.is_primary() else (lambda m: None)
    dataset_reference.compute(config.eval, config.data, sharding.make_mesh(config.mesh), fv.out,
                              data_dir=fv.data_dir, split=fv.split, batch_size=fv.batch_size,
                              save_every=fv.save_every, log=say)


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    return cli.run_command(__doc__, _define_flags, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
