"""DDPM++ (Song et al. 2021) as EDM runs it on CIFAR-10, with the sCM changes (sCM App. G.1).

The backbone is EDM's `SongUNet` with its DDPM++ settings (Karras et al. 2022, NVlabs/edm
`training/networks.py`): base width 128, channel_mult (2, 2, 2), 4 blocks per resolution,
attention at 16x16 (and in the first middle block), positional noise embedding
(endpoint=True, 128 channels), a 512-wide embedding MLP, [1, 1] resampling (2x2 box filter down,
nearest up) with 1x1 resampling skip convs, skip scale 1/sqrt(2), GroupNorm(min(32, C/4), eps
1e-6), Xavier-uniform init with the last conv of every block, of every attention projection and
of the output zero-initialized. The sCM changes (Sec. 4.1):

- time input c_noise(t) = t in radians through `layers.positional_embedding`, in float32;
- ADN in every residual block in place of DDPM++'s additive embedding:
  h = norm(h) * pnorm(s(emb)) + pnorm(b(emb)), no "+1" (`modulation='adn'`, the default).
  `modulation='additive'` is EDM's h = norm(h + affine(emb)); with it the 'cifar10' preset has
  exactly EDM's parameter count less its 9 -> 128 augmentation-label map (see the tests);
- optional class labels (row `num_classes` is the null label of CFG) and an optional
  guidance-scale input (its own positional embedding and a zero-initialized linear layer), both
  added to the noise embedding where EDM adds its labels, i.e. before the embedding MLP.

The network computes F in x_t / sigma_d space; the TrigFlow preconditioning lives in
`trigflow.py`. Weights carry logical axis names (`sharding.WEIGHT_AXES`) for FSDP.
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from scm_jax.networks.attention import attention
from scm_jax.networks.layers import (Backbone, VECTOR_AXES, XAVIER, ZEROS, adaptive_double_norm,
                                     at_least_f32, check_backbone_config, dense,
                                     guidance_embedding, positional_embedding, remat_block)
from scm_jax.networks.scan import apply_blocks

MODULATIONS = ("adn", "additive")
CONV_AXES = ("conv_height", "conv_width", "embed_in", "embed_out")
MAP_AXES = ("batch", "height", "width", "channels")

# EDM's init_attn: Xavier-uniform scaled by sqrt(0.2) (variance by 0.2).
ATTN_INIT = nn.initializers.variance_scaling(0.2, "fan_avg", "uniform")
SKIP_SCALE = float(np.sqrt(0.5))

PRESETS = {
    # The paper's CIFAR-10 teacher network (sCM App. G.1: DDPM++ as in EDM, dropout 0.13).
    "cifar10": dict(channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                    num_heads=1, noise_channels=128, emb_channels=512, dropout=0.13),
    # Tiny, for tests ([B, 16, 16, C] inputs: attention at 8x8 and in the middle).
    "xs": dict(channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
               num_heads=2, noise_channels=16, emb_channels=32),
}


def _conv(features, kernel, name, dtype, init=XAVIER):
    return nn.Conv(features, (kernel, kernel), padding="SAME", dtype=dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(init, CONV_AXES),
                   bias_init=nn.with_logical_partitioning(ZEROS, VECTOR_AXES))


# EDM's GroupNorm: min(32, C / 4) groups, eps 1e-6; affine=False is the norm inside ADN.
def _group_norm(channels, name, dtype, affine=True):
    return nn.GroupNorm(num_groups=max(1, min(32, channels // 4)), epsilon=1e-6, dtype=dtype,
                        use_scale=affine, use_bias=affine, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, VECTOR_AXES),
                        bias_init=nn.with_logical_partitioning(ZEROS, VECTOR_AXES))


# Resample filter [1, 1]: a 2x2 box filter with stride 2 down, its transpose (x4) up, i.e.
# average pooling and nearest-neighbour upsampling.
def _resample(x, mode):
    if mode == "down":
        return nn.avg_pool(x, (2, 2), (2, 2))
    if mode == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x


class UNetBlock(nn.Module):
    """EDM's UNetBlock with DDPM++ settings and a choice of embedding modulation.

    h = conv0(resample(silu(norm0(x))))
    h = norm1(h) * pnorm(s(emb)) + pnorm(b(emb))     ('adn', sCM Sec. 4.1)
      | norm1(h + affine(emb))                        ('additive', DDPM++)
    x = (skip(resample(x)) + conv1(dropout(silu(h)))) / sqrt(2)
    x = (x + proj(attn(norm2(x)))) / sqrt(2)          (if attention)

    x: [B, H, W, Cin], emb: [B, E] -> [B, H', W', Cout] (H' = H/2, 2H or H by `resample`).
    """

    out_channels: int
    resample: str = "none"        # 'none' | 'down' | 'up'
    attention: bool = False
    num_heads: int = 1
    dropout: float = 0.0
    modulation: str = "adn"
    attention_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        cin, cout, dt = x.shape[-1], self.out_channels, self.dtype
        h = nn.silu(_group_norm(cin, "norm0", dt)(x))
        h = _conv(cout, 3, "conv0", dt)(_resample(h, self.resample))
        emb_dtype = at_least_f32(dt)
        if self.modulation == "adn":
            scale, shift = jnp.split(dense(2 * cout, "affine", emb_dtype)(emb), 2, axis=-1)
            h = adaptive_double_norm(_group_norm(cout, "norm1", dt, affine=False)(h), scale, shift)
        else:
            params = dense(cout, "affine", emb_dtype)(emb)[:, None, None, :].astype(h.dtype)
            h = _group_norm(cout, "norm1", dt)(h + params)
        h = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(nn.silu(h))
        # Zero-initialized (EDM: 1e-5 scale): every block starts as its skip path.
        h = _conv(cout, 3, "conv1", dt, init=ZEROS)(h)
        skip = x
        if cin != cout or self.resample != "none":
            skip = _conv(cout, 1, "skip", dt)(_resample(x, self.resample))
        x = (h + skip) * jnp.asarray(SKIP_SCALE, h.dtype)
        if self.attention:
            x = (x + self._attend(x)) * jnp.asarray(SKIP_SCALE, x.dtype)
        return nn.with_logical_constraint(x, MAP_AXES)

    def _attend(self, x):
        b, hh, ww, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"{c} channels are not divisible by num_heads={self.num_heads}")
        y = _group_norm(c, "norm2", self.dtype)(x)
        qkv = _conv(3 * c, 1, "qkv", self.dtype, init=ATTN_INIT)(y)
        qkv = qkv.reshape(b, hh * ww, 3, self.num_heads, c // self.num_heads)
        a = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.attention_impl)
        return _conv(c, 1, "proj", self.dtype, init=ZEROS)(a.reshape(b, hh, ww, c))


class DDPMPP(Backbone):
    """F_theta(x_t / sigma_d, c_noise(t), y, s). x: [B, H, W, C] -> [B, H, W, C].

    Resolutions halve once per entry of `channel_mult` after the first; attention runs at the
    resolutions (in pixels) listed in `attn_resolutions` and in the first middle block.
    Dropout acts in blocks whose resolution is <= `dropout_max_resolution` (0: all), as the
    paper applies it only at resolutions <= 16 on ImageNet. Output in float32 (float64 stays).
    """

    channels: int = 128
    channel_mult: Sequence[int] = (2, 2, 2)
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    dropout: float = 0.0
    dropout_max_resolution: int = 0
    noise_channels: int = 128
    emb_channels: int = 512
    scan_blocks: bool = False

    @nn.compact
    def __call__(self, x, t, y=None, guidance=None, *, train: bool = False):
        self._check(x, t, y, guidance)
        emb = self._embed(t, y, guidance)
        block = functools.partial(remat_block(UNetBlock, self.remat), num_heads=self.num_heads,
                                  modulation=self.modulation,
                                  attention_impl=self.attention_impl, dtype=self.dtype)

        def drop(res):
            limit = self.dropout_max_resolution
            return self.dropout if not limit or res <= limit else 0.0

        def tag(level):
            return f"{x.shape[1] >> level}x{x.shape[2] >> level}"

        def make(kwargs, name):
            return remat_block(UNetBlock, self.remat)(**kwargs, name=name)

        # Each level's runs of equal blocks, scanned when `scan_blocks` (`networks.scan`).
        run = functools.partial(
            apply_blocks, block_cls=UNetBlock, make_unrolled=make, scan=self.scan_blocks,
            remat=self.remat, train=train,
            keeps_shape=lambda kw, h: (h.shape[-1] == kw["out_channels"]
                                       and kw.get("resample", "none") == "none"))
        common = dict(num_heads=self.num_heads, modulation=self.modulation,
                      attention_impl=self.attention_impl, dtype=self.dtype)

        # Encoder: each level's feature maps are kept for the decoder's skip connections.
        h = x.astype(self.dtype)
        skips = []
        for level, mult in enumerate(self.channel_mult):
            res = x.shape[1] >> level
            if level == 0:
                h = _conv(self.channels, 3, f"enc_{tag(level)}_conv", self.dtype)(h)
            else:
                h = block(h.shape[-1], resample="down", dropout=drop(res),
                          name=f"enc_{tag(level)}_down")(h, emb, train)
            skips.append(h)
            kwargs = dict(common, out_channels=self.channels * mult,
                          attention=res in self.attn_resolutions, dropout=drop(res))
            h, outputs = run(h, [(f"enc_{tag(level)}_", i, kwargs, None)
                                 for i in range(self.num_blocks)], (emb,), emit=True)
            skips.extend(outputs)

        # Decoder: two middle blocks (the first with attention), then per level an upsampling
        # block and num_blocks + 1 blocks that each take one skip.
        for level in reversed(range(len(self.channel_mult))):
            res, c = x.shape[1] >> level, h.shape[-1]
            if level == len(self.channel_mult) - 1:
                h = block(c, attention=True, dropout=drop(res),
                          name=f"dec_{tag(level)}_in0")(h, emb, train)
                h = block(c, dropout=drop(res), name=f"dec_{tag(level)}_in1")(h, emb, train)
            else:
                h = block(c, resample="up", dropout=drop(res),
                          name=f"dec_{tag(level)}_up")(h, emb, train)
            blocks = [(f"dec_{tag(level)}_", i, dict(
                common, out_channels=self.channels * self.channel_mult[level],
                attention=i == self.num_blocks and res in self.attn_resolutions,
                dropout=drop(res)), skips.pop()) for i in range(self.num_blocks + 1)]
            h, _ = run(h, blocks, (emb,), merge=lambda h, skip: jnp.concatenate([h, skip], -1))

        h = nn.silu(_group_norm(h.shape[-1], f"dec_{tag(0)}_aux_norm", self.dtype)(h))
        out = _conv(x.shape[-1], 3, f"dec_{tag(0)}_aux_conv", self.dtype, init=ZEROS)(h)
        return out.astype(at_least_f32(self.dtype))

    def _embed(self, t, y, guidance):
        """[B] inputs -> [B, E] in at least float32: silu(L1(silu(L0(pos(t) + label + guid))))."""
        dt = at_least_f32(self.dtype)
        emb = positional_embedding(t, self.noise_channels)
        if self.num_classes:
            emb = emb + nn.Embed(self.num_classes + 1, self.noise_channels, dtype=dt,
                                 embedding_init=nn.with_logical_partitioning(
                                     nn.initializers.normal(1.0), ("vocab", "embed_out")),
                                 name="map_label")(y)
        if self.guidance_input:
            emb = emb + guidance_embedding(guidance, self.noise_channels, self.noise_channels,
                                           "map_guidance", dt)
        emb = nn.silu(dense(self.emb_channels, "map_layer0", dt)(emb))
        return nn.silu(dense(self.emb_channels, "map_layer1", dt)(emb))

    def _check(self, x, t, y, guidance):
        self.check_call(MODULATIONS, x, t, y, guidance)
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"input size {x.shape[1]}x{x.shape[2]} is not divisible by {factor}, "
                             f"the downsampling factor of channel_mult={tuple(self.channel_mult)}")


CONFIG_KEYS = ("channels", "channel_mult", "num_blocks", "attn_resolutions", "num_heads",
               "noise_channels", "emb_channels", "num_classes", "guidance_input",
               "attention_impl", "dropout_max_resolution", "modulation")


def from_config(model, *, dropout: float, dtype) -> DDPMPP:
    """The DDPM++ that `config.model` describes.

    Reads exactly CONFIG_KEYS: channels, channel_mult, num_blocks, attn_resolutions, num_heads,
    noise_channels, emb_channels, num_classes, guidance_input, attention_impl,
    dropout_max_resolution, modulation. `dropout` and `dtype` come from the caller.
    """
    check_backbone_config(model, CONFIG_KEYS, MODULATIONS, "DDPM++")
    return DDPMPP(
        channels=model.channels, channel_mult=tuple(model.channel_mult),
        num_blocks=model.num_blocks, attn_resolutions=tuple(model.attn_resolutions),
        num_heads=model.num_heads, dropout=dropout,
        dropout_max_resolution=model.dropout_max_resolution,
        noise_channels=model.noise_channels, emb_channels=model.emb_channels,
        num_classes=model.num_classes, guidance_input=model.guidance_input,
        modulation=model.modulation, attention_impl=model.attention_impl,
        remat=model.get("remat", "none"), scan_blocks=bool(model.get("scan_blocks", False)),
        dtype=dtype)
