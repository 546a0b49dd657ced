"""What a stage's checkpoints mean, and where they live: `<workdir>/<stage>` (or the stage's
`checkpoint_dir`) holds `config.json` with the stage's *identity* (its architecture as the
objective builds it, its dataset's identity with sigma_d, its objective), which decides whether
a checkpoint may be resumed or loaded as a teacher, and the whole config, for the record.

Only the identity is compared: data paths, worker counts, the attention kernel, the compute
dtype, dropout, optimizer settings and step counts may change between runs; a difference is a
CheckpointMismatchError naming the directory and the entries.
"""
import ml_collections

from scm_jax import data as data_lib
from scm_jax import files
from scm_jax.errors import CheckpointMismatchError
from scm_jax.networks import NON_IDENTITY_KEYS as MODEL_NON_IDENTITY_KEYS
from scm_jax.networks import STABILIZER_KEYS

RECORD_FILE = "config.json"


def stage_dir(config, name: str, workdir) -> str:
    """<workdir>/<name>, or the stage's own `checkpoint_dir` (e.g. a teacher trained elsewhere)."""
    return config[name].checkpoint_dir or str(files.join(workdir, name))


def _plain(value):
    """A JSON-normal form: ConfigDicts as dicts, tuples as lists, other values as JSON has them."""
    import json

    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=str))


def stage_identity(data, objective) -> dict:
    """What a checkpoint of this stage means: its architecture (config.model as the objective
    builds it, less how it is computed), its dataset's identity (`data`, config.data, less
    paths and throughput settings; sigma_d included) and its objective."""
    model = {k: v for k, v in _plain(objective.model_cfg).items()
             if k not in MODEL_NON_IDENTITY_KEYS}
    dataset = {k: v for k, v in _plain(data).items() if k not in data_lib.NON_IDENTITY_KEYS}
    return dict(model=model, data=dataset, objective=_plain(objective.identity()))


def stage_record(config, objective) -> dict:
    """What `config.json` stores: the identity, and the whole config for the record."""
    return dict(identity=stage_identity(config.data, objective), config=_plain(config))


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
