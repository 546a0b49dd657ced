"""Self-attention over image positions, with a backend switch.

`attention_impl` names the implementation of softmax(q k^T / sqrt(d)) v:
- 'xla': plain einsum + softmax, in both passes of every step. Differentiable in both modes;
  its JVP and its VJP store the N x N scores per head (O(N^2) memory).
- 'pallas' / 'pallas:<backend>': for the sCM tangent pass, a `jax.custom_jvp` whose JVP rule
  runs the fused forward+JVP Pallas kernel (`scm_jax.kernels.flash_jvp`, sCM App. F), O(N)
  memory. `jax.grad` must never reach it (a `pallas_call` has no transpose rule), so
  `objectives.Objective` gives the differentiated network the partner of that kernel
  (`resolve_attention_impl(..., differentiated=True)`): on TPU and GPU the flash attention
  JAX ships ('flash:tpu', 'flash:gpu'; `scm_jax.kernels.flash_vjp`, a `custom_vjp`, O(N)
  memory), in the interpreters (CPU) XLA. The custom_jvp's primal output is computed by that
  partner, differentiably: the sCM loss differentiates the tangent pass's primal output
  (`objectives.scm.scm_loss`), so one forward serves both passes.
- 'flash:tpu' / 'flash:gpu': the shipped flash attention (reverse mode only); where it cannot
  take a call (`flash_vjp.unsupported`: short or ragged sequences, masks, dtypes), XLA.
- 'auto': 'pallas' on TPU and GPU, 'xla' on CPU (where the kernels only run in the slow
  interpreters). The paper configs use it.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from scm_jax.errors import ConfigError
from scm_jax.kernels import flash_jvp as kernel
from scm_jax.kernels import flash_vjp

ATTENTION_IMPLS = ("xla", "pallas", "auto")
# The fused JVP kernel's backend on real hardware -> the shipped flash attention of the same
# platform, which serves the differentiated pass beside it (one-to-one). The interpreters
# (CPU) have none: XLA serves there.
FLASH_PARTNERS = {"mosaic_tpu": "tpu", "triton": "gpu"}


def dot_product_attention(q, k, v, kv_mask=None):
    """q: [B, N, H, D], k/v: [B, M, H, D], kv_mask: [B, M] bool or None -> [B, N, H, D].

    Softmax in float32; masked keys get zero weight and rows with every key masked give 0.
    """
    scale = q.shape[-1] ** -0.5
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=acc) * scale
    if kv_mask is None:
        weights = jax.nn.softmax(logits, axis=-1)
    else:
        mask = kv_mask[:, None, None, :]
        # A finite fill keeps fully masked rows finite (uniform); the product zeroes them.
        weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(acc).min), axis=-1) * mask
    return jnp.einsum("bhnm,bmhd->bnhd", weights.astype(v.dtype), v)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def pallas_attention(q, k, v, kv_mask=None, backend=None):
    """Attention whose JVP is the fused Pallas kernel; shapes as `dot_product_attention`.

    `backend` overrides the kernel backend (`kernel.BACKENDS`; default by platform: TPU ->
    Mosaic, GPU -> Triton, CPU -> interpret mode). Its output is `differentiated_forward`'s,
    with or without a JVP. `jax.grad` may differentiate a JVP through it only where the JVP's
    tangent output is then stop-gradient (sCM's g): the kernel takes stop-gradient inputs.
    """
    return differentiated_forward(q, k, v, kv_mask, backend)


def differentiated_forward(q, k, v, kv_mask=None, backend=None):
    """Attention computed as the differentiated pass beside the kernel `backend` computes it
    (shapes as `dot_product_attention`): its flash partner (`FLASH_PARTNERS`, a custom VJP)
    where that takes the call, else XLA attention; reverse-differentiable either way, since
    the sCM loss is differentiated through the tangent pass's primal (F^-, `objectives.scm`)."""
    variant = FLASH_PARTNERS.get(backend or kernel.default_backend())
    if variant is not None and flash_vjp.unsupported(variant, q, k, kv_mask) is None:
        return flash_vjp.attention(q, k, v, variant)
    return dot_product_attention(q, k, v, kv_mask)


@functools.partial(pallas_attention.defjvp, symbolic_zeros=True)
def _pallas_attention_jvp(backend, primals, tangents):
    q, k, v, kv_mask = primals
    # Symbolic zeros (inputs that do not depend on the JVP's input, e.g. constant context
    # keys/values) reach the kernel as None, which drops their matmuls.
    sg = jax.lax.stop_gradient
    dq, dk, dv = (None if isinstance(t, SymbolicZero) else sg(t) for t in tangents[:3])
    # The kernel sees stop-gradient inputs: sCM differentiates its loss through this JVP's
    # primal output only (the tangent g is stop-gradient, Alg. 1), so a `jax.grad` around the
    # JVP never differentiates the kernel (the tangent output has no derivative).
    _, do = fused_attention_jvp(sg(q), sg(k), sg(v), dq, dk, dv, kv_mask=kv_mask,
                                backend=backend or None)
    # The primal output is the differentiated pass's attention (`differentiated_forward`,
    # reverse-differentiable): the gradient pass differentiates this very output, so the
    # tangent pass's primal (F^-) is the gradient pass's forward, computed once. The kernel's
    # own O feeds only its dO.
    return differentiated_forward(q, k, v, kv_mask, backend), do.astype(v.dtype)


def fused_attention_jvp(q, k, v, dq, dk=None, dv=None, *, kv_mask=None, backend=None):
    """(O, dO) by the fused kernel, under `shard_map` over the context mesh when there is one.

    Inside `jax.set_mesh(mesh)` (the training step's mesh), the batch is split over every mesh
    axis not already manual; heads stay whole (Mosaic kernels are not auto-partitioned).
    """
    split = flash_vjp.batch_split()
    if split is None:
        return kernel.attention_jvp(q, k, v, dq, dk, dv, kv_mask=kv_mask, backend=backend)
    mesh, batch_axes = split
    return kernel.sharded_attention_jvp(q, k, v, dq, dk, dv, mesh=mesh, kv_mask=kv_mask,
                                        batch_axes=batch_axes, head_axis=None, backend=backend)


def attention(q, k, v, *, impl: str = "xla", kv_mask=None):
    """Multi-head attention with the backend named by `impl` (config `model.attention_impl`).

    q: [B, N, H, D], k/v: [B, M, H, D], kv_mask: [B, M] bool (True = attend) or None
    -> [B, N, H, D]. Every backbone calls this, never a backend directly, so switching
    `attention_impl` switches every attention layer at once.
    """
    name, _, arg = check_attention_impl(impl).partition(":")
    if name == "flash":
        # XLA where the shipped kernel cannot take the call (`flash_vjp.unsupported` says why).
        if flash_vjp.unsupported(arg, q, k, kv_mask) is None:
            return flash_vjp.attention(q, k, v, arg)
        return dot_product_attention(q, k, v, kv_mask)
    impl = resolve_attention_impl(impl)
    if impl.startswith("pallas"):
        return pallas_attention(q, k, v, kv_mask, impl.partition(":")[2])
    return dot_product_attention(q, k, v, kv_mask)


def resolve_attention_impl(impl: str, platform: str | None = None, *,
                           differentiated: bool = False) -> str:
    """The implementation on `platform` (default: JAX's default backend).

    For the tangent pass (default): 'auto' is 'pallas' on TPU/GPU and 'xla' on CPU; 'pallas'
    is pinned to the platform's kernel backend, 'pallas:<backend>' (`flash_jvp.BACKENDS`); a
    'flash:<variant>' names its partner kernel ('flash:tpu' -> 'pallas:mosaic_tpu').
    differentiated=True gives the network `jax.grad` goes through instead: 'xla' for 'xla', and
    otherwise the flash partner of that tangent-pass kernel ('pallas:mosaic_tpu' -> 'flash:tpu',
    'pallas:triton' -> 'flash:gpu'; 'xla' beside an interpreter). Resolving for the mesh's
    platform is what makes a TPU step compiled on a CPU host use the TPU kernels."""
    name, _, arg = check_attention_impl(impl).partition(":")
    platform = platform or jax.default_backend()
    if name == "flash":
        impl = "pallas:" + next(b for b, v in FLASH_PARTNERS.items() if v == arg)
    if impl == "auto":
        impl = "pallas" if platform in ("tpu", "gpu") else "xla"
    if impl == "pallas":
        impl = f"pallas:{kernel.backend_for_platform(platform)}"
    if not differentiated or impl == "xla":
        return impl
    variant = FLASH_PARTNERS.get(impl.partition(":")[2])
    return "xla" if variant is None else f"flash:{variant}"


def check_attention_impl(impl: str) -> str:
    """impl is one of ATTENTION_IMPLS, 'pallas:<backend>' or 'flash:<variant>'; raises
    ConfigError otherwise."""
    name, _, arg = impl.partition(":")
    if impl not in ATTENTION_IMPLS and not (name == "pallas" and arg in kernel.BACKENDS) and not (
            name == "flash" and arg in flash_vjp.VARIANTS):
        raise ConfigError(f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}, "
                          f"pallas:<backend> with a backend of {kernel.BACKENDS} or "
                          f"flash:<variant> with a variant of {flash_vjp.VARIANTS}")
    return impl


class SelfAttention(nn.Module):
    """Residual multi-head self-attention block: x + proj(attn(norm(x))). x: [B, H, W, C]."""

    num_heads: int = 1
    attention_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_attention_impl(self.attention_impl)
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"channels {c} not divisible by num_heads {self.num_heads}")
        y = nn.GroupNorm(num_groups=min(8, c), dtype=self.dtype, name="norm")(x)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(y.reshape(b, h * w, c))
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * self.num_heads, c // self.num_heads), 3, axis=2)
        y = attention(q, k, v, impl=self.attention_impl).reshape(b, h * w, c)
        # Zero-initialized output projection: the block starts as a scaled identity.
        y = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj")(y)
        return (x + y.reshape(b, h, w, c)) / jnp.sqrt(2.0).astype(x.dtype)
