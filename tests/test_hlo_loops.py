"""Loop-aware FLOPs: a scanned program (dots, convolutions, nested scans) costs what its
unrolled twin costs, on the CPU (lowered and compiled) and compiled for a TPU topology, where
XLA's cost analysis alone counts each loop body once."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import hlo_loops, step_cost


def _dense(scan: bool):
    def f(w, x):
        if scan:
            return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return x
    return f


def _conv_nested(scan: bool):
    """Two levels: 3 outer steps of 4 convolutions each."""
    def conv(h, k):
        return jnp.tanh(jax.lax.conv_general_dilated(h, k, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))

    def f(k, x):
        if scan:
            inner = lambda h, ks: (jax.lax.scan(lambda g, ki: (conv(g, ki), None), h, ks)[0],
                                   None)  # noqa: E731
            return jax.lax.scan(inner, x, k)[0]
        for i in range(k.shape[0]):
            for j in range(k.shape[1]):
                x = conv(x, k[i, j])
        return x
    return f


CASES = {
    "dense": (_dense, (jax.ShapeDtypeStruct((6, 64, 64), jnp.float32),
                       jax.ShapeDtypeStruct((16, 64), jnp.float32)), 6 * 2 * 16 * 64 * 64),
    "conv_nested": (_conv_nested, (jax.ShapeDtypeStruct((3, 4, 3, 3, 8, 8), jnp.float32),
                                   jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.float32)),
                    12 * 2 * 2 * 8 * 8 * 22 * 22),   # 22 of 24 taps per axis inside the input
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scanned_flops_equal_the_unrolled_programs_on_cpu(case):
    make, args, matmul = CASES[case]
    lowered = {scan: jax.jit(make(scan)).lower(*args) for scan in (True, False)}
    raw = step_cost.cost_analysis(lowered[True])["flops"]
    assert raw < 0.5 * matmul        # the plain analysis sees one trip of each loop
    for stage in (lambda l: l, lambda l: l.compile()):
        scanned, unrolled = (step_cost.flops_of(stage(lowered[s])) for s in (True, False))
        np.testing.assert_allclose(scanned, unrolled, rtol=0.02)
        assert unrolled >= matmul
    text = lowered[True].as_text(dialect="hlo")
    found = hlo_loops.loop_extra_flops(text)
    np.testing.assert_allclose(found["matmul_flops"], matmul, rtol=1e-9)
    trips = sorted(t for _, t in found["loops"])
    assert trips == ([6] if case == "dense" else [3, 4])


def test_scanned_flops_on_a_tpu_compile():
    pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu (the [test] extra)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from scm_jax import compile as cc
    from scm_jax import compile_cache

    devices = cc.topology_devices(cc.parse_topology("v5p-8"))
    mesh = Mesh(np.asarray(devices[:1]), ("x",))
    make, args, matmul = CASES["dense"]
    args = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=NamedSharding(mesh, P()))
            for a in args]
    with compile_cache.without_jax_cache():   # JAX cannot read back a topology compile
        compiled = {s: jax.jit(make(s)).lower(*args).compile() for s in (True, False)}
    raw = step_cost.cost_analysis(compiled[True])["flops"]
    corrected, unrolled = (step_cost.flops_of(compiled[s]) for s in (True, False))
    assert raw < 0.5 * unrolled
    np.testing.assert_allclose(corrected, unrolled, rtol=0.02)
