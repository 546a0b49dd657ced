"""Reference statistics of a dataset's real images: what FID and FD-DINOv2 compare against
(the command is `python -m scm_jax.ref_stats`, `scm_jax/ref_stats.py`).

One ordered pass over the split (every image once, no flips), split over every device and
every process (each process reads its own rows through grain, `data.images`), the features of
every network of `eval.features` accumulated in float64 (`statistics.FeatureMoments`), the
first `eval.pr_samples` Inception feature vectors kept for precision / recall. The ImageNet 512
latent experiments are measured on the real 512x512 images (ADM's crop), not on decoded
latents. Every `save_every` batches the accumulators and the data position are saved to
`<out>.partial.npz`; calling again with the same arguments resumes there. The result is written
with `reference.save` (then `config.eval.reference=<out>` uses it).
"""
import json
import time

import jax
import numpy as np

from scm_jax import files, sharding
from scm_jax.errors import ConfigError
from scm_jax.evaluation import features as features_lib
from scm_jax.evaluation import reference as reference_lib
from scm_jax.evaluation.scorer import PR_NETWORK
from scm_jax.evaluation.statistics import FeatureMoments


def image_config(data, data_dir: str = "", split: str = "train"):
    """The pixel dataset whose images the models trained on `data` (a config's `data` section)
    are compared with."""
    from scm_jax.data.images import image_data_config

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


def compute(ev, data, mesh, out, *, data_dir: str = "", split: str = "train",
            batch_size: int = 500, save_every: int = 20, max_batches: int | None = None,
            log=print):
    """Computes (and writes to `out`) the reference statistics of the real images of `data`
    (a config's `data` section) with the feature networks of `ev` (its `eval` section) on
    `mesh`; returns the `reference.Reference`, or None when stopped early by `max_batches` (its
    state saved for the next call to resume)."""
    from scm_jax.data.images import build_image_batches

    data = image_config(data, data_dir, split)
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
