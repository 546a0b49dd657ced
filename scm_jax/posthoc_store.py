"""Where post-hoc EMA lives on disk (EDM2, Karras et al. 2024, Sec. 3): a stage's snapshots of
its tracked power EMAs, and the EMAs reconstructed from them.

    <stage dir>/posthoc/checkpoints/<step>/                 a snapshot: {'ema0': ..., 'ema1': ...}
                                                            (the `ema.posthoc_sigma_rels` in
                                                            order) and {sigma_rels, step}
    <stage dir>/posthoc_ema/sigma_rel_<s>/checkpoints/<T>/  the EMA of sigma_rel s at step T,
                                                            as {'nets': {'net': {'ema': ...}}}

Both are orbax checkpoints through `checkpoint.CheckpointStore` (atomic, sharded like the
params, fingerprinted, every process taking part and the primary writing metadata), so a
reconstructed EMA restores exactly as a stage's own EMA does (`stage_restore`). A resumed stage
drops the snapshots taken after the checkpoint it resumes from: the steps are re-run and their
snapshots taken again.
"""
from scm_jax import files
from scm_jax.checkpoint import CheckpointStore, has_checkpoint
from scm_jax.ema import posthoc_key

SNAPSHOTS = "posthoc"
RECONSTRUCTED = "posthoc_ema"


def snapshot_dir(stage_directory):
    return files.join(stage_directory, SNAPSHOTS)


def reconstructed_dir(stage_directory, sigma_rel: float):
    """<stage dir>/posthoc_ema/sigma_rel_<s> (s as `%g` prints it: 0.015, 0.1)."""
    return files.join(stage_directory, RECONSTRUCTED, f"sigma_rel_{float(sigma_rel):g}")


def reconstructed_sigma_rels(stage_directory) -> list[float]:
    """The sigma_rels reconstructed so far for the stage in `stage_directory`."""
    root = files.join(stage_directory, RECONSTRUCTED)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        if entry.name.startswith("sigma_rel_") and has_checkpoint(entry):
            try:
                out.append(float(entry.name[len("sigma_rel_"):]))
            except ValueError:
                continue
    return sorted(out)


class SnapshotWriter:
    """Takes a stage's snapshots during training: every `every` steps and at the stage's last
    step, the network's tracked EMAs (`NetState.posthoc`)."""

    def __init__(self, stage_directory, sigma_rels, every: int, steps: int, resume_step: int,
                 log=print):
        self.sigma_rels, self.every, self.steps = tuple(sigma_rels), int(every), int(steps)
        self.store = CheckpointStore(snapshot_dir(stage_directory), keep=None,
                                     barrier_prefix="posthoc")
        self.store.manager.reload()
        later = [s for s in self.store.manager.all_steps() if s > resume_step]
        for step in later:   # taken after the checkpoint resumed from: re-taken as the steps re-run
            self.store.manager.delete(step)
        if later:
            log(f"[posthoc] dropped {len(later)} snapshot(s) after step {resume_step} (steps "
                f"{min(later)}..{max(later)} run again)")

    def after_step(self, done: int, posthoc) -> None:
        """Saves the snapshot of step `done` when one is due (asynchronously)."""
        if done % self.every == 0 or done == self.steps:
            self.store.save(done, posthoc, dict(sigma_rels=list(self.sigma_rels), step=done),
                            force=True)

    def close(self) -> None:
        self.store.close()


def snapshot_steps(stage_directory) -> list[tuple[int, tuple]]:
    """[(step, sigma_rels)] of every snapshot of the stage in `stage_directory`, by step."""
    import orbax.checkpoint as ocp

    directory = snapshot_dir(stage_directory)
    if not has_checkpoint(directory):
        return []
    store = CheckpointStore(directory, keep=None, async_save=False)
    try:
        out = []
        for step in sorted(store.manager.all_steps()):
            data = store.manager.restore(step, args=ocp.args.Composite(
                data=ocp.args.JsonRestore()))["data"]
            out.append((int(step), tuple(float(s) for s in data["sigma_rels"])))
        return out
    finally:
        store.close()


def read_snapshot(stage_directory, step: int, abstract_ema, count: int) -> list:
    """The `count` tracked EMAs of the snapshot at `step`, in order, each restored into the
    structure (and shardings, if any) of `abstract_ema` and verified against its fingerprints."""
    store = CheckpointStore(snapshot_dir(stage_directory), keep=None, async_save=False)
    try:
        abstract = {posthoc_key(i): abstract_ema for i in range(count)}
        tree, _ = store.restore(abstract, step)
    finally:
        store.close()
    return [tree[posthoc_key(i)] for i in range(count)]


def write_reconstructed(stage_directory, sigma_rel: float, step: int, ema, info: dict) -> str:
    """Saves `ema` as the stage's post-hoc EMA of `sigma_rel` at `step`, with `info` (how it was
    made) beside it; replaces an earlier reconstruction of the same sigma_rel. Returns where."""
    directory = reconstructed_dir(stage_directory, sigma_rel)
    store = CheckpointStore(directory, keep=1, async_save=False)
    try:
        for old in store.manager.all_steps():
            store.manager.delete(old)
        store.save(int(step), {"nets": {"net": {"ema": ema}}}, info, force=True)
    finally:
        store.close()
    return str(directory)
