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


def _mixed_tree(rng):
    """Fresh random leaves of every dtype a state holds, some sharded over the 8 devices."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8), ("d",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    return {
        "f32": jnp.asarray(rng.normal(size=(16, 3)).astype(np.float32)),
        "f32_split": jax.device_put(rng.normal(size=(8 * int(rng.integers(1, 5)), 5))
                                    .astype(np.float32), split),
        "bf16": jnp.asarray(rng.normal(size=(7, 2)), jnp.bfloat16),
        "f16": jnp.asarray(rng.normal(size=(5,)), jnp.float16),
        "i32": jnp.asarray(rng.integers(-2**31, 2**31 - 1, size=(9,), dtype=np.int64),
                           jnp.int32),
        "u8": jnp.asarray(rng.integers(0, 256, size=(6,)), jnp.uint8),
        "i8": jnp.asarray(rng.integers(-128, 128, size=(6,)), jnp.int8),
        "flag": jnp.asarray(rng.integers(0, 2, size=(4,)).astype(bool)),
        "scalar": jnp.float32(rng.normal()),
        "nested": [jnp.asarray(rng.normal(size=(int(rng.integers(1, 40)),)), jnp.float32)],
    }


def test_host_fingerprints_equal_the_device_ones(monkeypatch):
    """A small tree is fingerprinted in numpy: the same values as the compiled program (which a
    large or multi-process tree uses), so checkpoints verify whichever path wrote them."""
    tree = _mixed_tree(np.random.default_rng())
    on_host = tree_checks.fingerprints(tree)
    monkeypatch.setattr(tree_checks, "HOST_BYTES", -1)
    assert tree_checks.fingerprints(tree) == on_host
    assert len(on_host) == 10


def test_fingerprints_change_with_any_single_word():
    rng = np.random.default_rng()
    tree = _mixed_tree(rng)
    before = tree_checks.fingerprints(tree)
    for name in ("f32_split", "bf16", "u8", "flag"):
        leaf = np.array(tree[name])
        i = int(rng.integers(leaf.size))
        flat = leaf.reshape(-1)
        flat[i] = ~flat[i] if leaf.dtype == bool else (
            flat[i] + 1 if leaf.dtype.kind in "iu" else -flat[i] + 1)
        changed = dict(tree, **{name: jnp.asarray(flat.reshape(leaf.shape), leaf.dtype)})
        after = tree_checks.fingerprints(changed)
        assert after[name] != before[name], name
        assert {k: v for k, v in after.items() if k != name} == {
            k: v for k, v in before.items() if k != name}


@pytest.mark.parametrize("host", [True, False])
def test_all_finite_on_host_and_on_device(host, monkeypatch):
    if not host:
        monkeypatch.setattr(tree_checks, "HOST_BYTES", -1)
    rng = np.random.default_rng()
    tree = _mixed_tree(rng)
    assert tree_checks.all_finite(tree)
    for name in ("f32_split", "bf16", "f16"):
        leaf = np.array(tree[name], np.float32)
        leaf.reshape(-1)[rng.integers(leaf.size)] = rng.choice([np.nan, np.inf, -np.inf])
        broken = dict(tree, **{name: jnp.asarray(leaf, tree[name].dtype)})
        assert not tree_checks.all_finite(broken), name
