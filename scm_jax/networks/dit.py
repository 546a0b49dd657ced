"""DiT (Peebles & Xie 2023) for latents, with the sCM changes (sCM Sec. 4.1).

The backbone: patchify (p x p patches, linear), fixed 2-D sin-cos position embedding, `depth`
transformer blocks modulated by the conditioning c = MLP(pos(t)) + Embed(y) [+ guidance], then a
modulated final LayerNorm and a linear un-patchify. Sizes S/B/L/XL with patch 2 in `PRESETS`.

The sCM changes:
- time input c_noise(t) = t in radians through `layers.positional_embedding` (256 channels,
  float32) and DiT's two-layer MLP; class labels with a null row `num_classes` for CFG; an
  optional guidance-scale input (positional embedding + zero-initialized linear, added to the
  time embedding).
- adaptive double normalization in place of adaLN (`modulation='adn'`, the default):
  LN(x) * (1 + scale) + shift  becomes  LN(x) * pnorm(scale) + pnorm(shift), pnorm over channels
  (sCM Sec. 4.1). The gates of adaLN-Zero stay as they are: a plain linear map of c, zero-
  initialized, *not* pixel-normalized. Why:
    * the gates are what makes each block start as the identity (x + 0 * branch); pnorm would
      pin their RMS to 1 forever, so no block could start as (or return to) the identity;
    * pnorm(a) = a / sqrt(mean a^2 + eps) is singular at a = 0 (its Jacobian there is
      1/sqrt(eps) ~ 1e4), so the scale/shift projections cannot keep adaLN-Zero's zero init:
      they get the Xavier init of DiT's other linear layers and are unit-RMS from step 0.
  So every block is exactly the identity at init and, with the zero-initialized final linear,
  F starts at 0, as in adaLN-Zero; the parameter count equals adaLN-Zero's (4D + 2D = 6D
  outputs per block, 2D in the final layer). `modulation='adaln'` is DiT's adaLN-Zero, kept to
  check parameter counts against the published S/B/L/XL sizes.
- optional QK normalization (`qk_norm`): RMSNorm with a learned gain over each head's q and k,
  which later sCM work found stabilizing (SANA-Sprint adopts it with c_noise = t). Off by
  default.

Attention goes through `attention.attention(q, k, v, impl=attention_impl)`, q: [B, N, H, D]:
this is the backbone where the fused attention+JVP kernel matters. Weights carry logical axis
names (`sharding.WEIGHT_AXES`) and block outputs are constrained to ("batch", "length",
"channels").
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from scm_jax.networks.attention import attention
from scm_jax.networks.layers import (Backbone, VECTOR_AXES, ZEROS, at_least_f32,
                                     check_backbone_config, dense, guidance_embedding,
                                     pixel_norm, positional_embedding, remat_block)
from scm_jax.networks.scan import apply_blocks

MODULATIONS = ("adn", "adaln")
TOKEN_AXES = ("batch", "length", "channels")

EMBED_INIT = nn.initializers.normal(0.02)   # DiT: timestep MLP and label table

SIZES = ("s", "b", "l", "xl")   # DiT's published sizes, all with patch 2
PRESETS = {
    "xs": dict(hidden_size=32, depth=2, num_heads=2, patch_size=2),   # tiny, for tests
    "s": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "b": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "l": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}


def _layer_norm(name, dtype):
    """DiT's LayerNorm: no affine parameters (the modulation supplies them), eps 1e-6."""
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name=name)


# Fixed 2-D sin-cos position embedding (MAE / DiT): half the channels encode the row, half the
# column, each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (D/4)).
def sincos_position_embedding(height: int, width: int, dim: int) -> np.ndarray:
    """-> [height * width, dim] float64 (row-major token order)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size % 4 == 0, "
                         f"got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4) / (dim // 4))

    def embed(pos):
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.concatenate([embed(rows.ravel()), embed(cols.ravel())], axis=1)


class Modulation(nn.Module):
    """Per-sample (shift, scale[, gate]) for `sites` LayerNorms from the conditioning c.

    'adaln': one zero-initialized linear layer, scale -> 1 + scale (adaLN-Zero).
    'adn':   shift, scale = pnorm(linear(c)) (Xavier init); gates from their own zero-initialized
             linear layer, not normalized (see the module docstring).
    c: [B, E] -> list of `sites` tuples of [B, 1, D] arrays in `dtype`.
    """

    features: int
    sites: int
    gated: bool
    modulation: str = "adn"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, c):
        d, emb_dtype = self.features, at_least_f32(self.dtype)
        per_site = 3 if self.gated else 2
        if self.modulation == "adaln":
            out = dense(self.sites * per_site * d, "adaLN_modulation", emb_dtype, init=ZEROS)(c)
            chunks = jnp.split(out, self.sites * per_site, axis=-1)
            groups = [list(chunks[i * per_site:(i + 1) * per_site]) for i in range(self.sites)]
            for g in groups:
                g[1] = 1.0 + g[1]
        else:
            out = dense(self.sites * 2 * d, "adn_modulation", emb_dtype)(c)
            chunks = [pixel_norm(a) for a in jnp.split(out, self.sites * 2, axis=-1)]
            groups = [chunks[2 * i:2 * i + 2] for i in range(self.sites)]
            if self.gated:
                gates = jnp.split(dense(self.sites * d, "gate", emb_dtype, init=ZEROS)(c),
                                  self.sites, axis=-1)
                groups = [g + [gate] for g, gate in zip(groups, gates)]
        return [tuple(a[:, None, :].astype(self.dtype) for a in g) for g in groups]


class DiTBlock(nn.Module):
    """x + gate1 * attn(mod1(LN(x))), then x + gate2 * mlp(mod2(LN(x))).

    x: [B, N, D], c: [B, E] -> [B, N, D]. mod(h) = h * scale + shift (see `Modulation`).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    modulation: str = "adn"
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, train: bool = False):
        b, n, d = x.shape
        (shift1, scale1, gate1), (shift2, scale2, gate2) = Modulation(
            d, 2, True, self.modulation, self.dtype, name="modulation")(c)
        drop = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)

        h = _layer_norm("norm1", self.dtype)(x) * scale1 + shift1
        qkv = dense(3 * d, "qkv", self.dtype)(h)
        qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            q, k = self._rms_norm("q_norm")(q), self._rms_norm("k_norm")(k)
        a = attention(q, k, v, impl=self.attention_impl).reshape(b, n, d)
        x = x + gate1 * drop(dense(d, "proj", self.dtype)(a))

        h = _layer_norm("norm2", self.dtype)(x) * scale2 + shift2
        h = nn.gelu(dense(int(d * self.mlp_ratio), "mlp_fc1", self.dtype)(h), approximate=True)
        x = x + gate2 * dense(d, "mlp_fc2", self.dtype)(drop(h))
        return nn.with_logical_constraint(x, TOKEN_AXES)

    def _rms_norm(self, name):
        ones = nn.with_logical_partitioning(nn.initializers.ones, VECTOR_AXES)
        return nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, scale_init=ones, name=name)


class DiT(Backbone):
    """F_theta(x_t / sigma_d, c_noise(t), y, s). x: [B, H, W, C] latents -> [B, H, W, C].

    H and W must be multiples of `patch_size`. Output in float32 (float64 stays float64).
    """

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: int = 2
    mlp_ratio: float = 4.0
    noise_channels: int = 256
    qk_norm: bool = False
    dropout: float = 0.0
    scan_blocks: bool = False

    @nn.compact
    def __call__(self, x, t, y=None, guidance=None, *, train: bool = False):
        self._check(x, t, y, guidance)
        b, hh, ww, ch = x.shape
        p, d = self.patch_size, self.hidden_size
        gh, gw = hh // p, ww // p
        c = self._embed(t, y, guidance)

        # Patchify: non-overlapping p x p patches, flattened (row, col, channel), then linear.
        patches = x.astype(self.dtype).reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)
        h = dense(d, "patch_embed", self.dtype)(patches.reshape(b, gh * gw, p * p * ch))
        h = h + jnp.asarray(sincos_position_embedding(gh, gw, d), self.dtype)[None]
        h = nn.with_logical_constraint(h, TOKEN_AXES)
        # The `depth` equal blocks: one scanned run with `scan_blocks` (`networks.scan`).
        kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
                      modulation=self.modulation, dropout=self.dropout,
                      attention_impl=self.attention_impl, dtype=self.dtype)
        h, _ = apply_blocks(
            h, [("", i, kwargs, None) for i in range(self.depth)], (c,), block_cls=DiTBlock,
            make_unrolled=lambda kw, name: remat_block(DiTBlock, self.remat)(**kw, name=name),
            keeps_shape=lambda kw, h: True, scan=self.scan_blocks, remat=self.remat,
            train=train)

        ((shift, scale),) = Modulation(d, 1, False, self.modulation, self.dtype,
                                       name="final_modulation")(c)
        h = _layer_norm("final_norm", self.dtype)(h) * scale + shift
        # Zero-initialized (DiT): F starts at 0.
        out = dense(p * p * ch, "final_linear", self.dtype, init=ZEROS)(h)
        out = out.reshape(b, gh, gw, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, ch)
        return out.astype(at_least_f32(self.dtype))

    def _embed(self, t, y, guidance):
        """[B] inputs -> silu(MLP(pos(t)) + Embed(y) + Dense(pos(s))): [B, D], >= float32."""
        dt = at_least_f32(self.dtype)
        c = dense(self.hidden_size, "t_embed0", dt, init=EMBED_INIT)(
            positional_embedding(t, self.noise_channels))
        c = dense(self.hidden_size, "t_embed1", dt, init=EMBED_INIT)(nn.silu(c))
        if self.num_classes:
            c = c + nn.Embed(self.num_classes + 1, self.hidden_size, dtype=dt, name="y_embed",
                             embedding_init=nn.with_logical_partitioning(
                                 EMBED_INIT, ("vocab", "embed_out")))(y)
        if self.guidance_input:
            c = c + guidance_embedding(guidance, self.noise_channels, self.hidden_size,
                                       "guidance_embed", dt)
        return nn.silu(c)

    def _check(self, x, t, y, guidance):
        self.check_call(MODULATIONS, x, t, y, guidance)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.patch_size < 1 or x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide the input size "
                             f"{x.shape[1]}x{x.shape[2]}")


CONFIG_KEYS = ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "num_classes",
               "guidance_input", "attention_impl", "qk_norm", "modulation")


def from_config(model, *, dropout: float, dtype) -> DiT:
    """The DiT that `config.model` describes.

    Reads exactly CONFIG_KEYS: hidden_size, depth, num_heads, patch_size, mlp_ratio,
    num_classes, guidance_input, attention_impl, qk_norm, modulation. `dropout` (on the
    attention output and the MLP hidden layer) and `dtype` come from the caller.
    """
    check_backbone_config(model, CONFIG_KEYS, MODULATIONS, "DiT")
    return DiT(
        hidden_size=model.hidden_size, depth=model.depth, num_heads=model.num_heads,
        patch_size=model.patch_size, mlp_ratio=model.mlp_ratio, num_classes=model.num_classes,
        guidance_input=model.guidance_input, qk_norm=model.qk_norm, modulation=model.modulation,
        dropout=dropout, attention_impl=model.attention_impl, remat=model.get("remat", "none"),
        scan_blocks=bool(model.get("scan_blocks", False)),
        dtype=dtype)
