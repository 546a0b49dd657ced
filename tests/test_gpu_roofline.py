"""The GPU roofline (`scm_jax.gpu_roofline`): collective groups and their bytes, loop trip
counts the GPU compiler writes, and, where JAX's CUDA plugin is installed (the [test] extra),
the FLOPs of cuDNN convolutions, cuDNN flash attention and the Triton attention-JVP kernel in
programs compiled deviceless for an H100 (sm_90), against XLA's own count of the same math."""
import numpy as np
import pytest

from scm_jax import gpu_roofline, hlo_loops


def test_replica_groups_in_every_format():
    assert gpu_roofline.replica_groups("replica_groups={{0,1},{2,3}}, x", 4) == [[0, 1], [2, 3]]
    assert gpu_roofline.replica_groups("replica_groups=[2,4]<=[8], x", 8) == [
        [0, 1, 2, 3], [4, 5, 6, 7]]
    assert gpu_roofline.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == [
        [0, 4], [1, 5], [2, 6], [3, 7]]
    # FSDP within a node (axis_1, 8 GPUs) and data across 2 nodes (axis_0).
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=8] {%s}, use_global_device_ids=true"
    assert gpu_roofline.replica_groups(mesh % "'axis_1'", 16) == [list(range(8)),
                                                                 list(range(8, 16))]
    assert gpu_roofline.replica_groups(mesh % "'axis_0'", 16) == [[i, i + 8] for i in range(8)]
    assert gpu_roofline.replica_groups(mesh % "'axis_0','axis_1'", 16) == [list(range(16))]
    # The mesh's devices permuted: mesh position (i, j, k) holds device iota[2,8]T(1,0)[j, k].
    permuted = ("replica_groups=mesh['axis_0'=1,'axis_1'=8,'axis_2'=2], device_ids=([2,8]T(1,0))"
                " {'axis_1'}, use_global_device_ids=true")
    assert gpu_roofline.replica_groups(permuted, 16) == [list(range(8)), list(range(8, 16))]
    assert gpu_roofline.replica_groups("channel_id=1", 8) is None


def _program(collective: str) -> str:
    return f"""HloModule m

ENTRY %main (p: bf16[64,128]) -> bf16[512,128] {{
  %p = bf16[64,128]{{1,0}} parameter(0)
  {collective}
}}
"""


@pytest.mark.parametrize("groups, network", [
    ("mesh['axis_0'=2,'axis_1'=8] {'axis_1'}", False),     # within each node
    ("mesh['axis_0'=2,'axis_1'=8] {'axis_0'}", True),      # across the two nodes
    ("[2,8]<=[16]", False), ("[8,2]<=[2,8]T(1,0)", True)])
def test_collective_bytes_go_over_nvlink_or_the_network(groups, network):
    group = 8 if not network else 2
    text = _program(f"ROOT %ag = ((bf16[64,128]{{1,0}}), (bf16[{64 * group},128]{{1,0}})) "
                    f"all-gather-start(%p), channel_id=1, replica_groups={groups}, dimensions={{0}}")
    computations, entry, _ = hlo_loops.parse(text)
    runs, _ = hlo_loops.executions(computations, entry)
    out = gpu_roofline.collectives(computations, runs, devices=16, per_node=8)
    result = 64 * group * 128 * 2
    sent = (group - 1) / group * result          # a ring all-gather: the results, less one's own
    assert out["by_op"] == {"all-gather": pytest.approx(sent)}
    assert out["network_bytes" if network else "nvlink_bytes"] == pytest.approx(sent)
    assert out["nvlink_bytes" if network else "network_bytes"] == 0


def test_wire_bytes_of_a_ring():
    n, size = 8, 1000
    assert gpu_roofline._wire_bytes("all-reduce", size, n) == pytest.approx(2 * 7 / 8 * size)
    assert gpu_roofline._wire_bytes("reduce-scatter", size, n) == 7 * size   # input = n x result
    assert gpu_roofline._wire_bytes("all-gather", size, 1) == 0


def test_the_gpu_compilers_known_trip_count_is_read():
    # The GPU compiler fuses the loop's compare (its bound inside a fusion) and writes the trip
    # count on the while.
    text = """HloModule m

%fused_compare (p: s32[]) -> pred[] {
  %p = s32[] parameter(0)
  %c = s32[] constant(12)
  ROOT %lt = pred[] compare(%p, %c), direction=LT
}

%cond (t: (s32[], f32[4,4])) -> pred[] {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %f = pred[] fusion(%i), kind=kLoop, calls=%fused_compare
}

%body (t: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  %x = f32[4,4]{1,0} get-tuple-element(%t), index=1
  %d = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[4,4]{1,0}) tuple(%i, %d)
}

ENTRY %main (a: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %a = (s32[], f32[4,4]{1,0}) parameter(0)
  ROOT %w = (s32[], f32[4,4]{1,0}) while(%a), condition=%cond, body=%body%s
}
"""
    fused = hlo_loops.loop_extra_flops(text.replace("%s", ""))
    known = hlo_loops.loop_extra_flops(text.replace(
        "%s", ', backend_config={"known_trip_count":{"n":"7"}}'))
    assert fused["loops"] == [("body", 12)] and known["loops"] == [("body", 7)]
    assert known["extra_flops"] == 6 * 2 * 4 * 4 * 4


# --- Deviceless compiles for an H100 (the CUDA plugin) -----------------------------------------
@pytest.fixture(scope="module")
def h100():
    pytest.importorskip("jax_cuda12_plugin")
    from jax.sharding import SingleDeviceSharding

    from scm_jax import gpu_nodes

    topology = gpu_nodes.parse_gpu_topology("h100-1")
    return topology, SingleDeviceSharding(gpu_nodes.gpu_devices(topology)[0])


def _figures(fn, topology, *args):
    import jax

    from scm_jax import compile_cache

    with compile_cache.without_jax_cache():   # it cannot load executables for absent devices
        compiled = jax.jit(fn).lower(*args).compile()
    return gpu_roofline.figures(compiled, topology), compiled.as_text()


def test_cudnn_convolutions_count_as_xla_counts_them(h100):
    import jax
    import jax.numpy as jnp

    from scm_jax import step_cost

    topology, sharding = h100
    x = jax.ShapeDtypeStruct((4, 16, 16, 32), jnp.bfloat16, sharding=sharding)
    w = jax.ShapeDtypeStruct((3, 3, 32, 64), jnp.bfloat16, sharding=sharding)

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y.astype(jnp.float32) ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    figures, text = _figures(grad, topology, x, w)
    assert "__cudnn$convBackwardInput" in text and "__cudnn$convBackwardFilter" in text
    assert not figures["uncounted_kernels"]
    # forward + backward input + backward filter: 3 convolutions of the forward's FLOPs.
    conv = step_cost.flops_of(jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(x, w))
    assert figures["kernel_flops"]["cudnn convolution"] == pytest.approx(3 * conv, rel=1e-6)
    assert figures["flops"] == pytest.approx(step_cost.flops_of(jax.jit(grad).lower(x, w)),
                                             rel=0.02)
    assert figures["seconds"] > 0


def test_cudnn_flash_attention_counts_its_matmuls(h100):
    import jax
    import jax.numpy as jnp

    topology, sharding = h100
    b, n, h, d = 2, 256, 4, 64
    q = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16, sharding=sharding)

    def loss(q, k, v, c, impl):   # a cotangent c that XLA cannot simplify away
        o = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return jnp.sum(o.astype(jnp.float32) * c)

    grad = lambda impl: jax.grad(lambda *a: loss(*a, impl), argnums=(0, 1, 2))  # noqa: E731
    c = jax.ShapeDtypeStruct((b, n, h, d), jnp.float32, sharding=sharding)
    cudnn, text = _figures(grad("cudnn"), topology, q, q, q, c)
    assert "__cudnn$fmhaSoftmaxBackward" in text
    pairs = b * h * n * n * d
    assert cudnn["kernel_flops"] == {"cudnn attention": 4 * pairs,
                                     "cudnn attention backward": 10 * pairs}
    # The forward as XLA counts its own attention (the two matmuls and the softmax).
    forward = lambda impl: lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, implementation=impl)
    cudnn, _ = _figures(forward("cudnn"), topology, q, q, q)
    xla, _ = _figures(forward("xla"), topology, q, q, q)
    assert cudnn["kernel_flops"] == {"cudnn attention": 4 * pairs} and not xla["kernel_flops"]
    assert cudnn["flops"] == pytest.approx(xla["flops"], rel=0.05)


@pytest.mark.parametrize("d, masked", [(64, False), (128, True), (32, True)])
def test_the_triton_attention_jvp_kernel_compiles_for_sm90(h100, d, masked):
    """The fused kernel's Triton body, forward and tangent, compiled for an H100 (no GPU): the
    head dims and key masks the package's attention uses."""
    import jax
    import jax.numpy as jnp

    from scm_jax.kernels import flash_jvp

    topology, sharding = h100
    b, n, h = 2, 256, 4
    q = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16, sharding=sharding)
    mask = jax.ShapeDtypeStruct((b, n), jnp.bool_, sharding=sharding) if masked else None

    def fused(q, k, v, dq, dk, dv, mask):
        return flash_jvp.attention_jvp(q, k, v, dq, dk, dv, kv_mask=mask, backend="triton")

    figures, text = _figures(fused, topology, q, q, q, q, q, q, mask)
    assert "__gpu$xla.gpu.triton" in text and "attention_jvp_triton" in text
    assert figures["kernel_flops"] == {
        "triton attention jvp": flash_jvp.attention_flops(b, n, n, h, d, jvp=True)}
    # Only the forward (no tangents): QK^T and PV.
    forward, _ = _figures(lambda q, k, v, mask: flash_jvp.attention_jvp(
        q, k, v, None, kv_mask=mask, backend="triton"), topology, q, q, q, mask)
    assert forward["kernel_flops"]["triton attention jvp"] == flash_jvp.attention_flops(
        b, n, n, h, d, jvp=False)
    assert np.isfinite(figures["seconds"])
