r"""Encode ImageNet 512x512 into SD-VAE latents for latent-space training (sCM App. G).

    python -m scm_jax.encode_latents \
        --vae=/path/to/sd-vae-ft-mse/diffusion_pytorch_model.safetensors \
        --data_dir=/path/to/tensorflow_datasets --out=/path/to/imagenet512_latents

Run the same command on every worker of a pod (with --distributed): each process encodes its
own share into shards, a re-run resumes at the first missing shard, and the last process to
finish writes index.json (`scm_jax.data.latent_encoder` says how). The output directory must be
shared by all processes (an NFS/Filestore mount, or a gs:// bucket).

Exit status: 0, or 2 with one line `error: ...` for a known failure (missing weights or data,
a bad flag).
"""
import sys

from absl import flags

from scm_jax import cli
from scm_jax.data import latent_encoder


def _define_flags(fv) -> None:
    flags.DEFINE_string("vae", None, "sd-vae-ft-mse diffusion_pytorch_model.safetensors (or its "
                        "directory), downloaded by you from stabilityai/sd-vae-ft-mse.",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", "", "TFDS data directory holding imagenet2012 (array_record).",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory (shared by all processes).", flag_values=fv)
    flags.DEFINE_string("split", "train", "TFDS split to encode.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Global batch size (over all processes).",
                         flag_values=fv)
    flags.DEFINE_integer("shard_batches", 32, "Batches per shard (the unit of resumption).",
                         flag_values=fv)
    flags.DEFINE_enum("storage_dtype", "float32", list(latent_encoder.STORAGE_DTYPES),
                      "dtype of the stored mean and std. float16 halves the disk (ImageNet train: "
                      "~84 GB instead of ~168 GB) at ~1e-3 relative precision.", flag_values=fv)
    flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype.",
                      flag_values=fv)
    flags.DEFINE_integer("num_workers", 0, "grain worker processes decoding images (0: threads "
                         "in this process).", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).",
                      flag_values=fv)
    flags.mark_flags_as_required(["vae", "out"], flag_values=fv)


def _run(fv, overrides) -> None:
    import jax

    if fv.distributed:
        jax.distributed.initialize()
    latent_encoder.encode_imagenet(
        vae_path=fv.vae, out=fv.out, data_dir=fv.data_dir, split=fv.split,
        batch_size=fv.batch_size, shard_batches=fv.shard_batches,
        storage_dtype=fv.storage_dtype, compute_dtype=fv.compute_dtype,
        num_workers=fv.num_workers, log=lambda msg: print(msg, flush=True))


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    return cli.run_command(__doc__, _define_flags, _run, argv, takes_overrides=False)


if __name__ == "__main__":
    sys.exit(main())
