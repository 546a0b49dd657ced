"""Self-attention over image positions, with a backend switch.

`attention_impl` names the implementation of softmax(q k^T / sqrt(d)) v. Only 'xla' exists today;
plain XLA attention is differentiable in both modes, so `jax.jvp` and `jax.grad` go through it.
The fused Pallas forward+JVP kernel (for long sequences) will register here as another backend.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla",)


def dot_product_attention(q, k, v):
    """q: [B, N, H, D], k/v: [B, M, H, D] -> [B, N, H, D]; softmax in float32."""
    scale = q.shape[-1] ** -0.5
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=acc) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhnm,bmhd->bnhd", weights, v)


def attention(q, k, v, *, impl: str = "xla"):
    """Multi-head attention with the backend named by `impl` (config `model.attention_impl`).

    q: [B, N, H, D], k/v: [B, M, H, D] -> [B, N, H, D]. Every backbone calls this, never a
    backend directly, so switching `attention_impl` switches every attention layer at once.
    """
    check_attention_impl(impl)
    return dot_product_attention(q, k, v)


def check_attention_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}")
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
