"""The fused attention forward+JVP kernel (sCM App. F) against `jax.jvp` of dense attention.

Kernels run on the CPU in Pallas interpret mode ('interpret': the Mosaic body under the generic
interpreter, 'tpu_interpret': the same body under the TPU interpreter, 'triton_interpret': the
GPU body); the Mosaic kernel is also compiled ahead of time for a v5p slice when libtpu is
installed, and the Triton kernel lowered for CUDA. References are float64.
"""
import os

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from scm_jax.kernels import flash_jvp as fj
from scm_jax.networks import attention as attn

# GPU-only tests; conftest does not register a `gpu` marker yet, so this is a plain skipif.
gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _case(seed, b, n, m, h, d, *, masked=False, tangents="qkv", dtype=np.float64):
    """Random q, k, v, tangents (None where absent) and key mask; batch 0 fully masked."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    q, k, v = normal(b, n, h, d), normal(b, m, h, d), normal(b, m, h, d)
    dq = normal(b, n, h, d) if "q" in tangents else None
    dk = normal(b, m, h, d) if "k" in tangents else None
    dv = normal(b, m, h, d) if "v" in tangents else None
    mask = None
    if masked:
        mask = rng.random((b, m)) < 0.6
        mask[0] = False
        mask = jnp.asarray(mask)
    return (q, k, v, dq, dk, dv), mask


def _reference(args, mask):
    """(O, dO) of dense attention in float64 NumPy, from the App. F formula
    dO = (P o dS) V - rowsum(P o dS) O + P dV with dS = (dQ K^T + Q dK^T) / sqrt(D)."""
    q, k, v, dq, dk, dv = (None if x is None else np.asarray(x, np.float64) for x in args)
    dq, dk, dv = (np.zeros_like(x) if t is None else t for x, t in zip((q, k, v), (dq, dk, dv)))
    scale = q.shape[-1] ** -0.5
    s = np.einsum("bnhd,bmhd->bhnm", q, k) * scale
    ds = (np.einsum("bnhd,bmhd->bhnm", dq, k) + np.einsum("bnhd,bmhd->bhnm", q, dk)) * scale
    valid = np.ones(s.shape[-1], bool) if mask is None else np.asarray(mask)[:, None, None, :]
    e = np.where(valid, np.exp(s - np.where(valid, s, -np.inf).max(-1, keepdims=True)), 0.0)
    e = np.nan_to_num(e)                                  # fully masked rows: exp(nan) -> 0
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l == 0, 1.0, l)
    o = np.einsum("bhnm,bmhd->bnhd", p, v)
    h = p * ds
    mu = np.moveaxis(h.sum(-1), 1, 2)[..., None]          # [B, N, H, 1]
    do = np.einsum("bhnm,bmhd->bnhd", h, v) - mu * o + np.einsum("bhnm,bmhd->bnhd", p, dv)
    return o, do


def _assert_close(got, want, tol):
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w)
        scale = np.abs(w).max()
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale)


# Ragged lengths (not multiples of the tiles), Nq != Nk, head dims 64/72/128, key masks with a
# fully masked batch row, and constant context (dK = dV = None).
CASES = {
    "n999_d64": dict(shape=(1, 999, 999, 2, 64), blocks=None),
    "n77_m300_d72_mask": dict(shape=(3, 77, 300, 1, 72), masked=True, blocks=(32, 128)),
    "n64_m130_d128_context": dict(shape=(2, 64, 130, 2, 128), masked=True, tangents="q",
                                  blocks=(64, 128)),
}
TRITON_CASES = {
    "n999_d72": dict(shape=(1, 999, 999, 1, 72), blocks=None),
    "n50_m77_d64_mask_kv": dict(shape=(3, 50, 77, 2, 64), masked=True, tangents="kv",
                                blocks=(16, 32)),
}


def _run(name, cases, backend, dtype, tol, seed):
    spec = cases[name]
    args, mask = _case(seed, *spec["shape"], masked=spec.get("masked", False),
                       tangents=spec.get("tangents", "qkv"), dtype=dtype)
    blocks = spec["blocks"] and fj.BlockSizes(*spec["blocks"])
    got = fj.attention_jvp(*args, kv_mask=mask, block_sizes=blocks, backend=backend)
    assert got[0].dtype == got[1].dtype == dtype
    _assert_close(got, _reference(args, mask), tol)
    return args, mask, got


@pytest.mark.parametrize("name", sorted(CASES))
def test_mosaic_kernel_float64_matches_jvp_of_dense_attention(name, x64):
    _run(name, CASES, "interpret", np.float64, 1e-12, seed=1)


@pytest.mark.parametrize("name", sorted(TRITON_CASES))
def test_triton_kernel_float64_matches_jvp_of_dense_attention(name, x64):
    _run(name, TRITON_CASES, "triton_interpret", np.float64, 1e-12, seed=2)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol):
    # bf16 inputs: a bf16 accumulation over 300 keys would miss by far more than 2e-2.
    _run("n77_m300_d72_mask", CASES, "interpret", dtype, tol, seed=3)


def test_tpu_interpreter_semantics():
    """The Mosaic body under the TPU interpreter (VMEM/SMEM simulated, uninitialized scratch
    filled with NaN, parallel grid axes visited in random order)."""
    try:
        _run("n77_m300_d72_mask", CASES, "tpu_interpret", np.float32, 2e-6, seed=4)
    finally:
        fj.pltpu.reset_tpu_interpret_mode_state()


def test_kernel_and_jnp_reference_match_central_finite_differences(x64):
    args, mask, (_, do) = _run("n77_m300_d72_mask", CASES, "interpret", np.float64, 1e-12, seed=5)
    q, k, v, dq, dk, dv = args
    eps = 1e-6
    shifted = lambda s: (q + s * dq, k + s * dk, v + s * dv, None, None, None)  # noqa: E731
    fd = (_reference(shifted(eps), mask)[0] - _reference(shifted(-eps), mask)[0]) / (2 * eps)
    _assert_close([do], [fd], 1e-8)
    # The pure-jnp reference of the kernel module (used by the benchmark) agrees too.
    _assert_close(fj.reference_attention_jvp(*args, kv_mask=mask), _reference(args, mask), 1e-13)


def test_tangent_is_linear_zero_and_exact_for_one_hot_tangents(x64):
    spec = CASES["n77_m300_d72_mask"]                   # shares that case's compiled kernel
    (q, k, v, dq, dk, dv), mask = _case(6, *spec["shape"], masked=True)
    fn = lambda *t: fj.attention_jvp(q, k, v, *t, kv_mask=mask,  # noqa: E731
                                     block_sizes=fj.BlockSizes(*spec["blocks"]),
                                     backend="interpret")
    o, do = fn(dq, dk, dv)
    _assert_close([o], _reference((q, k, v, None, None, None), mask)[:1], 1e-13)  # the primal
    rng = np.random.default_rng(7)
    t2 = [jnp.asarray(rng.normal(size=x.shape)) for x in (dq, dk, dv)]
    a, b = 0.7, -2.3
    combo = fn(*[a * x + b * y for x, y in zip((dq, dk, dv), t2)])[1]
    _assert_close([combo], [a * do + b * fn(*t2)[1]], 1e-12)
    zeros = [jnp.zeros_like(x) for x in (dq, dk, dv)]
    assert not np.any(np.asarray(fn(*zeros)[1]))
    for which in range(3):                     # one-hot dq, then dk, then dv
        onehot = list(zeros)
        onehot[which] = zeros[which].at[1, 3, 0, 5].set(1.0)
        _assert_close([fn(*onehot)[1]], [_reference((q, k, v, *onehot), mask)[1]], 1e-12)


def test_symbolic_zero_tangents_drop_kernel_inputs():
    (q, k, v, dq, dk, dv), _ = _case(8, 1, 16, 24, 1, 64, dtype=np.float32)
    attend = lambda q_, k_, v_: attn.attention(q_, k_, v_, impl="pallas")  # noqa: E731

    def kernel_inputs(fn, primals, tangents):
        jaxpr = jax.make_jaxpr(lambda p, t: jax.jvp(fn, p, t))(primals, tangents)
        calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
        calls += [e for eq in jaxpr.jaxpr.eqns for sub in jex.core.jaxprs_in_params(eq.params)
                  for e in sub.eqns if e.primitive.name == "pallas_call"]
        assert len(calls) == 1, calls
        return len(calls[0].invars)

    assert kernel_inputs(attend, (q, k, v), (dq, dk, dv)) == 6 + 1     # + key bias (M padded)
    # Constant context: k, v closed over, so their tangents are symbolic zeros.
    assert kernel_inputs(lambda q_: attend(q_, k, v), (q,), (dq,)) == 4 + 1
    o, do = jax.jvp(lambda q_: attend(q_, k, v), (q,), (dq,))
    _assert_close([o, do], _reference((q, k, v, dq, None, None), None), 2e-6)


def test_pallas_impl_equals_xla_impl_under_jvp():
    (q, k, v, dq, dk, dv), mask = _case(9, 3, 33, 47, 2, 16, masked=True, dtype=np.float32)
    outs = {impl: jax.jvp(lambda *a: attn.attention(*a, impl=impl, kv_mask=mask), (q, k, v),
                          (dq, dk, dv)) for impl in attn.ATTENTION_IMPLS}
    _assert_close(outs["pallas"], outs["xla"], 2e-6)
    _assert_close(outs["xla"], _reference((q, k, v, dq, dk, dv), mask), 2e-6)


def _cpu_mesh(shape, names):
    return Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))


def test_shard_map_wrapper_on_8_devices():
    (q, k, v, dq, dk, dv), mask = _case(10, 4, 40, 56, 4, 32, masked=True, dtype=np.float32)
    want = _reference((q, k, v, dq, dk, dv), mask)
    mesh = _cpu_mesh((2, 2, 2), ("data", "fsdp", "model"))
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "model"))
    put = lambda x: jax.device_put(x, spec)  # noqa: E731
    args = [put(x) for x in (q, k, v, dq, dk, dv)]
    kv_mask = jax.device_put(mask, NamedSharding(mesh, P(("data", "fsdp"))))
    got = jax.jit(lambda *a: fj.sharded_attention_jvp(*a, mesh=mesh, kv_mask=kv_mask,
                                                      head_axis="model",
                                                      backend="interpret"))(*args)
    assert got[0].sharding.is_equivalent_to(spec, 4)
    _assert_close(got, want, 2e-6)
    # The 'pallas' attention finds the context mesh itself (the training mesh's axes: the batch
    # split over data and fsdp, the heads whole), the way the training step traces it.
    train_mesh = _cpu_mesh((2, 2), ("data", "fsdp"))
    batch_spec = NamedSharding(train_mesh, P(("data", "fsdp")))
    args = [jax.device_put(x, batch_spec) for x in (q, k, v, dq, dk, dv)]
    kv_mask = jax.device_put(mask, batch_spec)
    with jax.set_mesh(train_mesh):
        got = jax.jit(lambda *a: jax.jvp(lambda *p: attn.attention(*p, impl="pallas",
                                                                   kv_mask=kv_mask),
                                         a[:3], a[3:]))(*args)
    _assert_close(got, want, 2e-6)
    with pytest.raises(ValueError, match="batch 4 is not divisible by the 8 devices"):
        fj.sharded_attention_jvp(q, k, v, dq, mesh=mesh, batch_axes=("data", "fsdp", "model"))
    with pytest.raises(ValueError, match="head_axis 'heads'"):
        fj.sharded_attention_jvp(q, k, v, dq, mesh=mesh, head_axis="heads")


def test_bad_inputs_raise_clear_errors():
    (q, k, v, dq, dk, dv), _ = _case(11, 1, 8, 8, 1, 16, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown attention JVP backend 'cuda'"):
        fj.attention_jvp(q, k, v, dq, backend="cuda")
    with pytest.raises(ValueError, match="tangent dk has shape"):
        fj.attention_jvp(q, k, v, dq, dk[:, :4])
    with pytest.raises(ValueError, match=r"kv_mask must be \[B, M\]"):
        fj.attention_jvp(q, k, v, dq, kv_mask=jnp.ones((1, 7), bool))
    with pytest.raises(ValueError, match="k and v must be"):
        fj.attention_jvp(q, k[..., :8], v, dq)
    with pytest.raises(ValueError, match="block_k % 128"):
        fj.attention_jvp(q, k, v, dq, block_sizes=fj.BlockSizes(8, 64), backend="interpret")
    with pytest.raises(ValueError, match="power of two"):
        fj.attention_jvp(q, k, v, dq, block_sizes=fj.BlockSizes(48, 64),
                         backend="triton_interpret")
    with pytest.raises(ValueError, match="positive int"):
        fj.BlockSizes(0, 128)
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        attn.attention(q, k, v, impl="flash")


# ---------------------------------------------------------------------------------------------
# The whole sCM step with attention_impl='pallas' (the kernel on the tangent pass only).
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_scm_train_step_with_pallas_equals_xla():
    """`jax.grad` of the full sCM loss traces and runs with 'pallas' selected (the objective
    keeps the kernel off the differentiated pass) and gives xla's loss, gradients and update."""
    from scm_jax import objectives
    from tests.helpers import load_experiment

    results = {}
    for impl in ("xla", "pallas"):
        config = load_experiment("digits")
        config.model.update(channels=8, channel_mult=(1,), noise_channels=8, emb_channels=16,
                            weight_channels=8, attn_resolutions=(8,), num_heads=2,
                            attention_impl=impl)
        config.sct.loss.warmup_steps = 0          # r = 1: the full tangent enters g
        config.sct.optimizer.eps = 1e-3           # updates ~ gradients, not their signs
        objective = objectives.build(config, "sct")
        state = jax.jit(lambda key: objective.init_state(key, (8, 8, 1)))(jax.random.PRNGKey(0))
        # Noise on every weight: the zero-initialized attention projections would otherwise
        # hide the attention tangent from the loss.
        params = {name: net.params for name, net in state.nets.items()}
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        noisy = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(key, p.shape)
                                          for p, key in zip(leaves, keys)])
        state = state.replace(nets={name: net.replace(params=noisy[name])
                                    for name, net in state.nets.items()})
        rng = np.random.default_rng(12)
        batch = {"image": jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32),
                 "label": jnp.asarray(rng.integers(0, 10, (4,)), jnp.int32)}
        lowered = jax.jit(objective.make_step()).lower(state, batch, None)
        # The kernel is in the 'pallas' step (on its tangent pass), and only there.
        assert ("attention_jvp_mosaic" in lowered.as_text(debug_info=True)) == (impl == "pallas")
        new_state, metrics = lowered.compile()(state, batch, None)
        update = jax.tree.map(lambda a, b: a - b,
                              {n: net.params for n, net in new_state.nets.items()},
                              {n: net.params for n, net in state.nets.items()})
        results[impl] = (metrics, update)
    (m_xla, u_xla), (m_pal, u_pal) = results["xla"], results["pallas"]
    assert np.isfinite(float(m_xla["loss"]))
    np.testing.assert_allclose(m_pal["loss"], m_xla["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_pal["grad_norm"], m_xla["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(u_pal), jax.tree.leaves(u_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Compiled kernels: Mosaic ahead of time for a v5p slice (libtpu), Triton lowered for CUDA, and
# the Triton kernel itself on a GPU.
# ---------------------------------------------------------------------------------------------

def _v5p_mesh():
    pytest.importorskip("libtpu", reason="AOT TPU compilation needs libtpu (pip install libtpu)")
    # Only a topology description is needed (no TPU is attached): quiet libtpu's host probing
    # and let it load beside other processes that hold it.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1",
                                        chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    return Mesh(np.asarray(topo.devices), ("data",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("n,h,d,context", [(4096, 16, 64, False), (1000, 16, 72, True)])
def test_mosaic_kernel_compiles_for_tpu_v5p(n, h, d, context):
    """Realistic shapes (a DiT at 4096 tokens; DiT-XL/2's head dim 72 with constant context),
    bf16, a key mask, batch split over the 4 chips by the shard_map wrapper."""
    mesh = _v5p_mesh()
    b = 8
    x = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P("data")))
    mask = jax.ShapeDtypeStruct((b, n), jnp.bool_, sharding=NamedSharding(mesh, P("data")))
    fused = jax.jit(lambda q, k, v, dq, dk, dv, m: fj.sharded_attention_jvp(
        q, k, v, dq, None if context else dk, None if context else dv, kv_mask=m, mesh=mesh,
        backend="mosaic_tpu"))
    compiled = fused.lower(x, x, x, x, x, x, mask).compile()
    assert "tpu_custom_call" in compiled.as_text()
    # O(N D) memory: per chip the temporaries (layout transposes, padding) stay within a few
    # times the inputs and outputs, where the XLA JVP's [B, H, N, N] f32 tensors alone are
    # 13x (N=1000) to 40x (N=4096) larger than them.
    mem = compiled.memory_analysis()
    io = mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert mem.temp_size_in_bytes <= 4 * io, (mem.temp_size_in_bytes, io)


@pytest.mark.parametrize("d", [64, 72])
def test_triton_kernel_lowers_for_cuda(d):
    from jax import export

    x = jax.ShapeDtypeStruct((2, 999, 4, d), jnp.bfloat16)
    fused = jax.jit(lambda *a: fj.attention_jvp(*a, backend="triton"))
    try:
        exported = export.export(fused, platforms=("cuda",), disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, x, x, x, x, x)
    except (ImportError, NotImplementedError) as e:   # a jaxlib built without Triton support
        pytest.skip(f"Triton lowering unavailable: {e}")
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


@gpu
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_triton_kernel_on_gpu(dtype, tol):
    _run("n999_d72", TRITON_CASES, "triton", dtype, tol, seed=13)
    _run("n50_m77_d64_mask_kv", TRITON_CASES, "triton", dtype, tol, seed=14)
