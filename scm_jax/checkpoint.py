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
import ml_collections
import orbax.checkpoint as ocp

from scm_jax import data as data_lib
from scm_jax import files, objectives, sharding
from scm_jax.errors import CheckpointMismatchError, MissingInputError
from scm_jax.networks import NON_IDENTITY_KEYS as MODEL_NON_IDENTITY_KEYS

RECORD_FILE = "config.json"


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


def has_checkpoint(directory) -> bool:
    """True if `directory` holds at least one finished checkpoint (without creating anything)."""
    root = files.join(directory, "checkpoints")
    return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())


def _restore_args(abstract):
    return ocp.args.PyTreeRestore(item=abstract,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class CheckpointStore:
    """orbax CheckpointManager for one training stage: state (a pytree) and data position."""

    def __init__(self, directory, *, keep: int = 2, async_save: bool = True):
        self.directory = files.path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)), force=force)

    def _where(self, step) -> str:
        return str(self.directory / "checkpoints" / str(step))

    def _saved_tree(self, step):
        try:
            meta = self.manager.item_metadata(step)
        except Exception as err:  # noqa: BLE001 - unreadable metadata means a corrupt checkpoint
            raise CheckpointMismatchError(f"checkpoint at {self._where(step)} is unreadable: "
                                          f"{err}") from err
        saved = meta["state"] if meta is not None else None
        return getattr(saved, "tree", saved)

    def restore(self, abstract_state, step=None):
        """(state, data_state) at `step` (default: latest) into `abstract_state`'s shapes (and
        shardings, when its ShapeDtypeStructs carry them)."""
        step = self.latest_step() if step is None else step
        where = self._where(step)
        saved = self._saved_tree(step)
        if saved is not None:
            compare_trees(abstract_state, saved, where)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=_restore_args(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - orbax raises many types for bad checkpoints
            raise CheckpointMismatchError(
                f"checkpoint at {where} could not be restored into this config's state: {err}"
            ) from err
        compare_trees(abstract_state, restored["state"], where)
        return restored["state"], restored["data"]

    def restore_subtree(self, subtree: dict, step=None):
        """Only the arrays of `subtree` (nested dicts of field names -> abstract arrays, e.g.
        {'nets': {'net': {'ema': ...}}}) at `step`: nothing else is read into memory."""
        step = self.latest_step() if step is None else step
        where = self._where(step)
        saved = self._saved_tree(step)
        if saved is not None:
            picked = _pick(saved, subtree, where)
            compare_trees(subtree, picked, where)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=subtree, partial_restore=True,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(subtree))))
        except Exception as err:  # noqa: BLE001 - orbax raises many types for bad checkpoints
            raise CheckpointMismatchError(f"checkpoint at {where} could not be restored: "
                                          f"{err}") from err
        return restored["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _pick(saved, subtree, where):
    """The part of the saved metadata tree that `subtree` names."""
    if not isinstance(subtree, dict):
        return saved
    out = {}
    for key, value in subtree.items():
        if not isinstance(saved, dict) or key not in saved:
            raise CheckpointMismatchError(f"checkpoint at {where} has no entry {key!r}")
        out[key] = _pick(saved[key], value, where)
    return out


# --- Restoring another stage's model -----------------------------------------------------------
def restore_stage_ema(config, name: str, workdir, mesh=None, rules=None, network: str = "net"):
    """(EMA params of network `network` of stage `name`, step) from its latest checkpoint,
    sharded over `mesh` by the logical rules when one is given; only those arrays are read.

    Raises MissingInputError naming the directory when the stage has no checkpoint, and
    CheckpointMismatchError when its identity differs from the config's.
    """
    directory = stage_dir(config, name, workdir)
    objective = objectives.build(config, name)
    if not has_checkpoint(directory):
        hint = (f"run stage={name} first or set --config.{name}.checkpoint_dir"
                if name == "teacher" else f"run stage={name} first")
        raise MissingInputError(f"no {name} checkpoint found in {directory}: {hint}")
    check_stage_config(directory, stage_record(config, objective))
    from scm_jax.data import data_shape

    if mesh is None:
        abstract, _ = objective.abstract_state(data_shape(config.data))
    else:
        abstract, _ = objective.abstract_state(data_shape(config.data), mesh,
                                               rules or sharding.logical_rules(config.mesh))
    subtree = {"nets": {network: {"ema": abstract.nets[network].ema}}}
    store = CheckpointStore(directory, async_save=False)
    try:
        step = store.latest_step()
        restored = store.restore_subtree(subtree, step)
    finally:
        store.close()
    return restored["nets"][network]["ema"], int(step)
