"""Restoring a checkpoint written with the other block layout (`model.scan_blocks`).

Scanned and unrolled backbones hold the same numbers under other names and shapes
(`networks.scan`), so `model.scan_blocks` is not part of a checkpoint's identity: a state saved
in one layout is read in that layout (verified by its fingerprints as written) and rearranged
into the layout the config builds, with the shardings the config asks for.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from scm_jax.networks import scan
from scm_jax.tree_checks import path_names


def _leaf_names(tree) -> set:
    return {path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _respec(leaf, shape, spec_of):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, spec_of(tuple(sharding.spec)))
    else:
        sharding = None
    return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)


def _stack_abstract(parts):
    first = parts[0]
    return _respec(first, (len(parts),) + tuple(first.shape), lambda spec: P(None, *spec))


def _take_abstract(leaf, k):
    return _respec(leaf, tuple(leaf.shape[1:]), lambda spec: P(*spec[1:]))


def saved_layout(abstract, saved):
    """`abstract` (ShapeDtypeStructs in the config's layout) rearranged into the structure of
    the saved metadata tree `saved` when the two differ only by scanned runs; else None."""
    if _leaf_names(abstract) == _leaf_names(saved):
        return None
    try:
        other = scan.convert_like(abstract, saved, stack=_stack_abstract, take=_take_abstract)
        scan.convert_like(other, abstract, stack=_stack_abstract, take=_take_abstract)
    except KeyError:
        return None     # not a layout difference: the caller reports the mismatch
    return other


def to_config_layout(restored, abstract):
    """The restored tree (saved layout) as `abstract`'s structure, layout and shardings."""
    state = scan.convert_like(restored, abstract, stack=jnp.stack, take=lambda leaf, k: leaf[k])

    def place(value, like):
        sharding = getattr(like, "sharding", None)
        return jax.device_put(value, sharding) if sharding is not None else value

    return jax.tree.map(place, state, abstract)
