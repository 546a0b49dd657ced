"""Checkpoints with orbax: the whole train state, the data position, and the stage's config.

A stage's directory holds `checkpoints/<step>/` (orbax writes each step to a temporary folder and
renames it when complete, so a killed run never leaves a half checkpoint behind) and
`config.json` (the config the stage was started with). Re-running the same command restores the
latest step: params, optimizer state, EMA, step, rng and the data position.

A checkpoint that does not fit the current config (another architecture, a different optimizer)
fails with a ValueError naming the directory and the first mismatching entry, before anything is
written.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was written by a run of a different shape."""


def _path_name(path) -> str:
    """'params/net/conv_in/kernel' whether the tree holds dataclasses, dicts or lists."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def _leaf_shapes(tree) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): tuple(leaf.shape) if hasattr(leaf, "shape") else ()
            for path, leaf in flat}


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


def has_checkpoint(directory: str) -> bool:
    """True if `directory` holds at least one finished checkpoint (without creating anything)."""
    root = os.path.join(directory, "checkpoints")
    return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


class CheckpointStore:
    """orbax CheckpointManager for one training stage."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            os.path.join(self.directory, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

    def restore(self, abstract_state, step=None):
        """Restores (state, data_state) at `step` (default: latest) into `abstract_state`'s shapes."""
        step = self.latest_step() if step is None else step
        where = os.path.join(self.manager.directory, str(step))
        try:
            meta = self.manager.item_metadata(step)
            saved = meta["state"] if meta is not None else None
        except Exception as err:  # noqa: BLE001 - unreadable metadata means a corrupt checkpoint
            raise CheckpointMismatchError(f"checkpoint at {where} is unreadable: {err}") from err
        if saved is not None:
            compare_trees(abstract_state, saved, where)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - orbax raises many types for bad checkpoints
            raise CheckpointMismatchError(
                f"checkpoint at {where} could not be restored into this config's state: {err}"
            ) from err
        compare_trees(abstract_state, restored["state"], where)
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_json_atomic(path: str, payload) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def check_stage_config(directory: str, stage_config: dict) -> None:
    """Refuses to resume a stage whose saved config.json has a different architecture/objective.

    Only the entries that change the shape or meaning of the checkpoint are compared (model,
    data, the stage's kind, optimizer and EMA); step counts and logging cadence may change.
    """
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointMismatchError(f"{path} is unreadable: {err}") from err
    for key in ("model", "data", "kind", "optimizer", "ema", "tangent"):
        old, new = saved.get(key), json.loads(json.dumps(stage_config.get(key), default=str))
        if old != new:
            raise CheckpointMismatchError(
                f"{directory} was trained with {key} = {old}, but the config now says {new}; "
                f"use another --workdir or restore the original config")
