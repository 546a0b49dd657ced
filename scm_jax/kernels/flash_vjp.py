"""Flash attention for the differentiated (gradient) pass: the kernels JAX ships, O(N) memory.

softmax(q k^T / sqrt(D)) v and its VJP without keeping the [B, heads, N, M] scores for the
backward pass (which plain XLA attention does, and which dominates a DiT's memory at 1024
tokens). Not our kernels: we dispatch to
- 'tpu': Pallas TPU splash attention with a full mask,
  `jax.experimental.pallas.ops.tpu.splash_attention` (per example [H, N, D], so the wrapper
  transposes and vmaps over the batch; it has no scale argument, so q is scaled by 1/sqrt(D)
  first, in q's dtype: exact for D = 16, 64, 256, one rounding of q otherwise; its blocks are
  multiples of 128 rows, so both lengths must be). Its backward is the fused dQ/dK/dV kernel
  (5 matmuls per tile pair) and its one residual is the row logsumexp. (The older
  `flash_attention` kernel of the same package keeps two lane-broadcast f32 row statistics
  per layer and broadcasts three more in its backward: 15.5 vs 10.6 GiB per chip for a
  DiT-S/2 teacher step at 1024 tokens.)
- 'gpu': cuDNN's fused attention, `jax.nn.dot_product_attention(implementation='cudnn')`
  (layout [B, N, H, D] like ours; float16/bfloat16 only, head dim a multiple of 8 <= 128).

Both are `jax.custom_vjp`s, so `jax.jvp` cannot go through them: the sCM tangent pass keeps
the fused forward+JVP kernel (`flash_jvp`), whose `custom_jvp` rule takes its primal output
from `attention` below; the sCM loss differentiates that primal output (F^-, sCM Sec. 5), so
one forward serves both passes.

`unsupported` names why a call cannot use the shipped kernel (then XLA attention serves it).
Mosaic kernels are not auto-partitioned, so under a mesh the call runs in `jax.shard_map` with
the batch split over every mesh axis not already manual; heads, sequence and head dim stay
whole on each device (cuDNN's call is wrapped the same way, for one code path). On CPU the TPU
variant runs in the Pallas interpreter inside `interpret()` (tests).
"""
import concurrent.futures
import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

VARIANTS = ("tpu", "gpu")
_TPU_BLOCKS = (512, 256, 128)      # the largest that divides the sequence is used
_TPU_DTYPES = (jnp.float32, jnp.bfloat16)
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
_CUDNN_MAX_HEAD_DIM = 128          # 256 on Hopper and later; unknowable on a CPU host compiling
_INTERPRET = contextvars.ContextVar("flash_vjp_interpret", default=False)


@contextlib.contextmanager
def interpret():
    """TPU kernels traced inside run in the Pallas interpreter (their backward too, wherever it
    is traced): the TPU variant on a CPU, for tests. Trace fresh functions inside: jit caches
    do not key on it."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"unknown flash attention variant {variant!r}; expected one of "
                         f"{VARIANTS}")


def batch_split():
    """(mesh, batch axes) for a per-device kernel under the context mesh (`jax.set_mesh`):
    the batch goes over every mesh axis not already manual. None without a mesh, on one
    device, or inside a shard_map over every axis (the arrays are local already)."""
    mesh = jax.sharding.get_abstract_mesh()
    # Already inside a shard_map over every mesh axis (all Manual): the arrays are local.
    if mesh.empty or mesh.size == 1 or set(mesh.manual_axes) == set(mesh.axis_names):
        return None
    return mesh, tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)


def unsupported(variant: str, q, k, kv_mask=None) -> str | None:
    """None when the shipped kernel of `variant` takes these inputs; else why it cannot (the
    caller then uses XLA attention). q: [B, N, H, D], k: [B, M, H, D], kv_mask: [B, M] or None.
    """
    _check_variant(variant)
    if kv_mask is not None:
        # The kernels' masks give a row whose keys are all masked uniform weights (a finite
        # mask value); ours gives it 0 (`attention.dot_product_attention`).
        return "a key mask: the shipped kernels' fully masked rows differ from ours"
    n, m, d, dtype = q.shape[1], k.shape[1], q.shape[-1], jnp.dtype(q.dtype)
    if variant == "tpu":
        if dtype not in map(jnp.dtype, _TPU_DTYPES):
            return f"dtype {dtype}: the TPU kernel takes float32 or bfloat16"
        if n % 128 or m % 128:
            return (f"sequence lengths {n} (queries) and {m} (keys) must be multiples of 128, "
                    f"the TPU kernel's smallest block (shorter ones have small scores anyway)")
    else:
        if not _cudnn_present():
            return "no cuDNN on this host (jax's CUDA plugin is not installed)"
        if dtype not in map(jnp.dtype, _CUDNN_DTYPES):
            return f"dtype {dtype}: cuDNN attention takes float16 or bfloat16"
        if d % 8 or d > _CUDNN_MAX_HEAD_DIM:
            return f"head dim {d}: cuDNN needs a multiple of 8, at most {_CUDNN_MAX_HEAD_DIM}"
    split = batch_split()
    if split is not None:
        mesh, axes = split
        devices = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in axes)
        if q.shape[0] % devices:
            return (f"batch {q.shape[0]} is not divisible by the {devices} devices of mesh axes "
                    f"{axes} (the kernel runs per device)")
    return None


def _cudnn_present() -> bool:
    """Whether jax's CUDA plugin (and with it cuDNN) is installed here: cuDNN attention checks
    the library's version when it is traced, so a GPU step traced on a host without it (e.g.
    compiled ahead of time on a CPU host) cannot use it."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return False
    return cuda_versions is not None


def _tpu_block(length: int) -> int:
    return next(b for b in _TPU_BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, n: int, m: int, interpret: bool):
    """The splash kernel for [heads, n, d] queries and [heads, m, d] keys/values, full mask."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bk = _tpu_block(n), _tpu_block(m)
    # Forward tiles bq x bk; the fused backward uses the same tiles.
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, use_fused_bwd_kernel=True)
    mask = sm.MultiHeadMask([sm.FullMask((n, m))] * heads)

    def make():
        kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                    interpret=interpret)
        # Its block-sparsity tables as NumPy constants, not device arrays: a device array
        # closed over by a trace becomes a parameter of the compiled program, one per trace,
        # so the tangent pass's call and the gradient pass's would differ in their inputs and
        # XLA could not merge them; equal constants it merges.
        for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
            setattr(kernel, name, jax.tree.map(np.asarray, getattr(kernel, name)))
        return kernel

    # Built on a fresh thread: JAX's trace and mesh contexts are per thread, and the tables are
    # device arrays first, which a trace (or a mesh of devices not attached, when compiling
    # for a TPU on a CPU host) would not let us read back.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(make).result()


def _local(q, k, v, *, variant):
    """The kernel on local arrays: q: [B, N, H, D], k/v: [B, M, H, D] -> [B, N, H, D]."""
    if variant == "gpu":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    kernel = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], _INTERPRET.get())
    to_hnd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    return jnp.swapaxes(jax.vmap(kernel)(to_hnd(q), to_hnd(k), to_hnd(v)), 1, 2)


def attention(q, k, v, variant: str):
    """softmax(q k^T / sqrt(D)) v by the shipped flash kernel of `variant`, differentiable
    (reverse mode only). q: [B, N, H, D], k/v: [B, M, H, D] -> [B, N, H, D] in q's dtype.

    The caller checks `unsupported(variant, q, k)` first. Under a context mesh
    (`jax.set_mesh`) the kernel runs per device in `jax.shard_map` over the batch.
    """
    _check_variant(variant)

    def local(q, k, v):
        return _local(q, k, v, variant=variant)

    split = batch_split()
    if split is None:
        return local(q, k, v)
    mesh, axes = split
    spec = P(axes, None, None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
