"""Checkpoints with orbax: the whole train state, the data position, and what a stage means.

A stage's directory holds `checkpoints/<step>/` (orbax writes each step to a temporary folder
and renames it when complete, so a killed run never leaves a half checkpoint behind) and
`config.json`: the stage's *identity* (architecture, dataset identity and sigma_d, objective),
which decides whether a checkpoint may be resumed or loaded as a teacher, and the full config
it was started with, for the record. Re-running the same command restores the latest step:
every network's params, optimizer state and EMA, the step, the rng and the data position.

Only the identity is compared: data paths, worker counts, the attention kernel, the compute
dtype, dropout, optimizer settings and step counts may change between runs. A difference, or
a checkpoint whose arrays do not fit the config's state, is a CheckpointMismatchError naming
the directory and the entries, raised before anything is written.

Directories go through `etils.epath` (local paths and buckets alike).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from scm_jax.checkpoint_layout import saved_layout, to_config_layout
from scm_jax import data as data_lib
from scm_jax import files, objectives, sharding
from scm_jax.errors import CheckpointMismatchError, MissingInputError, UserError
from scm_jax.networks import NON_IDENTITY_KEYS as MODEL_NON_IDENTITY_KEYS
from scm_jax.networks import STABILIZER_KEYS

RECORD_FILE = "config.json"
QUARANTINE_PREFIX = "corrupt-"   # checkpoints/corrupt-<step>-<time>: set aside, kept for forensics


class CorruptCheckpointError(CheckpointMismatchError):
    """A checkpoint's files are unreadable, incomplete, or hold other values than were saved."""


class CheckpointSaveError(UserError):
    """Writing a checkpoint failed (full disk, lost permissions, ...); the previous one stands."""


# --- Where a stage lives, and what it means ----------------------------------------------------
def stage_dir(config, name: str, workdir) -> str:
    """<workdir>/<name>, or the stage's own `checkpoint_dir` (e.g. a teacher trained elsewhere)."""
    return config[name].checkpoint_dir or str(files.join(workdir, name))


def _plain(value):
    """A JSON-normal form: ConfigDicts as dicts, tuples as lists, other values as JSON has them."""
    import json

    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=str))


def stage_identity(config, objective) -> dict:
    """What a checkpoint of this stage means: its architecture (config.model as the objective
    builds it, less how it is computed), its dataset's identity (config.data less paths and
    throughput settings; sigma_d included) and its objective."""
    model = {k: v for k, v in _plain(objective.model_cfg).items()
             if k not in MODEL_NON_IDENTITY_KEYS}
    data = {k: v for k, v in _plain(config.data).items()
            if k not in data_lib.NON_IDENTITY_KEYS}
    return dict(model=model, data=data, objective=_plain(objective.identity()))


def stage_record(config, objective) -> dict:
    """What `config.json` stores: the identity, and the whole config for the record."""
    return dict(identity=stage_identity(config, objective), config=_plain(config))


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_stage_config(directory, record: dict) -> None:
    """Refuses a stage directory whose `config.json` has another identity, naming each entry
    that differs (nothing to check when the directory has no record yet)."""
    path = files.join(directory, RECORD_FILE)
    if not path.exists():
        return
    try:
        saved = files.read_json(path)
    except (OSError, ValueError) as err:
        raise CheckpointMismatchError(f"{path} is unreadable: {err}") from err
    if not isinstance(saved, dict) or "identity" not in saved:
        raise CheckpointMismatchError(
            f"{path} holds no stage identity (written by another version of scm_jax?): use "
            f"another --workdir")
    old, new = _flatten(saved["identity"]), _flatten(_plain(record["identity"]))
    # Entries added to the architecture later: absent means the value older checkpoints had.
    implicit = {f"model.{k}": default for k, (_, default, _) in STABILIZER_KEYS.items()}
    old = {**{k: v for k, v in implicit.items() if k in new}, **old}
    new = {**{k: v for k, v in implicit.items() if k in old}, **new}
    diffs = [f"{key} = {old.get(key, '<absent>')!r} there, {new.get(key, '<absent>')!r} now"
             for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if diffs:
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise CheckpointMismatchError(
            f"{directory} was written by a different run: {'; '.join(diffs[:4])}{more}. Use "
            f"another --workdir, or restore the original settings")


def write_record(directory, record: dict) -> None:
    """Writes `config.json` (the primary process only)."""
    if files.is_primary():
        files.write_json(files.join(directory, RECORD_FILE), record)


# --- The store ---------------------------------------------------------------------------------
def _path_name(path) -> str:
    """'nets/net/params/conv_in/kernel' whether the tree holds dataclasses, dicts or lists."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def _leaf_shapes(tree) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def compare_trees(expected, found, where: str) -> None:
    """Raises CheckpointMismatchError if `found` differs from `expected` in keys or shapes."""
    exp, got = _leaf_shapes(expected), _leaf_shapes(found)
    missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    if missing or extra:
        raise CheckpointMismatchError(
            f"checkpoint at {where} does not match this config: entries missing from it "
            f"{missing[:5]}, unexpected entries {extra[:5]}")
    for key in exp:
        if exp[key] != got[key]:
            raise CheckpointMismatchError(
                f"checkpoint at {where} does not match this config: {key} has shape {got[key]} "
                f"on disk but {exp[key]} in the model built from the config")


# Every saved array's fingerprint, sum_i u_i (2 i + 1) c mod 2^32 over its bytes read as 32-bit
# words u_i (c = 2654435761): any change of a single word changes it (each weight is odd), it is
# exact integer arithmetic, so the same whatever the sharding or the number of processes, and it
# is computed where the arrays live, before an asynchronous save and after a restore.
_MIX = np.uint32(2654435761)


def _words(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    if x.dtype.itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32).reshape(-1)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    return x.astype(jnp.uint32).reshape(-1)


@jax.jit
def _fingerprint_leaves(leaves):
    out = []
    for leaf in leaves:
        words = _words(leaf)
        weights = (jnp.arange(words.size, dtype=jnp.uint32) * np.uint32(2) + np.uint32(1)) * _MIX
        out.append(jnp.sum(words * weights, dtype=jnp.uint32))
    return out


def fingerprints(tree) -> dict:
    """{leaf path: 32-bit fingerprint} of every array of `tree` (see the comment above)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [_path_name(path) for path, _ in flat]
    values = jax.device_get(_fingerprint_leaves([leaf for _, leaf in flat]))
    return {name: int(v) for name, v in zip(names, values)}


def all_finite(tree) -> bool:
    """True when every floating-point value of `tree` is finite."""
    from scm_jax.objectives.base import all_finite as finite

    return bool(jax.jit(finite)(tree))


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

    def __init__(self, directory, *, keep: int = 2, async_save: bool = True):
        self.directory = files.path(directory)
        self._pending = None   # the step of the save in flight (or the last one)
        self.manager = ocp.CheckpointManager(
            self.directory / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
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
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
                integrity=ocp.args.JsonSave(integrity)), force=force)
        except Exception as err:  # noqa: BLE001 - the storage layer's error, named
            raise self._failed(err) from err

    def _where(self, step) -> str:
        return str(self.directory / "checkpoints" / str(step))

    def _saved_tree(self, step):
        try:
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
def restore_stage_ema(config, name: str, workdir, mesh=None, rules=None, network: str = "net",
                      abstract_ema=None, log=print):
    """(EMA params of network `network` of stage `name`, step) from its latest checkpoint,
    sharded over `mesh` by the logical rules when one is given (or exactly as the sharded
    ShapeDtypeStructs `abstract_ema` say); only those arrays are read.

    Raises MissingInputError naming the directory when the stage has no checkpoint, and
    CheckpointMismatchError when its identity differs from the config's or its EMA is not
    finite. A corrupt latest checkpoint is reported and the newest intact one used.
    """
    directory = stage_dir(config, name, workdir)
    objective = objectives.build(config, name)
    if not has_checkpoint(directory):
        hint = (f"run stage={name} first or set --config.{name}.checkpoint_dir"
                if name == "teacher" else f"run stage={name} first")
        raise MissingInputError(f"no {name} checkpoint found in {directory}: {hint}")
    check_stage_config(directory, stage_record(config, objective))
    from scm_jax.data import data_shape

    if abstract_ema is None:
        if mesh is None:
            abstract, _ = objective.abstract_state(data_shape(config.data))
        else:
            abstract, _ = objective.abstract_state(data_shape(config.data), mesh,
                                                   rules or sharding.logical_rules(config.mesh))
        abstract_ema = abstract.nets[network].ema
    subtree = {"nets": {network: {"ema": abstract_ema}}}
    store = CheckpointStore(directory, async_save=False)
    try:
        problems = []
        store.manager.reload()
        for step in sorted(store.manager.all_steps(), reverse=True):
            try:
                ema = store.restore_subtree(subtree, step)["nets"][network]["ema"]
                break
            except CorruptCheckpointError as err:   # another stage's files: reported, not moved
                problems.append(str(err))
                log(f"warning: {err}; using the previous {name} checkpoint")
        else:
            raise CorruptCheckpointError(f"no intact {name} checkpoint in {directory}: "
                                         f"{'; '.join(problems)}")
    finally:
        store.close()
    if not all_finite(ema):
        raise CheckpointMismatchError(
            f"the EMA of stage {name} in {store._where(step)} holds non-finite values (NaN or "
            f"inf): it can neither start nor teach another stage; retrain {name} (lower its "
            f"learning rate) or pick another checkpoint")
    return ema, int(step)
