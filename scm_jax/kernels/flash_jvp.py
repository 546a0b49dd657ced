"""Fused attention forward + JVP: O and dO in one pass over key/value tiles (sCM App. F).

For one (batch, head) with scale s = 1/sqrt(D), S = s Q K^T, P = softmax(S), O = P V, the
tangents (dQ, dK, dV) give

    dS = s (dQ K^T + Q dK^T),   mu = rowsum(P o dS),   dO = (P o dS) V - mu O + P dV   (App. F)

and a FlashAttention-style loop over key/value tiles needs, per query row, the running max m
(which gets no tangent: softmax is shift-invariant) and five accumulators rescaled together by
alpha = exp(m_old - m_new) whenever m grows:

    l = sum P~,  r = sum P~ o dS,  acc_o = P~ V,  acc_a = P~ dV,  acc_b = (P~ o dS) V
    O = acc_o / l,   dO = (acc_a + acc_b) / l - (r / l) O

with P~ = exp(S - m) unnormalized. Nothing of size Nq x Nk is ever stored: memory is O(N D)
and the cost is 6 matmuls per tile, 3x an attention forward.

Two kernel bodies share that tile update:
- Mosaic (TPU): grid (B, H, q tiles, kv tiles), the kv axis sequential ("arbitrary"), the
  accumulators in VMEM scratch, inputs in [B, H, N, D]. Also run on CPU by the generic Pallas
  interpreter ('interpret', the CPU default) and by the TPU interpreter ('tpu_interpret').
- Triton (GPU): grid (q tiles, B, H), each program loops over the kv tiles with the
  accumulators in registers, inputs in [B, N, H, D]; 'triton_interpret' runs it on CPU.

Ragged lengths are zero-padded to whole tiles in the wrapper; padded keys and the optional key
padding mask become one additive key bias (0 or -inf), and the -inf guards make fully masked
rows return O = dO = 0 (the reference does the same). A tangent given as None is a symbolic
zero: its matmuls and inputs are left out (dK = dV = None, constant context, saves 2 of the 6
matmuls). Accumulation is float32 for bf16/fp16 inputs (float64 for float64 inputs, interpret
modes only).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

BACKENDS = ("mosaic_tpu", "triton", "interpret", "tpu_interpret", "triton_interpret")
_MOSAIC_BACKENDS = ("mosaic_tpu", "interpret", "tpu_interpret")
_LANES = 128      # TPU vreg lanes: kv tiles are lane-aligned, row statistics lane-replicated
_SUBLANES = 8     # TPU vreg sublanes: q tiles are sublane-aligned
_TRITON_MIN_DIM = 16      # Triton dots need every operand dimension >= 16


def backend_for_platform(platform: str) -> str:
    """The kernel backend for a JAX platform: TPU -> Mosaic, GPU -> Triton, CPU -> the generic
    Pallas interpreter running the Mosaic kernel body."""
    return {"tpu": "mosaic_tpu", "gpu": "triton", "cuda": "triton", "rocm": "triton"}.get(
        platform, "interpret")


def default_backend() -> str:
    """The kernel backend for the default JAX platform (`backend_for_platform`)."""
    return backend_for_platform(jax.default_backend())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key/value tile sizes. They change speed and VMEM/register use, not results.

    Mosaic needs block_q % 8 == 0 and block_k % 128 == 0; Triton needs powers of two. Tiles
    larger than the (padded) sequence are shrunk to it, so short sequences (a U-Net's 64 or 256
    tokens) run as one tile: a fused dense JVP.
    """

    block_q: int
    block_k: int

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    @classmethod
    def get_default(cls, backend: str, head_dim: int = 64) -> "BlockSizes":
        """Per-backend defaults. TPU: 256 x 512 tiles keep 6 double-buffered bf16 input tiles,
        the [256, 512] f32 score/tangent tiles and 3 f32 accumulators within a few MiB of VMEM.
        GPU: 3 register accumulators limit tiles to 64 x 64 (64 x 32 above head dim 64), the
        range rCM's Triton JVP kernel autotunes over. Interpreters: large tiles, because every
        grid step costs a loop iteration."""
        _check_backend(backend)
        if backend == "triton" or backend == "triton_interpret":
            return cls(block_q=64, block_k=64 if head_dim <= 64 else 32)
        if backend in ("interpret",):
            return cls(block_q=512, block_k=512)
        return cls(block_q=256, block_k=512)


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention JVP backend {backend!r}; expected one of {BACKENDS}")


# ----------------------------------------------------------------------------------------------
# Pure-jnp reference (O(N^2) memory): the definition the kernels are tested against.
# ----------------------------------------------------------------------------------------------

def reference_attention(q, k, v, kv_mask=None):
    """softmax(q k^T / sqrt(D)) v with keys masked out where kv_mask is False.

    q: [B, N, H, D], k/v: [B, M, H, D], kv_mask: [B, M] bool or None -> [B, N, H, D].
    Computed in float32 (float64 for float64 inputs); rows whose keys are all masked give 0.
    `jax.jvp` of this function is the exact attention JVP the kernels must reproduce.
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)
    s = jnp.einsum("bnhd,bmhd->bhnm", q.astype(acc), k.astype(acc)) * q.shape[-1] ** -0.5
    valid = jnp.ones(s.shape[-1:], bool) if kv_mask is None else kv_mask[:, None, None, :]
    s = jnp.where(valid, s, -jnp.inf)
    # The shift is stop-gradient: softmax is shift-invariant, so its tangent would cancel.
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(l == 0.0, 1.0, l)
    return jnp.einsum("bhnm,bmhd->bnhd", p, v.astype(acc)).astype(q.dtype)


def reference_attention_jvp(q, k, v, dq, dk=None, dv=None, kv_mask=None):
    """(O, dO) by `jax.jvp` of `reference_attention`; a None tangent is zero."""
    zero = lambda x, t: jnp.zeros_like(x) if t is None else t.astype(x.dtype)  # noqa: E731
    return jax.jvp(lambda q_, k_, v_: reference_attention(q_, k_, v_, kv_mask), (q, k, v),
                   (zero(q, dq), zero(k, dk), zero(v, dv)))


# ----------------------------------------------------------------------------------------------
# The tile update shared by both kernel bodies.
# ----------------------------------------------------------------------------------------------

def _dot_nt(a, b, acc):
    """a @ b^T with `acc` accumulation: [n, d] x [m, d] -> [n, m]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc)


def _dot(a, b, acc):
    """a @ b: [n, m] x [m, d] -> [n, d]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc)


def _tile_update(state, q, tq, k, tk, v, tv, bias, *, scale):
    """One kv tile of the streaming recurrence (module docstring).

    state: (m, l, r, acc_o, acc_a, acc_b) with m, l, r: [bq, 1] and acc_*: [bq, D] in the
    accumulation dtype; r/acc_b are None when dQ and dK are both zero, acc_a when dV is.
    q, tq: [bq, D]; k, tk, v, tv: [bk, D]; bias: [1, bk] (0 or -inf) or None.
    """
    m, l, r, acc_o, acc_a, acc_b = state
    acc = m.dtype
    s = _dot_nt(q, k, acc) * scale                                  # [bq, bk]
    if bias is not None:
        s = s + bias
    ds = None                                                       # tangent of s, unmasked:
    if tq is not None:                                              # masked keys get p = 0
        ds = _dot_nt(tq, k, acc)
    if tk is not None:
        ds = _dot_nt(q, tk, acc) if ds is None else ds + _dot_nt(q, tk, acc)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))      # [bq, 1]
    # All keys so far masked: m_new = -inf; shifting by 0 instead keeps p = exp(-inf) = 0.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)                                         # P~, [bq, bk]
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc_o = alpha * acc_o + _dot(p.astype(v.dtype), v, acc)
    if tv is not None:
        acc_a = alpha * acc_a + _dot(p.astype(tv.dtype), tv, acc)
    if ds is not None:
        h = p * (ds * scale)                                        # P~ o dS
        r = alpha * r + jnp.sum(h, axis=1, keepdims=True)
        acc_b = alpha * acc_b + _dot(h.astype(v.dtype), v, acc)
    return m_new, l, r, acc_o, acc_a, acc_b


def _finish(l, r, acc_o, acc_a, acc_b):
    """O = acc_o / l and dO = (acc_a + acc_b) / l - (r / l) O; fully masked rows give 0."""
    inv_l = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))
    o = acc_o * inv_l
    do = jnp.zeros_like(o)
    if acc_a is not None:
        do = do + acc_a * inv_l
    if acc_b is not None:
        do = do + acc_b * inv_l - (r * inv_l) * o
    return o, do


def _unpack(refs, flags):
    """refs in the order (q, tq?, k, tk?, v, tv?, bias?) -> 7 slots with None for absent ones."""
    refs = list(refs)
    out = []
    for present in flags:
        out.append(refs.pop(0) if present else None)
    return out, refs


# ----------------------------------------------------------------------------------------------
# Mosaic (TPU) kernel body: grid (B, H, q tiles, kv tiles); [B, H, N, D] layout.
# ----------------------------------------------------------------------------------------------

def _mosaic_kernel(*refs, flags, scale, num_kv_blocks):
    (q_ref, tq_ref, k_ref, tk_ref, v_ref, tv_ref, bias_ref), rest = _unpack(refs, flags)
    has_ds, has_dv = tq_ref is not None or tk_ref is not None, tv_ref is not None
    o_ref, do_ref, m_ref, l_ref, acc_o_ref, *rest = rest
    r_ref, acc_b_ref = (rest.pop(0), rest.pop(0)) if has_ds else (None, None)
    acc_a_ref = rest.pop(0) if has_dv else None
    scratch = [x for x in (m_ref, l_ref, acc_o_ref, r_ref, acc_b_ref, acc_a_ref) if x is not None]
    kv = pl.program_id(3)

    @pl.when(kv == 0)
    def _init():
        for ref in scratch:
            ref[...] = jnp.full(ref.shape, -jnp.inf if ref is m_ref else 0.0, ref.dtype)

    load = lambda ref: None if ref is None else ref[...]  # noqa: E731
    # Row statistics live lane-replicated in [bq, 128] scratch (the vreg layout); use lane 0.
    row = lambda ref: None if ref is None else ref[...][:, :1]  # noqa: E731
    state = (row(m_ref), row(l_ref), row(r_ref), acc_o_ref[...], load(acc_a_ref), load(acc_b_ref))
    m, l, r, acc_o, acc_a, acc_b = _tile_update(
        state, q_ref[...], load(tq_ref), k_ref[...], load(tk_ref), v_ref[...], load(tv_ref),
        load(bias_ref), scale=scale)
    for ref, value in ((m_ref, m), (l_ref, l), (r_ref, r)):
        if ref is not None:
            ref[...] = jnp.broadcast_to(value, ref.shape)
    for ref, value in ((acc_o_ref, acc_o), (acc_a_ref, acc_a), (acc_b_ref, acc_b)):
        if ref is not None:
            ref[...] = value

    @pl.when(kv == num_kv_blocks - 1)
    def _store():
        o, do = _finish(l, r, acc_o, acc_a, acc_b)
        o_ref[...] = o.astype(o_ref.dtype)
        do_ref[...] = do.astype(do_ref.dtype)


def _mosaic_call(q, tq, k, tk, v, tv, bias, *, scale, block_q, block_k, interpret):
    """q, tq: [B, H, Np, D]; k..tv: [B, H, Mp, D]; bias: [B, 1, Mp] or None -> (o, do)."""
    b, h, n, d = q.shape
    m = k.shape[2]
    nq, nk = n // block_q, m // block_k
    acc = jnp.promote_types(q.dtype, jnp.float32)
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, d), lambda bi, hi, i, j: (bi, hi, j, 0))
    bias_spec = pl.BlockSpec((None, 1, block_k), lambda bi, hi, i, j: (bi, 0, j))
    operands = [(q, q_spec), (tq, q_spec), (k, kv_spec), (tk, kv_spec), (v, kv_spec),
                (tv, kv_spec), (bias, bias_spec)]
    flags = tuple(x is not None for x, _ in operands)
    inputs = [x for x, _ in operands if x is not None]
    in_specs = [spec for x, spec in operands if x is not None]
    stat, tile = pltpu.VMEM((block_q, _LANES), acc), pltpu.VMEM((block_q, d), acc)
    has_ds, has_dv = tq is not None or tk is not None, tv is not None
    # m, l, acc_o always; r, acc_b when dS exists; acc_a when dV does.
    scratch = [stat, stat, tile] + [stat, tile] * has_ds + [tile] * has_dv
    kernel = functools.partial(_mosaic_kernel, flags=flags, scale=scale, num_kv_blocks=nk)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)] * 2
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, h, nq, nk), in_specs=in_specs,
            out_specs=[q_spec, q_spec], scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost_estimate(inputs, out_shape, b * h * n * m, d, flags),
        interpret=interpret,
        name="attention_jvp_mosaic",
    )(*inputs)


def _cost_estimate(inputs, outputs, pairs, d, flags):
    """FLOPs: 2 pairs d per matmul; QK^T and PV always, plus one per non-zero tangent input
    and (P o dS) V when dS exists (6 matmuls in the full case, sCM App. F)."""
    _, has_tq, _, has_tk, _, has_tv, _ = flags
    matmuls = 2 + has_tq + has_tk + has_tv + (has_tq or has_tk)
    nbytes = sum(x.size * x.dtype.itemsize for x in [*inputs, *outputs])
    return pl.CostEstimate(flops=2 * pairs * d * matmuls, transcendentals=pairs,
                           bytes_accessed=nbytes)


# ----------------------------------------------------------------------------------------------
# Triton (GPU) kernel body: grid (q tiles, B, H); [B, N, H, D] layout; kv loop in registers.
# ----------------------------------------------------------------------------------------------

def _triton_kernel(*refs, flags, scale, block_k, num_kv_blocks):
    (q_ref, tq_ref, k_ref, tk_ref, v_ref, tv_ref, bias_ref), (o_ref, do_ref) = _unpack(refs, flags)
    has_ds = tq_ref is not None or tk_ref is not None
    q = q_ref[...]
    tq = None if tq_ref is None else tq_ref[...]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    bq, d = q.shape
    zeros_row, zeros_tile = jnp.zeros((bq, 1), acc), jnp.zeros((bq, d), acc)
    state = (jnp.full((bq, 1), -jnp.inf, acc), zeros_row, zeros_row if has_ds else None,
             zeros_tile, zeros_tile if tv_ref is not None else None,
             zeros_tile if has_ds else None)

    def body(j, state):
        rows = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        tile = lambda ref: None if ref is None else ref[rows, :]  # noqa: E731
        bias = None if bias_ref is None else bias_ref[rows][None, :]
        return _tile_update(state, q, tq, tile(k_ref), tile(tk_ref), tile(v_ref), tile(tv_ref),
                            bias, scale=scale)

    _, l, r, acc_o, acc_a, acc_b = lax.fori_loop(0, num_kv_blocks, body, state)
    o, do = _finish(l, r, acc_o, acc_a, acc_b)
    o_ref[...] = o.astype(o_ref.dtype)
    do_ref[...] = do.astype(do_ref.dtype)


def _triton_call(q, tq, k, tk, v, tv, bias, *, scale, block_q, block_k, interpret):
    """q, tq: [B, Np, H, D]; k..tv: [B, Mp, H, D]; bias: [B, Mp] or None -> (o, do)."""
    from jax.experimental.pallas import triton as plgpu

    b, n, h, d = q.shape
    m = k.shape[1]
    q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, m, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    bias_spec = pl.BlockSpec((None, m), lambda i, bi, hi: (bi, 0))
    operands = [(q, q_spec), (tq, q_spec), (k, kv_spec), (tk, kv_spec), (v, kv_spec),
                (tv, kv_spec), (bias, bias_spec)]
    flags = tuple(x is not None for x, _ in operands)
    inputs = [x for x, _ in operands if x is not None]
    kernel = functools.partial(_triton_kernel, flags=flags, scale=scale, block_k=block_k,
                               num_kv_blocks=m // block_k)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)] * 2
    return pl.pallas_call(
        kernel,
        grid=(n // block_q, b, h),
        in_specs=[spec for x, spec in operands if x is not None],
        out_specs=[q_spec, q_spec],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2),
        cost_estimate=_cost_estimate(inputs, out_shape, b * h * n * m, d, flags),
        interpret=interpret,
        name="attention_jvp_triton",
    )(*inputs)


# ----------------------------------------------------------------------------------------------
# Public wrapper: shape checks, padding, backend dispatch.
# ----------------------------------------------------------------------------------------------

def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def _tiles(backend, n, m, d, block_sizes):
    """(block_q, block_k, padded N, padded M, padded D) for this backend."""
    if backend == "triton" or backend == "triton_interpret":
        pow2 = lambda x: max(_TRITON_MIN_DIM, pl.next_power_of_2(x))  # noqa: E731
        for name in ("block_q", "block_k"):
            value = getattr(block_sizes, name)
            if value & (value - 1) or value < _TRITON_MIN_DIM:
                raise ValueError(f"Triton BlockSizes.{name} must be a power of two >= "
                                 f"{_TRITON_MIN_DIM}, got {value}")
        bq, bk = min(block_sizes.block_q, pow2(n)), min(block_sizes.block_k, pow2(m))
        return bq, bk, _round_up(n, bq), _round_up(m, bk), pow2(d)
    if block_sizes.block_q % _SUBLANES or block_sizes.block_k % _LANES:
        raise ValueError(f"Mosaic BlockSizes need block_q % {_SUBLANES} == 0 and block_k % "
                         f"{_LANES} == 0, got {block_sizes}")
    bq = min(block_sizes.block_q, _round_up(n, _SUBLANES))
    bk = min(block_sizes.block_k, _round_up(m, _LANES))
    # Head dims stay as they are: a block spanning the whole last dim is legal for any size,
    # and Mosaic pads 64 or 72 to the 128 lanes internally.
    return bq, bk, _round_up(n, bq), _round_up(m, bk), d


def _check_inputs(q, k, v, dq, dk, dv, kv_mask):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, N, H, D]; got shapes {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k and v must be [B, M, H, D] matching q {q.shape} in B, H and D; got "
                         f"k {k.shape}, v {v.shape}")
    for name, t, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"tangent {name} has shape {t.shape}, expected {x.shape}")
    if kv_mask is not None and kv_mask.shape != k.shape[:2]:
        raise ValueError(f"kv_mask must be [B, M] = {k.shape[:2]} bool, got {kv_mask.shape}")


@functools.partial(jax.jit, static_argnames=("block_sizes", "backend"))
def attention_jvp(q, k, v, dq, dk=None, dv=None, *, kv_mask=None,
                  block_sizes: BlockSizes | None = None, backend: str | None = None):
    """Attention output and its tangent in one fused pass (sCM App. F).

    q, dq: [B, N, H, D]; k, v, dk, dv: [B, M, H, D]; kv_mask: [B, M] bool (True = attend) or
    None. A tangent passed as None is a symbolic zero and its work is skipped (dk = dv = None
    for constant context). Returns (O, dO), both [B, N, H, D] in q's dtype; with every tangent
    None, dO is zeros and only the forward runs. `backend` is one of BACKENDS (default: by
    platform, `default_backend()`); `block_sizes` defaults to `BlockSizes.get_default`.
    """
    _check_inputs(q, k, v, dq, dk, dv, kv_mask)
    backend = default_backend() if backend is None else backend
    _check_backend(backend)
    b, n, h, d = q.shape
    m = k.shape[1]
    block_sizes = block_sizes or BlockSizes.get_default(backend, d)
    bq, bk, n_pad, m_pad, d_pad = _tiles(backend, n, m, d, block_sizes)
    cast = lambda t, x: None if t is None else t.astype(x.dtype)  # noqa: E731
    dq, dk, dv = cast(dq, q), cast(dk, k), cast(dv, v)

    def pad(x, rows):
        if x is None:
            return None
        return jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, 0), (0, d_pad - d)))

    q, dq = pad(q, n_pad), pad(dq, n_pad)
    k, dk, v, dv = (pad(x, m_pad) for x in (k, dk, v, dv))
    bias = None
    if kv_mask is not None or m_pad != m:
        valid = jnp.ones((b, m), bool) if kv_mask is None else kv_mask.astype(bool)
        valid = jnp.pad(valid, ((0, 0), (0, m_pad - m)))
        bias = jnp.where(valid, 0.0, -jnp.inf).astype(jnp.promote_types(q.dtype, jnp.float32))

    if backend in _MOSAIC_BACKENDS:
        interpret = {"mosaic_tpu": False, "interpret": True,
                     "tpu_interpret": pltpu.InterpretParams()}[backend]
        to_bhnd = lambda x: None if x is None else jnp.swapaxes(x, 1, 2)  # noqa: E731
        o, do = _mosaic_call(*map(to_bhnd, (q, dq, k, dk, v, dv)),
                             None if bias is None else bias[:, None, :], scale=d ** -0.5,
                             block_q=bq, block_k=bk, interpret=interpret)
        o, do = jnp.swapaxes(o, 1, 2), jnp.swapaxes(do, 1, 2)
    else:
        o, do = _triton_call(q, dq, k, dk, v, dv, bias, scale=d ** -0.5, block_q=bq, block_k=bk,
                             interpret=backend == "triton_interpret")
    return o[:, :n, :, :d], do[:, :n, :, :d]


def attention_flops(b, n, m, h, d, *, jvp=True) -> int:
    """FLOPs of attention (2 matmuls) or of forward + JVP (6 matmuls, 3x; sCM App. F)."""
    return (6 if jvp else 2) * 2 * b * h * n * m * d


# ----------------------------------------------------------------------------------------------
# shard_map wrapper: Mosaic kernels are not auto-partitioned by XLA's SPMD partitioner.
# ----------------------------------------------------------------------------------------------

def sharded_attention_jvp(q, k, v, dq, dk=None, dv=None, *, mesh, kv_mask=None,
                          batch_axes=None, head_axis=None,
                          block_sizes: BlockSizes | None = None, backend: str | None = None):
    """`attention_jvp` under `jax.shard_map` on `mesh`: batch split over `batch_axes`, heads
    over `head_axis`, sequence and head dim local to each device (the kernel needs every key).

    mesh: a `Mesh` or `AbstractMesh` (e.g. `jax.sharding.get_abstract_mesh()` inside jit).
    batch_axes: mesh axis names for the batch (default: every mesh axis but `head_axis`);
    head_axis: a mesh axis name for the heads, or None (heads replicated).
    Shapes as in `attention_jvp`; B must divide by the batch axes' size and H by the head axis'.
    """
    _check_inputs(q, k, v, dq, dk, dv, kv_mask)
    names = tuple(mesh.axis_names)
    if head_axis is not None and head_axis not in names:
        raise ValueError(f"head_axis {head_axis!r} is not an axis of the mesh {names}")
    if batch_axes is None:
        batch_axes = tuple(a for a in names if a != head_axis)
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    for axis in batch_axes:
        if axis not in names or axis == head_axis:
            raise ValueError(f"batch axis {axis!r} must be a mesh axis {names} other than the "
                             f"head axis {head_axis!r}")
    shape = dict(zip(names, mesh.axis_sizes))
    n_batch = math.prod(shape[a] for a in batch_axes)
    if q.shape[0] % n_batch:
        raise ValueError(f"batch {q.shape[0]} is not divisible by the {n_batch} devices of mesh "
                         f"axes {batch_axes}")
    if head_axis is not None and q.shape[2] % shape[head_axis]:
        raise ValueError(f"{q.shape[2]} heads are not divisible by the {shape[head_axis]} devices "
                         f"of mesh axis {head_axis!r}")
    batch = batch_axes if batch_axes else None
    spec = P(batch, None, head_axis, None)                       # [B, N, H, D]
    tangents = (dq, dk, dv)
    present = tuple(t is not None for t in tangents)

    args = (q, k, v, tuple(t for t in tangents if t is not None), kv_mask)
    in_specs = (spec, spec, spec, tuple(spec for p in present if p),
                None if kv_mask is None else P(batch, None))

    def body(q, k, v, given, kv_mask):
        given = list(given)
        dq, dk, dv = (given.pop(0) if p else None for p in present)
        return attention_jvp(q, k, v, dq, dk, dv, kv_mask=kv_mask, block_sizes=block_sizes,
                             backend=backend)

    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(spec, spec),
                         check_vma=False)(*args)
