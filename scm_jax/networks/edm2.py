"""The EDM2 U-Net (Karras et al. 2024, config G) with the sCM changes (sCM Sec. 4.1).

EDM2's magnitude-preserving U-Net (`mp_layers.py` holds the primitives), changed as sCM does:
- the time input is c_noise(t) = t (radians) through a positional embedding (float32), in place
  of MPFourier of EDM's log(sigma) / 4 (sCM Sec. 4.1, Eq. 7);
- every block modulates with adaptive double normalization, h = norm(h) pnorm(s) + pnorm(b), in
  place of EDM2's h (1 + emb_linear(emb)) (sCM Sec. 4.1); `modulation='edm2'` keeps EDM2's
  form, whose parameter counts are EDM2's published ones;
- optional class labels (index num_classes is the null label of CFG dropout; it embeds as EDM2's
  all-zero label vector) and an optional guidance-scale input (sCD students, sCM Sec. 7);
- dropout only in blocks at resolution <= dropout_max_resolution (sCM Tables 4/5).

EDM2's logvar head is not part of the backbone (the package trains its own `AdaptiveWeight`).
The network computes F in x_t / sigma_d space; preconditioning lives in `trigflow`. Forced weight
normalization is `project_params`, applied by the train step after every optimizer update.

EDM2-native mode (`NATIVE`; config.model.edm2_native = True) computes EDM2's published network
exactly, so that a network imported from EDM2's pickles (`edm2_names.params_from_edm2`) serves
as a TrigFlow teacher. EDM2's denoiser is D(x; sigma) = c_skip x + c_out F_edm(c_in x, c_noise,
y) with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in =
1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (sd = sigma_d; EDM2 Sec. 2, Karras et al.
2024). TrigFlow's x_t = cos t x_0 + sin t z is EDM's x = x_t / cos t at sigma = sd tan t (sCM
Eq. 30, Lu & Song 2025), where c_skip = cos^2 t, c_out = sd sin t and c_in x = x_t / sd, so
D(x_t / cos t; sd tan t) = cos t x_t + sd sin t F_edm(x_t / sd, ln(sd tan t) / 4, y). Equal to
the consistency function f = cos t x_t - sd sin t F(x_t / sd, t) (sCM Eq. 5) for every x_t iff

    F(x_t / sd, t, y) = -F_edm(x_t / sd, ln(sd tan t) / 4, y):

EDM2's U-Net, fed the same input, with EDM's time input, negated. NATIVE sets each part:
time_transform 'edm' (c_noise = ln(sd tan t) / 4, `layers.noise_conditioning`; needs sigma_d),
time_embedding 'mp_fourier' (EDM2's MPFourier, `mp_layers.MPFourier`), modulation 'edm2',
negate_output, and EDM2's balances (concat_balance 0.5: the default of this module, 0.3, is
not EDM2's, and stays for the checkpoints trained with it). In the rearranged sCM tangent (the
t tangent cos t sin t sd, `objectives.scm.scm_tangent`), the time input's tangent is
cos t sin t sd d c_noise/dt = sd / 4 at every t, while sin t d c_noise/dt = 1 / (4 cos t) is
unbounded (sCM Eq. 7).
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import ConfigError
from scm_jax.networks.attention import attention, check_attention_impl
from scm_jax.networks.layers import (Backbone, TIME_TRANSFORMS, adaptive_double_norm, at_least_f32,
                                     check_backbone_config, check_inputs, noise_conditioning,
                                     remat_block)
from scm_jax.networks.mp_layers import (DENSE_AXES, MP_WEIGHT, MPConv, MPFourier, mp_cat,
                                        mp_positional_features, mp_silu, mp_sum, normalize,
                                        project_weight)
from scm_jax.networks.scan import apply_blocks, layer_axis_leaf

MODULATIONS = ("adn", "edm2")
TIME_EMBEDDINGS = ("positional", "mp_fourier")   # what embeds c_noise(t)
# EDM2's own network (Karras et al. 2024; NVlabs/edm2 UNet and Block defaults, which EDM2's
# published networks use), negated: the TrigFlow F of an EDM2 denoiser (module docstring).
NATIVE = dict(time_transform="edm", time_embedding="mp_fourier", modulation="edm2",
              negate_output=True, label_balance=0.5, concat_balance=0.5, res_balance=0.3,
              attn_balance=0.3, clip_act=256.0)
ACTIVATION_AXES = ("batch", "height", "width", "channels")


def _scalar_gain(module: nn.Module, name: str) -> jax.Array:
    """A learned scalar gain, zero at init (EDM2's emb_gain / out_gain)."""
    return module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, ()), ())


# EDM2 resampling with filter [1, 1]: 2x2 average pooling down, nearest-neighbour up.
def resample(x: jax.Array, mode: str) -> jax.Array:
    """x: [B, H, W, C] -> [B, H/2, W/2, C] ('down'), [B, 2H, 2W, C] ('up') or x ('keep')."""
    if mode == "down":
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    if mode == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x


class Modulation(nn.Module):
    """Conditioning of a block's residual branch on the embedding. h: [B, H, W, C], emb: [B, E].

    'adn':  norm(h) * pnorm(s) + pnorm(b), (s, b) = split(MPLinear_2C(emb)) (sCM Sec. 4.1; no
            "+1", the formula taken literally). norm is EDM2's pixel norm: EDM2 blocks have no GroupNorm. pnorm
            makes a gain on the linear layer meaningless, so ADN has none.
    'edm2': h * (1 + MPLinear_C(emb, gain=emb_gain)), emb_gain zero at init (EDM2 Fig. 21).
    The linear layer runs in emb's precision (float32 at least); only the result is cast.
    """

    kind: str = "adn"

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        c, dtype = h.shape[-1], at_least_f32(emb.dtype)
        if self.kind == "edm2":
            gain = _scalar_gain(self, "emb_gain")
            scale = MPConv(c, dtype=dtype, name="emb_linear")(emb, gain) + 1
            return h * scale[:, None, None, :].astype(h.dtype)
        scale, shift = jnp.split(MPConv(2 * c, dtype=dtype, name="emb_linear")(emb), 2, axis=-1)
        return adaptive_double_norm(normalize(h, axis=-1), scale, shift)


class MPSelfAttention(nn.Module):
    """EDM2's cosine self-attention: q, k, v pixel-normalized over the head dim (EDM2 Fig. 21).

    x: [B, H, W, C] -> [B, H, W, C] (the attention branch, before mp_sum with x).
    """

    num_heads: int
    attention_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        qkv = MPConv(3 * c, (1, 1), dtype=self.dtype, name="qkv")(x)
        qkv = normalize(qkv.reshape(b, h * w, 3, self.num_heads, c // self.num_heads), axis=-1)
        y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.attention_impl)
        return MPConv(c, (1, 1), dtype=self.dtype, name="proj")(y.reshape(b, h, w, c))


class Block(nn.Module):
    """EDM2 encoder/decoder block (EDM2 Fig. 21). x: [B, H, W, Cin], emb: [B, E] -> [B, H', W', C].

    enc: x <- pixel_norm(skip(resample(x))); y = conv1(drop(mp_silu(mod(conv0(mp_silu(x)), emb))))
    dec: the same residual branch on resample(x); skip(x) after it. Then x = mp_sum(x, y), an
    optional attention branch mp_sum'd the same way, and clipping to +-clip_act.
    """

    out_channels: int
    flavor: str = "enc"
    resample_mode: str = "keep"
    attention: bool = False
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256.0
    modulation: str = "adn"
    attention_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        c, dt = self.out_channels, self.dtype
        x = resample(x, self.resample_mode)
        needs_skip = x.shape[-1] != c
        if self.flavor == "enc":
            if needs_skip:
                x = MPConv(c, (1, 1), dtype=dt, name="conv_skip")(x)
            x = normalize(x, axis=-1)
        y = MPConv(c, (3, 3), dtype=dt, name="conv_res0")(mp_silu(x))
        y = mp_silu(Modulation(self.modulation, name="modulation")(y, emb))
        if self.dropout:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = MPConv(c, (3, 3), dtype=dt, name="conv_res1")(y)
        if self.flavor == "dec" and needs_skip:
            x = MPConv(c, (1, 1), dtype=dt, name="conv_skip")(x)
        x = mp_sum(x, y, self.res_balance)
        if self.attention:
            if c % self.channels_per_head:
                raise ValueError(f"block width {c} is not divisible by channels_per_head "
                                 f"{self.channels_per_head}")
            heads = c // self.channels_per_head
            y = MPSelfAttention(heads, self.attention_impl, dt, name="attn")(x)
            x = mp_sum(x, y, self.attn_balance)
        if self.clip_act is not None:
            x = jnp.clip(x, -self.clip_act, self.clip_act)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class EDM2UNet(Backbone):
    """F_theta(x_t / sigma_d, t, y, s) with EDM2's U-Net. x: [B, R, R, C] -> [B, R, R, C].

    Resolution R halves once per entry of `channel_mult` after the first. noise_channels defaults
    to model_channels * channel_mult[0] and emb_channels to model_channels * max(channel_mult), as
    in EDM2. Output in float32 (float64 when dtype is float64).

    The time input is c_noise = noise_conditioning(t, time_transform, sigma_d) ('identity': t;
    'edm': ln(sigma_d tan t) / 4, which needs sigma_d), embedded by `time_embedding`
    ('positional': sCM's; 'mp_fourier': EDM2's MPFourier, params emb_fourier/{freqs, phases}
    [noise_channels]); negate_output returns -UNet(...). `NATIVE` sets these to EDM2's network.
    """

    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: Sequence[int] = (16, 8)
    channels_per_head: int = 64
    noise_channels: int | None = None
    emb_channels: int | None = None
    label_balance: float = 0.5
    concat_balance: float = 0.3
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256.0
    dropout: float = 0.0
    dropout_max_resolution: int = 0     # dropout only at resolutions <= this; 0: everywhere
    time_transform: str = "identity"
    time_embedding: str = "positional"
    sigma_d: float | None = None        # the data std; time_transform 'edm' needs it
    negate_output: bool = False
    scan_blocks: bool = False

    def _check_inputs(self, x, t, y, guidance):
        for name, value, allowed in (("modulation", self.modulation, MODULATIONS),
                                     ("time_transform", self.time_transform, TIME_TRANSFORMS),
                                     ("time_embedding", self.time_embedding, TIME_EMBEDDINGS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.time_transform == "edm" and self.sigma_d is None:
            raise ValueError("EDM2UNet with time_transform='edm' (c_noise = ln(sigma_d tan t) / "
                             "4) needs sigma_d: from_config reads config.model.sigma_d, which "
                             "the objectives fill from config.data.sigma_d")
        check_attention_impl(self.attention_impl)
        if x.ndim != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f"expected square images x of shape [B, R, R, C], got {x.shape}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor:
            raise ValueError(f"resolution {x.shape[1]} is not divisible by {factor}, which "
                             f"{len(self.channel_mult)} levels of channel_mult need")
        check_inputs(x, t, y, guidance, num_classes=self.num_classes,
                     guidance_input=self.guidance_input)

    def _embed(self, t, y, guidance):
        """[B] inputs -> emb [B, E], in float32 at least: the sCM tangent runs through it."""
        dtype = at_least_f32(self.dtype)
        cnoise = self.noise_channels or self.model_channels * self.channel_mult[0]
        cemb = self.emb_channels or self.model_channels * max(self.channel_mult)
        c_noise = noise_conditioning(t, self.time_transform, self.sigma_d)
        if self.time_embedding == "mp_fourier":
            features = MPFourier(cnoise, name="emb_fourier")(c_noise)
        else:
            features = mp_positional_features(c_noise, cnoise)
        emb = MPConv(cemb, dtype=dtype, name="emb_noise")(features)
        if self.guidance_input:
            g = mp_positional_features(jnp.broadcast_to(guidance, t.shape).astype(t.dtype), cnoise)
            # Plain zero-initialized linear (not MP: forced normalization would blow a zero weight
            # up on the first step): a student initialized from its teacher starts identical to it.
            emb = emb + nn.Dense(cemb, use_bias=False, dtype=dtype, name="emb_guidance",
                                 kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                          DENSE_AXES))(g)
        if self.num_classes:
            # one_hot maps the null label (index num_classes) to EDM2's all-zero label vector.
            onehot = jax.nn.one_hot(y, self.num_classes, dtype=dtype) * np.sqrt(self.num_classes)
            label = MPConv(cemb, axes=("vocab", "embed_out"), dtype=dtype, name="emb_label")(onehot)
            emb = mp_sum(emb, label, self.label_balance)
        return mp_silu(emb)

    @nn.compact
    def __call__(self, x, t, y=None, guidance=None, *, train: bool = False):
        self._check_inputs(x, t, y, guidance)
        emb = self._embed(t, y, guidance)
        cblock = [self.model_channels * m for m in self.channel_mult]
        levels = len(cblock)

        def settings(channels, flavor, res, **kw):
            drop = self.dropout if (not self.dropout_max_resolution
                                    or res <= self.dropout_max_resolution) else 0.0
            return dict(out_channels=channels, flavor=flavor,
                        channels_per_head=self.channels_per_head, dropout=drop,
                        res_balance=self.res_balance, attn_balance=self.attn_balance,
                        clip_act=self.clip_act, modulation=self.modulation,
                        attention_impl=self.attention_impl, dtype=self.dtype, **kw)

        def make(kwargs, name):
            return remat_block(Block, self.remat)(**kwargs, name=name)

        def block(channels, flavor, res, name, **kw):
            return make(settings(channels, flavor, res, **kw), f"{flavor}_{res}x{res}_{name}")

        # Each level's run of `num_blocks` (decoder: + 1) equal blocks, scanned where they keep
        # the activation's shape when `scan_blocks` (`networks.scan`).
        run = functools.partial(
            apply_blocks, block_cls=Block, make_unrolled=make, scan=self.scan_blocks,
            remat=self.remat, train=train,
            keeps_shape=lambda kw, h: (h.shape[-1] == kw["out_channels"]
                                       and kw.get("resample_mode", "keep") == "keep"))

        # Encoder. EDM2's constant-ones channel lets the first conv see the image border.
        h = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1).astype(self.dtype)
        skips = []
        for level, channels in enumerate(cblock):
            res = x.shape[1] >> level
            if level == 0:
                h = MPConv(channels, (3, 3), dtype=self.dtype, name=f"enc_{res}x{res}_conv")(h)
            else:
                h = block(h.shape[-1], "enc", res, "down",
                          resample_mode="down")(h, emb, train)
            skips.append(h)
            kwargs = settings(channels, "enc", res, attention=res in self.attn_resolutions)
            h, outputs = run(h, [(f"enc_{res}x{res}_", i, kwargs, None)
                                 for i in range(self.num_blocks)], (emb,), emit=True)
            skips.extend(outputs)

        # Decoder, fed every encoder output through mp_cat.
        for level in reversed(range(levels)):
            res = x.shape[1] >> level
            if level == levels - 1:
                h = block(h.shape[-1], "dec", res, "in0", attention=True)(h, emb, train)
                h = block(h.shape[-1], "dec", res, "in1")(h, emb, train)
            else:
                h = block(h.shape[-1], "dec", res, "up", resample_mode="up")(h, emb, train)
            kwargs = settings(cblock[level], "dec", res, attention=res in self.attn_resolutions)
            h, _ = run(h, [(f"dec_{res}x{res}_", i, kwargs, skips.pop())
                           for i in range(self.num_blocks + 1)], (emb,),
                       merge=functools.partial(mp_cat, t=self.concat_balance))
        out = MPConv(x.shape[-1], (3, 3), dtype=self.dtype, name="out_conv")(
            h, _scalar_gain(self, "out_gain"))
        if self.negate_output:
            out = -out
        return out.astype(at_least_f32(self.dtype))


def project_params(params):
    """EDM2's forced weight normalization (EDM2 Eq. 66) as a projection after an optimizer step.

    Re-normalizes every MP weight (param name `MP_WEIGHT`) to unit RMS per output channel
    (`mp_layers.project_weight`, idempotent); every other leaf passes through. Pure and jittable;
    works on plain and on `LogicallyPartitioned` (boxed) trees. The forward never calls it: it
    normalizes its own copy of each weight.
    """

    def project(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if not names or names[-1] != MP_WEIGHT:
            return leaf
        # A scanned run's weights are stacked on a leading axis: each block's own.
        return jax.vmap(project_weight)(leaf) if layer_axis_leaf(path) else project_weight(leaf)

    return jax.tree_util.tree_map_with_path(project, params)


# Constructor kwargs per size. s..xxl are EDM2's img512 (64x64x4 latents) and img64 (64x64x3
# pixels) networks: the same architecture, model_channels 192 / 256 / 320 / 384 / 448.
# 'xs' is a tiny test network for 16x16 inputs.
PRESETS = {
    "xs": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
               channels_per_head=8, noise_channels=16, emb_channels=32),
    "s": dict(model_channels=192),
    "m": dict(model_channels=256),
    "l": dict(model_channels=320),
    "xl": dict(model_channels=384),
    "xxl": dict(model_channels=448),
}

def preset_config(size: str) -> dict:
    """config.model entries of PRESETS[size] (the architecture keys of `from_config`; the
    defaults of `EDM2UNet` fill what the preset leaves out, 0 meaning "EDM2's rule")."""
    preset = PRESETS[size]
    return dict(
        channels=preset["model_channels"],
        channel_mult=tuple(preset.get("channel_mult", EDM2UNet.channel_mult)),
        num_blocks=preset.get("num_blocks", EDM2UNet.num_blocks),
        attn_resolutions=tuple(preset.get("attn_resolutions", EDM2UNet.attn_resolutions)),
        channels_per_head=preset.get("channels_per_head", EDM2UNet.channels_per_head),
        noise_channels=preset.get("noise_channels") or 0,
        emb_channels=preset.get("emb_channels") or 0)


CONFIG_KEYS = ("channels", "channel_mult", "num_blocks", "attn_resolutions", "channels_per_head",
               "num_classes", "guidance_input", "attention_impl", "dropout_max_resolution",
               "noise_channels", "modulation")
NATIVE_KEYS = ("time_transform", "time_embedding", "modulation")   # config keys NATIVE fixes


def native_mismatches(module: "EDM2UNet") -> list[str]:
    """The settings of `module` that differ from `NATIVE`, as 'name=value (EDM2: value)'."""
    return [f"{key}={getattr(module, key)!r} (EDM2: {value!r})" for key, value in NATIVE.items()
            if getattr(module, key) != value]


def _time_settings(model) -> dict:
    """time_transform, time_embedding, modulation and, with edm2_native, the rest of NATIVE."""
    native = model.get("edm2_native", False)
    if not isinstance(native, bool):
        raise ConfigError(f"config.model.edm2_native = {native!r} is invalid: expected True "
                          f"(EDM2's own network, negated: the TrigFlow F of an EDM2 denoiser) "
                          f"or False")
    if native:
        for key in NATIVE_KEYS:
            if key in model and model[key] != NATIVE[key]:
                raise ConfigError(f"config.model.{key} = {model[key]!r} contradicts "
                                  f"config.model.edm2_native = True: expected {NATIVE[key]!r} "
                                  f"(EDM2's own network; {key} may also be left out)")
        return dict(NATIVE)
    settings = dict(time_transform=model.get("time_transform", "identity"),
                    time_embedding=model.get("time_embedding", "positional"),
                    modulation=model.modulation)
    for key, allowed in (("modulation", MODULATIONS), ("time_transform", TIME_TRANSFORMS),
                         ("time_embedding", TIME_EMBEDDINGS)):
        if settings[key] not in allowed:
            raise ConfigError(f"config.model.{key} = {settings[key]!r} is invalid for the edm2 "
                              f"backbone: expected one of {allowed}")
    return settings


def from_config(model, *, dropout: float, dtype) -> EDM2UNet:
    """The EDM2 U-Net that config.model describes.

    Reads: channels (model_channels), channel_mult, num_blocks, attn_resolutions,
    channels_per_head, num_classes, guidance_input, attention_impl, dropout_max_resolution,
    noise_channels (0/None: model_channels * channel_mult[0]), modulation ('adn' | 'edm2') and,
    optionally (absent: the first value): emb_channels (0/None: model_channels *
    max(channel_mult)), time_transform ('identity' | 'edm'), time_embedding ('positional' |
    'mp_fourier'), edm2_native (False | True: every setting of `NATIVE`; time_transform and
    time_embedding then absent or EDM2's, modulation 'edm2'), remat, scan_blocks, and sigma_d,
    which only the objectives set (from config.data.sigma_d; time_transform 'edm' needs it).
    `dropout` and `dtype` come from the caller (each stage sets its own rate).
    """
    check_backbone_config(model, CONFIG_KEYS, MODULATIONS, "edm2")
    if model.dropout_max_resolution < 0:
        raise ConfigError(f"model.dropout_max_resolution must be >= 0 (0: everywhere), got "
                         f"{model.dropout_max_resolution}")
    return EDM2UNet(
        model_channels=model.channels,
        channel_mult=tuple(model.channel_mult),
        num_blocks=model.num_blocks,
        attn_resolutions=tuple(model.attn_resolutions),
        channels_per_head=model.channels_per_head,
        noise_channels=model.noise_channels or None,
        emb_channels=model.get("emb_channels") or None,
        num_classes=model.num_classes,
        guidance_input=model.guidance_input,
        attention_impl=model.attention_impl,
        dropout_max_resolution=model.dropout_max_resolution,
        sigma_d=model.get("sigma_d", None),
        remat=model.get("remat", "none"),
        scan_blocks=bool(model.get("scan_blocks", False)),
        dropout=dropout,
        dtype=dtype,
        **_time_settings(model),
    )
