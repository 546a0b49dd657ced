"""Checks of array trees that checkpoints rely on: the same keys and shapes (`compare_trees`),
a fingerprint of every array's bytes (`fingerprints`), and finiteness (`all_finite`)."""
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import CheckpointMismatchError


def path_names(path) -> tuple:
    """A pytree path's entries as strings, alike for dicts, dataclasses, namedtuples and lists."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return tuple(names)


def _path_name(path) -> str:
    """'nets/net/params/conv_in/kernel' whether the tree holds dataclasses, dicts or lists."""
    return "/".join(path_names(path))


def _leaf_shapes(tree) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def compare_trees(expected, found, where: str) -> None:
    """Raises CheckpointMismatchError if `found` differs from `expected` in keys or shapes."""
    exp, got = _leaf_shapes(expected), _leaf_shapes(found)
    missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    if missing or extra:
        posthoc = any("/posthoc/" in key for key in missing + extra)
        raise CheckpointMismatchError(
            f"checkpoint at {where} does not match this config: entries missing from it "
            f"{missing[:5]}, unexpected entries {extra[:5]}"
            + ("; the post-hoc EMAs it tracks (<stage>.ema.posthoc_sigma_rels) differ from the "
               "config's: resume with the run's own setting" if posthoc else ""))
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


# A tree this small whose arrays all live in this process is fingerprinted on the host, in
# numpy: the same exact integer sum, without compiling the per-leaf program (3-4 s per tree
# structure on a CPU, once per stage and per snapshot tree: most of a small stage's checkpoint
# cost). Larger or multi-process trees are fingerprinted where they live.
HOST_BYTES = 64 << 20


def _host_words(a: np.ndarray) -> np.ndarray:
    """`_words` in numpy (the same 32-bit words, in the same order)."""
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize in (4, 8):
        return a.reshape(-1).view(np.uint32)
    if a.dtype.itemsize == 2:
        return a.reshape(-1).view(np.uint16).astype(np.uint32)
    return a.astype(np.uint32).reshape(-1)


def _host_fingerprint(a: np.ndarray) -> int:
    words = _host_words(a)
    weights = (np.arange(words.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)) * _MIX
    return int(np.sum(words * weights, dtype=np.uint32))


def _on_host(leaves) -> bool:
    """True when every leaf is addressable from this process and they total <= HOST_BYTES."""
    total = 0
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return False
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
        total += np.dtype(dtype).itemsize * int(np.prod(np.shape(leaf)))
    return total <= HOST_BYTES


def fingerprints(tree) -> dict:
    """{leaf path: 32-bit fingerprint} of every array of `tree` (see the comment above)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [_path_name(path) for path, _ in flat]
    # As the compiled program sees them (a Python or float64 numpy leaf as a jax array).
    leaves = [leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf) for _, leaf in flat]
    if _on_host(leaves):
        values = [_host_fingerprint(np.asarray(a)) for a in jax.device_get(leaves)]
    else:
        values = jax.device_get(_fingerprint_leaves(leaves))
    return {name: int(v) for name, v in zip(names, values)}


def finite(tree) -> jax.Array:
    """One boolean array: every floating-point element of `tree` is finite (integers always
    are). Traceable: the train step guards its update with it."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    # One reduction over int32 flags, not jnp.all over the stacked booleans: XLA rewrites the
    # latter as a chain of one `and` per leaf, which the step's fusion then copies into every
    # consumer (every leaf's select of the non-finite guard): quadratic in the leaf count. The
    # digits aVSD step held 451k `and`s and compiled in 3.5 minutes (tests/test_tree_checks.py).
    return jnp.min(jnp.stack(leaves).astype(jnp.int32)) > 0


def all_finite(tree) -> bool:
    """True when every floating-point value of `tree` is finite (checked on the host for a
    small tree of this process's arrays, as `fingerprints`)."""
    leaves = jax.tree.leaves(tree)
    if _on_host(leaves):
        arrays = [np.asarray(a) for a in jax.device_get(leaves)]
        return all(np.isfinite(a).all() for a in arrays if jnp.issubdtype(a.dtype, jnp.inexact))
    return bool(jax.jit(finite)(tree))
