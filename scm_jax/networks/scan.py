"""Runs of same-shaped blocks as one `nn.scan` (`model.scan_blocks`), and the layout map.

A backbone's blocks named `<prefix>block<i>` (e.g. `enc_64x64_block1`, DiT's `block7`) that
follow one another with the same settings and keep the activation's shape form a run. With
`scan_blocks` a run of two or more is one `nn.scan` over a single block body, named
`<prefix>block<first>to<last>`, whose parameters are the blocks' parameters stacked on a new
leading axis (logical name `layers`, never sharded: FSDP splits the weight axes as it does for
one block). The network computes the same function: a scanned step is the unrolled block, in
the same order, on the same inputs; `model.remat` applies inside the scanned body.

Why: XLA compiles a scan's body once, so compile time no longer grows with depth (the
unrolled EDM2-XXL sCD step is ~57k lines of StableHLO); large JAX codebases scan their layers
for the same reason.

The two layouts hold the same numbers, so a parameter tree (or any tree that mirrors it: Adam
moments, EMAs, whole train states) converts from one to the other by names alone:
`convert_like(tree, target)` stacks or slices what `target`'s names ask for. Initialization
uses it too: a scanned network starts from the unrolled network's initial values.
"""
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.networks.layers import REMAT_MODES
from scm_jax.tree_checks import path_names

LAYER = "layer"          # the scanned body's one child: the block
LAYER_AXIS = "layers"    # logical name of the stacked axis (no mesh rule names it: replicated)
_SCANNED = re.compile(r"^(?P<prefix>.*)block(?P<first>\d+)to(?P<last>\d+)$")
_UNROLLED = re.compile(r"^(?P<prefix>.*)block(?P<index>\d+)$")


class ScanCell(nn.Module):
    """One step of a scanned run: h -> block(merge(h, skip), *args).

    carry h: the activation, whose shape the block keeps; skip: this step's slice of the
    stacked per-step inputs (the decoder's skip connections) or None; args: broadcast to every
    step (the embedding). Returns (h, h if `emit` else None): the encoder's runs emit each
    block's output, the decoder's skip connections.
    """

    block_cls: Any
    block_kwargs: tuple          # sorted (name, value) pairs of the block's settings
    merge: Callable | None = None
    emit: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, h, skip, *args):
        if self.merge is not None:
            h = self.merge(h, skip)
        h = self.block_cls(**dict(self.block_kwargs), name=LAYER)(h, *args, self.train)
        return h, (h if self.emit else None)


def _scanned_run(block_cls, kwargs: dict, *, count: int, name: str, remat: str, train: bool,
                 merge, emit: bool, num_args: int):
    if remat not in REMAT_MODES:
        raise ValueError(f"model.remat = {remat!r} is invalid: expected one of {REMAT_MODES}")
    # remat 'none' inside a scan saves the matmuls' outputs and recomputes the elementwise ops
    # in the backward pass: what XLA does across an unrolled network's fusions. Saving every
    # intermediate instead would stack each of them over the run (DiT-S at ImageNet 512: 2.7x
    # the memory of the unrolled network).
    policy = {"none": jax.checkpoint_policies.dots_saveable, "block": None}.get(
        remat, getattr(jax.checkpoint_policies, remat, None))
    cell = nn.remat(ScanCell, policy=policy, prevent_cse=False)
    scanned = nn.scan(cell, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0,) + (nn.broadcast,) * num_args, length=count,
                      metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
    return scanned(block_cls=block_cls, block_kwargs=tuple(sorted(kwargs.items())),
                   merge=merge, emit=emit, train=train, name=name)


def apply_blocks(h, blocks: Sequence[tuple], args: tuple, *, block_cls, make_unrolled,
                 keeps_shape: Callable, scan: bool, remat: str, train: bool, merge=None,
                 emit: bool = False):
    """Runs `blocks` in order on h, scanning runs of equal blocks when `scan`.

    blocks: (prefix, index, kwargs, skip) per block, named `<prefix>block<index>`; skip is the
    block's extra input merged into h first (`merge(h, skip)`) or None. A run is consecutive
    indices of one prefix with equal kwargs, skips of one shape, and `keeps_shape(kwargs, h)`
    at its start (so the carry keeps its shape). `make_unrolled(kwargs, name)` builds one
    block (with `model.remat` applied) for the blocks outside runs.
    h: the activation -> (h, outputs): outputs[i] is block i's output when `emit`.
    """
    outputs, i = [], 0
    while i < len(blocks):
        prefix, index, kwargs, skip = blocks[i]
        j = i + 1
        if scan and keeps_shape(kwargs, h):
            while (j < len(blocks) and blocks[j][0] == prefix
                   and blocks[j][1] == blocks[j - 1][1] + 1 and blocks[j][2] == kwargs
                   and _same_shape(blocks[j][3], skip)):
                j += 1
        if j - i >= 2:
            skips = None if skip is None else jnp.stack([b[3] for b in blocks[i:j]])
            run = _scanned_run(block_cls, kwargs, count=j - i,
                               name=f"{prefix}block{index}to{blocks[j - 1][1]}", remat=remat,
                               train=train, merge=merge, emit=emit, num_args=len(args))
            h, emitted = run(h, skips, *args)
            if emit:
                outputs.extend(emitted[k] for k in range(j - i))
        else:
            j = i + 1
            x = h if skip is None else merge(h, skip)
            h = make_unrolled(kwargs, f"{prefix}block{index}")(x, *args, train)
            if emit:
                outputs.append(h)
        i = j
    return h, outputs


def _same_shape(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype


# --- The layout map -------------------------------------------------------------------------
def _scanned_at(names: tuple):
    """(depth, match) of the scanned run a path passes through (`<p>block<a>to<b>/layer`)."""
    for depth, name in enumerate(names[:-1]):
        match = _SCANNED.match(name)
        if match and names[depth + 1] == LAYER:
            return depth, match
    return None


def _unrolled_views(source: dict) -> dict:
    """Every scanned source leaf seen as its unrolled blocks: names -> (leaf, k)."""
    views = {}
    for names, leaf in source.items():
        found = _scanned_at(names)
        if found:
            depth, m = found
            for k in range(int(m["first"]), int(m["last"]) + 1):
                key = names[:depth] + (f"{m['prefix']}block{k}",) + names[depth + 2:]
                views[key] = (leaf, k - int(m["first"]))
    return views


def convert_like(tree, target, *, stack=None, take=None):
    """`tree` (in either layout) rearranged into `target`'s structure by names.

    Leaves of `target` are only looked at for their place; the values come from `tree`:
    a scanned leaf `<p>block<a>to<b>/layer/...` is the stack of `tree`'s `<p>block<k>/...`,
    k = a..b, and an unrolled leaf `<p>block<k>/...` is slice k - a of a scanned one. `stack`
    (list of leaves -> leaf) and `take` ((leaf, k) -> leaf) default to jnp.stack / indexing;
    pass others to convert abstract leaves (shapes, shardings). KeyError names the first
    target leaf `tree` cannot provide.
    """
    stack = stack or (lambda leaves: jnp.stack(leaves))
    take = take or (lambda leaf, k: leaf[k])
    source = {path_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    views = None
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, _ in paths:
        names = path_names(path)
        if names in source:
            leaves.append(source[names])
            continue
        found = _scanned_at(names)
        if found:
            depth, m = found
            rest = names[depth + 2:]
            parts = [source.get(names[:depth] + (f"{m['prefix']}block{k}",) + rest)
                     for k in range(int(m["first"]), int(m["last"]) + 1)]
            if all(p is not None for p in parts):
                leaves.append(stack(parts))
                continue
        views = _unrolled_views(source) if views is None else views
        if names not in views:
            raise KeyError("/".join(names))
        leaves.append(take(*views[names]))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def layer_axis_leaf(path) -> bool:
    """True when the leaf at `path` carries a scanned run's stacked leading axis."""
    return _scanned_at(path_names(path)) is not None


def is_scanned_tree(tree) -> bool:
    """True when some leaf of `tree` belongs to a scanned run."""
    return any(layer_axis_leaf(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def init_like_unrolled(module, unrolled_module, rngs, *args, **kwargs):
    """Scanned `module`'s params initialized to `unrolled_module`'s initial values (the same
    network with `scan_blocks` off), keeping `module`'s logical-partitioning boxes."""
    values = nn.meta.unbox(unrolled_module.init(rngs, *args, **kwargs)["params"])
    boxed = jax.eval_shape(functools.partial(module.init, rngs, *args, **kwargs))["params"]
    plain = convert_like(values, nn.meta.unbox(boxed))
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda box, v: box.replace_boxed(v) if is_box(box) else v,
                        boxed, plain, is_leaf=is_box)
