"""Self-attention over image positions, with a backend switch.

`attention_impl` names the implementation of softmax(q k^T / sqrt(d)) v:
- 'xla': plain einsum + softmax. Differentiable in both modes; its JVP stores the N x N scores
  and their tangents per head (O(N^2) memory).
- 'pallas': a `jax.custom_jvp` whose primal is XLA attention and whose JVP rule runs the fused
  forward+JVP Pallas kernel (`scm_jax.kernels.flash_jvp`, sCM App. F), O(N) memory. It is
  for the tangent pass of the sCM loss only: `jax.grad` would transpose the JVP rule, and a
  `pallas_call` has no transpose rule, so `objectives.Objective` gives the differentiated
  network 'xla' whatever the config says.
- 'auto': 'pallas' on TPU and GPU, 'xla' on CPU (where the kernel only runs in the slow
  interpreter). The paper configs use it, so the fused kernel is the tangent pass's default on
  accelerators.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from scm_jax.errors import ConfigError
from scm_jax.kernels import flash_jvp as kernel

ATTENTION_IMPLS = ("xla", "pallas", "auto")


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
    Mosaic, GPU -> Triton, CPU -> interpret mode). Forward mode only: never under `jax.grad`.
    """
    return dot_product_attention(q, k, v, kv_mask)


@functools.partial(pallas_attention.defjvp, symbolic_zeros=True)
def _pallas_attention_jvp(backend, primals, tangents):
    q, k, v, kv_mask = primals
    # Symbolic zeros (inputs that do not depend on the JVP's input, e.g. constant context
    # keys/values) reach the kernel as None, which drops their matmuls.
    dq, dk, dv = (None if isinstance(t, SymbolicZero) else t for t in tangents[:3])
    _, do = fused_attention_jvp(q, k, v, dq, dk, dv, kv_mask=kv_mask, backend=backend or None)
    # The primal output is XLA attention's, the very computation of the differentiated pass:
    # so the tangent pass's whole primal path (F^-) stays identical to the gradient pass's
    # forward and XLA computes it once for both. The kernel's own O feeds only its dO.
    return dot_product_attention(q, k, v, kv_mask), do.astype(v.dtype)


def fused_attention_jvp(q, k, v, dq, dk=None, dv=None, *, kv_mask=None, backend=None):
    """(O, dO) by the fused kernel, under `shard_map` over the context mesh when there is one.

    Inside `jax.set_mesh(mesh)` (the training step's mesh), the batch is split over every mesh
    axis not already manual; heads stay whole (Mosaic kernels are not auto-partitioned).
    """
    mesh = jax.sharding.get_abstract_mesh()
    # Already inside a shard_map over every mesh axis (all Manual): the arrays are local.
    if mesh.empty or mesh.size == 1 or set(mesh.manual_axes) == set(mesh.axis_names):
        return kernel.attention_jvp(q, k, v, dq, dk, dv, kv_mask=kv_mask, backend=backend)
    batch_axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    return kernel.sharded_attention_jvp(q, k, v, dq, dk, dv, mesh=mesh, kv_mask=kv_mask,
                                        batch_axes=batch_axes, head_axis=None, backend=backend)


def attention(q, k, v, *, impl: str = "xla", kv_mask=None):
    """Multi-head attention with the backend named by `impl` (config `model.attention_impl`).

    q: [B, N, H, D], k/v: [B, M, H, D], kv_mask: [B, M] bool (True = attend) or None
    -> [B, N, H, D]. Every backbone calls this, never a backend directly, so switching
    `attention_impl` switches every attention layer at once.
    """
    impl = resolve_attention_impl(impl)
    if impl.startswith("pallas"):
        return pallas_attention(q, k, v, kv_mask, impl.partition(":")[2])
    return dot_product_attention(q, k, v, kv_mask)


def resolve_attention_impl(impl: str, platform: str | None = None) -> str:
    """The implementation on `platform` (default: JAX's default backend): 'auto' is 'pallas'
    on TPU/GPU and 'xla' on CPU, and 'pallas' is pinned to the platform's kernel backend,
    'pallas:<backend>' (`flash_jvp.BACKENDS`). Resolving for the mesh's platform is what makes
    a TPU step compiled on a CPU host use the Mosaic kernel."""
    check_attention_impl(impl)
    platform = platform or jax.default_backend()
    if impl == "auto":
        impl = "pallas" if platform in ("tpu", "gpu") else "xla"
    if impl == "pallas":
        impl = f"pallas:{kernel.backend_for_platform(platform)}"
    return impl


def check_attention_impl(impl: str) -> str:
    """impl is one of ATTENTION_IMPLS or 'pallas:<backend>'; raises ConfigError otherwise."""
    name, _, backend = impl.partition(":")
    if impl not in ATTENTION_IMPLS and not (name == "pallas" and backend in kernel.BACKENDS):
        raise ConfigError(f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS} "
                          f"or pallas:<backend> with a backend of {kernel.BACKENDS}")
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
