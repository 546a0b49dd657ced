"""tree_checks.finite, the train step's non-finite guard: its value, and a compiled guard whose
size grows linearly with the number of leaves (not quadratically, which made the digits aVSD
step compile for 3.5 minutes)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import tree_checks


def _tree(rng, n):
    return {f"w{i}": jnp.asarray(rng.normal(size=(4, 1 + i % 5)).astype(np.float32))
            for i in range(n)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_flags_one_bad_value_anywhere(bad):
    rng = np.random.default_rng()
    tree = _tree(rng, 12)
    tree["count"] = jnp.arange(3)   # integers are always finite
    assert bool(jax.jit(tree_checks.finite)(tree))
    leaf = f"w{rng.integers(12)}"
    i, j = (rng.integers(s) for s in tree[leaf].shape)
    broken = dict(tree, **{leaf: tree[leaf].at[i, j].set(bad)})
    assert not bool(jax.jit(tree_checks.finite)(broken))
    assert not tree_checks.all_finite(broken)
    assert tree_checks.all_finite({"n": jnp.arange(2)}) and bool(tree_checks.finite({}))


def _guard_size(n):
    """Lines and `and`s of the compiled guard of an n-leaf update, as the step applies it."""
    tree = _tree(np.random.default_rng(), n)

    def guarded(new, old):
        ok = tree_checks.finite(new)
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    hlo = jax.jit(guarded).lower(tree, tree).compile().as_text()
    return hlo.count("\n"), len(re.findall(r" and\(", hlo))


def test_the_compiled_guard_grows_linearly_with_the_leaf_count():
    lines_small, ands_small = _guard_size(50)
    lines_big, ands_big = _guard_size(200)
    # 4x the leaves: 4x the program, up to constant overhead; the quadratic form was ~16x
    # (each of the n selects held a copy of an n-long chain of `and`s).
    assert lines_big < 6 * lines_small, (lines_small, lines_big)
    assert ands_big < 10 * 200, ands_big
