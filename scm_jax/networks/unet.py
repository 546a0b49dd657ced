"""A small U-Net with the sCM architecture changes (sCM Sec. 4.1).

Changes from a DDPM++-style U-Net, as the paper makes them:
- the time input is c_noise(t) = t through a positional embedding (no 1000x, no Fourier 16);
- every residual block modulates with adaptive double normalization (ADN);
- optional class conditioning (with a null label for CFG) and a guidance-scale input.

Each of these choices can be switched back to what the paper replaced, for ablations (keys of
config.model, absent = the paper's choice; they change what the parameters mean, not their
shapes or names):
- `time_transform`: 'identity' (c_noise(t) = t, Sec. 4.1) | 'edm' (EDM's c_noise =
  ln(sigma_d tan t) / 4, whose derivative sin(t) d c_noise/dt = 1/(4 cos t) is unbounded, Eq. 7);
- `time_embedding`: 'positional' (Sec. 4.1) | 'fourier' (fixed random Fourier features of scale
  16, the unstable set-up of Fig. 4);
- `modulation`: 'adn' (Sec. 4.1) | 'adagn' (ADM/EDM's AdaGN, h * (1 + s) + b, which made CM
  training diverge).

The network computes F in x_t / sigma_d space: preconditioning (c_skip = cos t, c_out =
-sigma_d sin t, Eq. 23) lives in `trigflow.consistency_fn`, not here.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.networks.attention import SelfAttention
from scm_jax.networks.layers import (AdaptiveDoubleNorm, Backbone, ConditioningEmbedding,
                                     at_least_f32, check_inputs, noise_conditioning, remat_block)

# Logical axes of the convolutions (scm_jax.sharding): with mesh.fsdp > 1 their kernels and
# biases are split over 'fsdp' along the output channels; the rest stays replicated.
CONV_AXES = ("conv_height", "conv_width", "embed_in", "embed_out")


def _conv(features, kernel, name, dtype, init=nn.initializers.lecun_normal()):
    """nn.Conv with Flax's default initializers, its weights named for sharding."""
    return nn.Conv(features, (kernel, kernel), dtype=dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(init, CONV_AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("embed_out",)))


class ResBlock(nn.Module):
    """x -> (skip(x) + conv1(drop(silu(ADN(conv0(silu(norm(x))), emb))))) / sqrt(2).

    x: [B, H, W, Cin], emb: [B, E] -> [B, H, W, Cout].
    """

    out_channels: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    modulation: str = "adn"   # 'adn' | 'adagn' (see `layers.AdaptiveDoubleNorm`)

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        cin = x.shape[-1]
        h = nn.GroupNorm(num_groups=min(8, cin), dtype=self.dtype, name="norm0")(x)
        h = _conv(self.out_channels, 3, "conv0", self.dtype)(nn.silu(h))
        h = AdaptiveDoubleNorm(dtype=self.dtype, modulation=self.modulation, name="adn")(h, emb)
        h = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(nn.silu(h))
        # Zero-initialized last conv: each block starts as its skip path (DDPM++ init_zero).
        h = _conv(self.out_channels, 3, "conv1", self.dtype, init=nn.initializers.zeros)(h)
        if cin != self.out_channels:
            x = _conv(self.out_channels, 1, "skip", self.dtype)(x)
        return (x + h) / jnp.sqrt(2.0).astype(h.dtype)


class UNet(Backbone):
    """F_theta(x_t / sigma_d, c_noise(t), y, s). x: [B, H, W, C] -> [B, H, W, C] (float32 out).

    Resolutions halve once per entry of `channel_mult` after the first. Attention runs at the
    resolutions listed in `attn_resolutions` (in pixels).

    `time_transform`, `time_embedding` and `modulation` are the ablation switches of the module
    docstring. `sigma_d` (the data std) is used by time_transform='edm' only, whose c_noise =
    ln(sigma_d tan t) / 4 needs it, since the network sees t and x_t / sigma_d but not sigma_d.
    It is not a key of config.model: it is config.data.sigma_d, which the objectives copy into
    the model section they build from (`RegressionObjective.model_config`), and only when
    time_transform='edm', so the identity of every other checkpoint is unchanged.
    """

    channels: int = 32
    channel_mult: Sequence[int] = (1, 2)
    num_blocks: int = 2
    attn_resolutions: Sequence[int] = (4,)
    num_heads: int = 1
    dropout: float = 0.0
    noise_channels: int = 64
    emb_channels: int = 128
    time_transform: str = "identity"
    time_embedding: str = "positional"
    sigma_d: float | None = None

    @nn.compact
    def __call__(self, x, t, y=None, guidance=None, *, train: bool = False):
        check_inputs(x, t, y, guidance, num_classes=self.num_classes,
                     guidance_input=self.guidance_input)
        c_noise = noise_conditioning(t, self.time_transform, self.sigma_d)
        emb = ConditioningEmbedding(self.emb_channels, self.noise_channels, self.num_classes,
                                    self.guidance_input, self.time_embedding,
                                    name="embed")(c_noise, y, guidance)
        block = lambda c, name: remat_block(ResBlock, self.remat)(  # noqa: E731
            c, self.dropout, self.dtype, self.modulation, name=name)
        attend = lambda name: SelfAttention(self.num_heads, self.attention_impl, self.dtype,  # noqa: E731
                                            name=name)

        h = _conv(self.channels, 3, "conv_in", self.dtype)(x.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            res = x.shape[1] >> level
            if level:
                h = nn.avg_pool(h, (2, 2), (2, 2))
                skips.append(h)
            for i in range(self.num_blocks):
                h = block(self.channels * mult, f"enc_{res}x{res}_block{i}")(h, emb, train)
                if res in self.attn_resolutions:
                    h = attend(f"enc_{res}x{res}_attn{i}")(h)
                skips.append(h)

        res = x.shape[1] >> (len(self.channel_mult) - 1)
        h = block(h.shape[-1], f"mid_{res}x{res}_block0")(h, emb, train)
        h = attend(f"mid_{res}x{res}_attn")(h)
        h = block(h.shape[-1], f"mid_{res}x{res}_block1")(h, emb, train)

        for level in reversed(range(len(self.channel_mult))):
            res = x.shape[1] >> level
            for i in range(self.num_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                c = self.channels * self.channel_mult[level]
                h = block(c, f"dec_{res}x{res}_block{i}")(h, emb, train)
                if res in self.attn_resolutions:
                    h = attend(f"dec_{res}x{res}_attn{i}")(h)
            if level:
                h = jax.image.resize(h, (h.shape[0], 2 * res, 2 * res, h.shape[-1]), "nearest")

        h = nn.silu(nn.GroupNorm(num_groups=min(8, h.shape[-1]), dtype=self.dtype, name="norm_out")(h))
        out = _conv(x.shape[-1], 3, "conv_out", self.dtype)(h)
        return out.astype(at_least_f32(self.dtype))


def from_config(model, *, dropout: float, dtype) -> UNet:
    """The U-Net that config.model describes (keys: channels, channel_mult, num_blocks,
    attn_resolutions, num_heads, noise_channels, emb_channels, num_classes, guidance_input,
    attention_impl; optional: remat, time_transform, time_embedding, modulation, each absent =
    its default, and sigma_d, which only the objectives set, see `UNet`)."""
    return UNet(
        channels=model.channels,
        channel_mult=tuple(model.channel_mult),
        num_blocks=model.num_blocks,
        attn_resolutions=tuple(model.attn_resolutions),
        num_heads=model.num_heads,
        dropout=dropout,
        noise_channels=model.noise_channels,
        emb_channels=model.emb_channels,
        num_classes=model.num_classes,
        guidance_input=model.guidance_input,
        attention_impl=model.attention_impl,
        remat=model.get("remat", "none"),
        dtype=dtype,
        time_transform=model.get("time_transform", "identity"),
        time_embedding=model.get("time_embedding", "positional"),
        modulation=model.get("modulation", "adn"),
        sigma_d=model.get("sigma_d", None),
    )
