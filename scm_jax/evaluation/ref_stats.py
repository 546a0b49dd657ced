r"""Reference statistics of a dataset's real images: what FID and FD-DINOv2 compare against.

    python -m scm_jax.evaluation.ref_stats --config=experiments/imagenet512.py:variant=xxl \
        --out=/data/in512_ref.npz [--data_dir=$TFDS_DIR] [--split=train] [--batch_size=500] \
        [--config.eval.inception_weights=...] [--config.eval.dinov2_weights=...] [--distributed]

One ordered pass over the split (every image once, no flips), split over every device and
every process (each process reads its own rows through grain, `data.images`), the features of
every network of `config.eval.features` accumulated in float64 (`statistics.FeatureMoments`),
the first `config.eval.pr_samples` Inception feature vectors kept for precision / recall. The
ImageNet 512 latent experiments are measured on the real 512x512 images (ADM's crop), not on
decoded latents. Every `--save_every` batches the accumulators and the data position are saved
to `<out>.partial.npz`; re-running the same command resumes there. The result is written with
`reference.save` (then `config.eval.reference=<out>` uses it).

Exit status: 0, or 2 with one line `error: ...` for a known failure (missing weights or data,
a bad flag).
"""
import json
import sys
import time

import jax
import numpy as np

from scm_jax import cli, files, sharding
from scm_jax.errors import ConfigError
from scm_jax.evaluation import features as features_lib
from scm_jax.evaluation import reference as reference_lib
from scm_jax.evaluation.scorer import PR_NETWORK
from scm_jax.evaluation.statistics import FeatureMoments


def image_config(config, data_dir: str = "", split: str = "train"):
    """The pixel dataset whose images the models of `config` are compared with."""
    from scm_jax.data.images import image_data_config

    data = config.data
    if data.name == "digits":
        raise ConfigError("the digits experiment is scored with its own classifier "
                          "(config.eval.features = ()); it has no reference statistics")
    name = "imagenet512" if data.name == "imagenet512_latents" else data.name
    overrides = dict(resolution=int(data.resolution), split=split)
    if data_dir or data.get("data_dir", ""):
        overrides["data_dir"] = data_dir or data.data_dir
    return image_data_config(name, **overrides)


def _valid_rows(n: int, batch_size: int, process_count: int) -> np.ndarray:
    """Positions of real rows in a global batch of n (<= batch_size) rows whose processes each
    padded their block to batch_size / process_count."""
    from scm_jax.data.signed_iterator import process_rows

    share = batch_size // process_count
    return np.concatenate([p * share + np.arange(len(process_rows(n, p, process_count)))
                           for p in range(process_count)])


def compute(config, out, *, data_dir: str = "", split: str = "train", batch_size: int = 500,
            save_every: int = 20, max_batches: int | None = None, log=print):
    """Computes (and writes to `out`) the reference of `config`'s data; returns it, or None
    when stopped early by `max_batches` (its state saved for the next call to resume)."""
    from scm_jax.data.images import build_image_batches

    ev = config.eval
    data = image_config(config, data_dir, split)
    mesh = sharding.make_mesh(config.mesh)
    pcount, pindex = jax.process_count(), jax.process_index()
    devices = sharding.batch_devices(mesh)
    batch_size = -(-batch_size // (devices * pcount)) * devices * pcount
    networks = features_lib.load(ev)
    featurize = features_lib.featurizer(networks, mesh)
    batches = build_image_batches(data, batch_size=batch_size, seed=0, process_index=pindex,
                                  process_count=pcount, shuffle=False, num_epochs=1,
                                  drop_remainder=False)
    total = batches.num_batches
    num_records = batches.get_state()["num_records"]
    partial = files.path(f"{out}.partial.npz")
    moments = {n.name: FeatureMoments(n.dim) for n in networks}
    kept, done = [], 0
    if files.exists(partial):
        state = files.load_npz(partial)
        batches.set_state(json.loads(str(state["data_state"])))
        done = int(json.loads(str(state["data_state"]))["batches"])
        moments = {n.name: FeatureMoments.from_state(state, f"{n.name}/") for n in networks}
        kept = [state["pr_features"]] if "pr_features" in state else []
        log(f"[ref_stats] resuming at batch {done} of {total} ({partial})")

    def save_partial():
        if files.is_primary():
            arrays = dict(data_state=np.array(json.dumps(batches.get_state())))
            for name, m in moments.items():
                arrays.update(m.state(f"{name}/"))
            if kept:
                arrays["pr_features"] = np.concatenate(kept)
            files.save_npz(partial, **arrays)

    share = batch_size // pcount
    start = time.time()
    for b in range(done, total):
        if max_batches is not None and b - done >= max_batches:
            save_partial()
            return None
        local = next(batches)["image"]
        rows = min(batch_size, num_records - b * batch_size)
        padded = np.zeros((share,) + local.shape[1:], np.float32)
        padded[:len(local)] = local
        images = jax.make_array_from_process_local_data(sharding.batch_sharded(mesh), padded)
        feats, _ = featurize(images)
        valid = _valid_rows(rows, batch_size, pcount)
        for name, m in moments.items():
            m.add(np.asarray(feats[name])[valid])
        have = sum(len(k) for k in kept)
        if PR_NETWORK in feats and have < ev.pr_samples:
            kept.append(np.asarray(feats[PR_NETWORK])[valid][:ev.pr_samples - have])
        if (b + 1) % save_every == 0 and b + 1 < total:
            save_partial()
        if (b + 1 - done) % max(1, total // 20) == 0 or b + 1 == total:
            rate = (b + 1 - done) * batch_size / max(time.time() - start, 1e-9)
            log(f"[ref_stats] {min((b + 1) * batch_size, num_records)}/{num_records} images, "
                f"{rate:.1f}/s, eta {(total - b - 1) * batch_size / max(rate, 1e-9):.0f}s")
    ref = reference_lib.Reference(
        stats={name: m.mean_cov() for name, m in moments.items()},
        features={PR_NETWORK: np.concatenate(kept)} if kept else {},
        num_images=num_records, dataset=f"{data.name}:{data.split}@{data.resolution}",
        source=str(out))
    if files.is_primary():
        reference_lib.save(out, ref)
        if files.exists(partial):
            partial.unlink()
    log(f"[ref_stats] wrote {out}: {num_records} images, "
        + ", ".join(f"{n.name} ({n.dim}-d)" for n in networks))
    return ref


def _define_flags(fv) -> None:
    from absl import flags

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
    compute(config, fv.out, data_dir=fv.data_dir, split=fv.split, batch_size=fv.batch_size,
            save_every=fv.save_every, log=say)


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    return cli.run_command(__doc__, _define_flags, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
