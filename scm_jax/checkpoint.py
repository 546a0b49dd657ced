"""The checkpoint store: a stage's train state and data position with orbax.

A stage's directory holds `checkpoints/<step>/` (orbax writes each step to a temporary folder
and renames it when complete, so a killed run never leaves a half checkpoint behind). Re-running
the same command restores the latest step: every network's params, optimizer state and EMA, the
step, the rng and the data position, each array checked against its fingerprint
(`tree_checks.fingerprints`). A checkpoint whose arrays do not fit the config's state is a
CheckpointMismatchError naming the directory and the entries, raised before anything is
written. What a stage means (`config.json`) is `stage_identity`; restoring another stage's EMA
is `stage_restore`.

Directories go through `etils.epath` (local paths and buckets alike). Stores of stages trained
side by side on threads of one process (`pipeline.py`) make their orbax calls one at a time
(`_ORBAX_CALLS`): two managers saving at once from two threads collide in orbax's temporary
folders (FileExistsError, tests/test_pipeline_workers.py); the background writes still overlap.
"""
import threading

import orbax.checkpoint as ocp

from scm_jax import files
from scm_jax.checkpoint_layout import saved_layout, to_config_layout
from scm_jax.errors import CheckpointMismatchError, UserError
from scm_jax.tree_checks import compare_trees, fingerprints

# The data-position entry of a checkpoint whose weights were imported (`import_teacher`): no
# data was read, so a resumed run starts its data pipeline at the beginning.
IMPORTED = "imported"
_ORBAX_CALLS = threading.RLock()   # see the module's docstring
QUARANTINE_PREFIX = "corrupt-"   # checkpoints/corrupt-<step>-<time>: set aside, kept for forensics


class CorruptCheckpointError(CheckpointMismatchError):
    """A checkpoint's files are unreadable, incomplete, or hold other values than were saved."""


class CheckpointSaveError(UserError):
    """Writing a checkpoint failed (full disk, lost permissions, ...); the previous one stands."""


# --- Where a stage lives, and what it means ----------------------------------------------------
def has_checkpoint(directory) -> bool:
    """True if `directory` holds at least one finished checkpoint (without creating anything)."""
    root = files.join(directory, "checkpoints")
    return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())


def _restore_args_of(abstract):
    return ocp.checkpoint_utils.construct_restore_args(abstract)


def _restore_args(abstract):
    return ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args_of(abstract))


class CheckpointStore:
    """orbax CheckpointManager for one training stage: the state (a pytree), the data position
    and the state's fingerprints (`fingerprints`), checked on every restore.

    A save is asynchronous: `save` returns once the arrays are on the host, and the first call
    after a failed background write (`check`, `save`, `close`) raises CheckpointSaveError.
    """

    def __init__(self, directory, *, keep: int = 2, async_save: bool = True,
                 barrier_prefix: str | None = None):
        """`barrier_prefix` names this store's cross-process barriers: a store saving while
        another one's asynchronous save is in flight (a stage's post-hoc EMA snapshots beside
        its checkpoints) needs its own, or the processes of a multi-process run meet in each
        other's barriers and wait forever."""
        self.directory = files.path(directory)
        self._pending = None   # the step of the save in flight (or the last one)
        self.manager = ocp.CheckpointManager(
            self.directory / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=barrier_prefix)),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "integrity": ocp.JsonCheckpointHandler()})

    def latest_step(self):
        return self.manager.latest_step()

    def _failed(self, err) -> CheckpointSaveError:
        self.manager.reload()   # what is on disk: the failed step never committed
        return CheckpointSaveError(
            f"saving checkpoint {self._pending} in {self.directory / 'checkpoints'} failed: "
            f"{type(err).__name__}: {err}; the previous checkpoint ({self.latest_step()}) is "
            f"intact")

    def check(self) -> None:
        """Raises CheckpointSaveError if a background save has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as err:  # noqa: BLE001 - whatever the storage layer raised
            raise self._failed(err) from err

    def wait(self) -> None:
        """Waits for the save in flight; CheckpointSaveError if it failed."""
        try:
            with _ORBAX_CALLS:
                self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - whatever the storage layer raised
            raise self._failed(err) from err
        self.check()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
        # orbax waits for the previous save before it starts another: report its failure as
        # that step's, before this one begins.
        self.wait()
        integrity = dict(format="fingerprint-u32-v1", arrays=fingerprints(state))
        self._pending = step
        try:
            with _ORBAX_CALLS:
                self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
                    integrity=ocp.args.JsonSave(integrity)), force=force)
        except Exception as err:  # noqa: BLE001 - the storage layer's error, named
            raise self._failed(err) from err

    def _where(self, step) -> str:
        return str(self.directory / "checkpoints" / str(step))

    def _saved_tree(self, step):
        try:
            with _ORBAX_CALLS:
                meta = self.manager.item_metadata(step)
        except Exception as err:  # noqa: BLE001 - unreadable metadata means a corrupt checkpoint
            raise CorruptCheckpointError(f"checkpoint at {self._where(step)} is unreadable: "
                                         f"{err}") from err
        saved = meta["state"] if meta is not None else None
        return getattr(saved, "tree", saved)

    def _read(self, step, state_args, where):
        """Restores the state (per `state_args`) and the JSON items, as CorruptCheckpointError
        when the files cannot be read."""
        try:
            with _ORBAX_CALLS:
                return self.manager.restore(step, args=ocp.args.Composite(
                    state=state_args, data=ocp.args.JsonRestore(),
                    integrity=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - orbax raises many types for bad checkpoints
            raise CorruptCheckpointError(
                f"checkpoint at {where} could not be read: {type(err).__name__}: "
                f"{' '.join(str(err).split())[:300]}") from err

    @staticmethod
    def _verify(restored_state, integrity, where: str) -> None:
        expected = (integrity or {}).get("arrays")
        if not isinstance(expected, dict):
            raise CorruptCheckpointError(f"checkpoint at {where} has no fingerprints (an "
                                         f"incomplete or foreign checkpoint)")
        for name, value in fingerprints(restored_state).items():
            if expected.get(name) != value:
                raise CorruptCheckpointError(
                    f"checkpoint at {where} is corrupt: {name} does not hold the values that "
                    f"were saved (fingerprint {value}, saved {expected.get(name)})")

    def restore(self, abstract_state, step=None):
        """(state, data_state) at `step` (default: latest) into `abstract_state`'s shapes (and
        shardings, when its ShapeDtypeStructs carry them), verified against the fingerprints
        saved with it. CheckpointMismatchError when the checkpoint does not fit the config;
        CorruptCheckpointError when its files are broken."""
        step = self.latest_step() if step is None else step
        where = self._where(step)
        saved = self._saved_tree(step)
        # Written with the other block layout (`model.scan_blocks`): read as written, verify,
        # then rearrange.
        other = saved_layout(abstract_state, saved) if saved is not None else None
        target = abstract_state if other is None else other
        if saved is not None:
            compare_trees(target, saved, where)
        restored = self._read(step, _restore_args(target), where)
        compare_trees(target, restored["state"], where)
        self._verify(restored["state"], restored["integrity"], where)
        state = restored["state"] if other is None else to_config_layout(restored["state"],
                                                                          abstract_state)
        return state, restored["data"]

    def restore_latest_intact(self, abstract_state, *, log=print):
        """(state, data_state, step) of the newest checkpoint that reads back intact. Each newer
        one that does not is reported by name and set aside as checkpoints/corrupt-<step>-...
        (kept, no longer a step). CorruptCheckpointError if none is intact."""
        problems = []
        self.manager.reload()   # the steps on disk now (another process may have written)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self.restore(abstract_state, step)
            except CorruptCheckpointError as err:
                problems.append(str(err))
                log(f"warning: {err}; setting it aside and trying the previous checkpoint")
                self._set_aside(step)
                continue
            return state, data, step
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.directory / 'checkpoints'}: {'; '.join(problems)}. "
            f"The broken ones are kept as {QUARANTINE_PREFIX}<step>-*; delete the stage "
            f"directory to start it afresh")

    def _set_aside(self, step) -> None:
        import time

        from scm_jax import processes

        if files.is_primary():
            src = self.directory / "checkpoints" / str(step)
            src.rename(self.directory / "checkpoints" / f"{QUARANTINE_PREFIX}{step}-{int(time.time())}")
        processes.barrier(f"set aside checkpoint {step}")
        self.manager.reload()

    def restore_subtree(self, subtree: dict, step=None):
        """Only the arrays of `subtree` (nested dicts of field names -> abstract arrays, e.g.
        {'nets': {'net': {'ema': ...}}}) at `step`, verified: nothing else is read."""
        step = self.latest_step() if step is None else step
        where = self._where(step)
        saved = self._saved_tree(step)
        other = None
        if saved is not None:
            picked = _pick(saved, subtree, where)
            other = saved_layout(subtree, picked)   # the other block layout (see `restore`)
            compare_trees(subtree if other is None else other, picked, where)
        target = subtree if other is None else other
        restored = self._read(step, ocp.args.PyTreeRestore(
            item=target, partial_restore=True, restore_args=_restore_args_of(target)), where)
        self._verify(restored["state"], restored["integrity"], where)
        return restored["state"] if other is None else to_config_layout(restored["state"],
                                                                        subtree)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with _ORBAX_CALLS:
                self.manager.close()


def _pick(saved, subtree, where, depth: int = 3):
    """The part of the saved metadata tree that `subtree` names, to `depth` levels (e.g.
    nets/<network>/ema); below that, the saved tree as it is."""
    if not isinstance(subtree, dict) or depth == 0:
        return saved
    out = {}
    for key, value in subtree.items():
        if not isinstance(saved, dict) or key not in saved:
            raise CheckpointMismatchError(f"checkpoint at {where} has no entry {key!r}")
        out[key] = _pick(saved[key], value, where, depth - 1)
    return out


# --- Restoring another stage's model -----------------------------------------------------------
