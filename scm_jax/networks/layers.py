"""Building blocks shared by the backbones: time transform and embedding, ADN, conditioning.

All embedding math runs in float32 whatever the compute dtype: the sCM tangent differentiates
through the time embedding, and its derivative is what sCM Sec. 4.1 stabilizes (Eq. 7).
(float64 stays float64, for the finite-difference tests.)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import ConfigError
from scm_jax.networks.attention import check_attention_impl


class Backbone(nn.Module):
    """The fields every backbone shares (`networks.BACKBONES`); each adds its architecture's.

    F_theta(x_t / sigma_d, c_noise(t), y, guidance): class-conditional on `num_classes` labels
    (index `num_classes` is the null label; 0: unconditional), a guided student's guidance scale
    input (`guidance_input`, sCM Sec. 7), the normalization-modulation (`MODULATIONS` of the
    backbone), the attention implementation ('xla' | 'pallas' | 'auto', `networks.attention`),
    the blocks' rematerialization (`REMAT_MODES`) and the compute dtype.
    """

    num_classes: int = 0
    guidance_input: bool = False
    modulation: str = "adn"
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32

    def check_call(self, modulations, x, t, y, guidance) -> None:
        """The checks of these fields at a call: the modulation among the backbone's
        `modulations`, the attention implementation, and the inputs (`check_inputs`); a
        ValueError names the bad value."""
        if self.modulation not in modulations:
            raise ValueError(f"unknown modulation {self.modulation!r}; "
                             f"expected one of {tuple(modulations)}")
        check_attention_impl(self.attention_impl)
        check_inputs(x, t, y, guidance, num_classes=self.num_classes,
                     guidance_input=self.guidance_input)


def check_inputs(x, t, y, guidance, *, num_classes: int, guidance_input: bool) -> None:
    """The checks every backbone makes of its inputs, x [B, H, W, C], t [B], y [B] int labels
    (class-conditional nets only) and guidance [] or [B] (guided students only); a ValueError
    names the bad input and what was expected."""
    if x.ndim != 4:
        raise ValueError(f"expected x of shape [B, H, W, C], got {x.shape}")
    batch = x.shape[:1]
    if t.shape != batch:
        raise ValueError(f"expected t of shape [B]={batch}, got {t.shape}")
    if num_classes:
        if y is None:
            raise ValueError("this network is class-conditional: pass labels y of shape [B]")
        if y.shape != batch or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"expected int labels y of shape [B]={batch}, got "
                             f"{y.dtype}{list(y.shape)}")
    elif y is not None:
        raise ValueError("labels were given to an unconditional network (model.num_classes=0)")
    if guidance_input:
        if guidance is None:
            raise ValueError("this network takes a guidance scale: pass guidance of shape [B]")
        if jnp.shape(guidance) not in ((), batch):
            raise ValueError(f"expected guidance of shape [B]={batch}, got {jnp.shape(guidance)}")
    elif guidance is not None:
        raise ValueError("a guidance scale was given to a network without a guidance input "
                         "(model.guidance_input=False)")


# Rematerialization of a backbone's blocks (`model.remat`): 'none'; 'block' (jax.checkpoint
# per block, nothing inside saved); or a jax.checkpoint_policies policy naming what is saved.
REMAT_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")
REMAT_MODES = ("none", "block") + REMAT_POLICIES


def remat_block(block_cls, remat: str):
    """block_cls, or it wrapped in `nn.remat` with the policy `remat` names. Blocks are called
    as block(x, emb, train): `train` (argument 3, counting self) is static.

    Only the differentiated pass saves activations for a backward pass, so that is where remat
    changes memory (and time); the tangent pass (a forward-mode JVP) keeps none either way.
    """
    if remat not in REMAT_MODES:
        raise ConfigError(f"model.remat = {remat!r} is invalid: expected one of {REMAT_MODES}")
    if remat == "none":
        return block_cls
    policy = None if remat == "block" else getattr(jax.checkpoint_policies, remat)
    return nn.remat(block_cls, policy=policy, static_argnums=(3,))


# Ordinary (not magnitude-preserving) layers of DDPM++ and DiT: Xavier-uniform weights, zero
# biases, logical axes for the sharding rules.
DENSE_AXES = ("embed_in", "embed_out")
VECTOR_AXES = ("norm",)
XAVIER = nn.initializers.xavier_uniform()
ZEROS = nn.initializers.zeros


def dense(features: int, name: str, dtype, init=XAVIER) -> nn.Dense:
    """nn.Dense with `init` weights [in, features] and zero bias, logically partitioned."""
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(init, DENSE_AXES),
                    bias_init=nn.with_logical_partitioning(ZEROS, VECTOR_AXES))


def guidance_embedding(guidance, noise_channels: int, features: int, name: str, dtype):
    """Dense(pos(s)) [B, features] of the guidance scale s ([] or [B]; sCM Sec. 7), its layer
    zero-initialized so that a guided student initialized from its teacher starts equal to it.
    A constant in the sCM JVP (zero tangent)."""
    return dense(features, name, dtype, init=ZEROS)(positional_embedding(guidance, noise_channels))


def check_backbone_config(model, keys, modulations, backbone: str) -> None:
    """ConfigError unless config.model has every key a backbone's from_config reads and one of
    its modulations."""
    missing = [k for k in keys if k not in model]
    if missing:
        raise ConfigError(f"config.model lacks {missing}, which the {backbone} backbone needs "
                          f"(it reads {list(keys)})")
    if model.modulation not in modulations:
        raise ConfigError(f"config.model.modulation = {model.modulation!r} is invalid for the "
                          f"{backbone} backbone: expected one of {modulations}")


def at_least_f32(dtype):
    """float32 for low-precision dtypes, the dtype itself for float32/float64."""
    return jnp.promote_types(dtype, jnp.float32)


# Positional embedding emb(c) = [cos(c w_k), sin(c w_k)], w_k = (1/max_positions)^(k/(half-1))
# (EDM's PositionalEmbedding with endpoint=True). Fed c_noise(t) = t in radians, this is the
# "s ~ 0.02" embedding of sCM Sec. 4.1: bounded d emb / dt, unlike Fourier scale 16.
def positional_embedding(c: jax.Array, num_channels: int, max_positions: float = 10000.0):
    """c: [B] -> [B, num_channels] float32."""
    if num_channels % 2 or num_channels < 4:
        raise ValueError(f"positional embedding needs an even width >= 4, got {num_channels}")
    half = num_channels // 2
    dtype = at_least_f32(c.dtype)
    freqs = (1.0 / max_positions) ** (jnp.arange(half, dtype=dtype) / (half - 1))
    angles = c.astype(dtype)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


# Random Fourier features emb(c) = [cos(2 pi f_k c), sin(2 pi f_k c)], f_k ~ N(0, scale^2)
# (NCSN++ / EDM's FourierEmbedding, scale 16). The "Fourier scale 16" set-up of sCM Fig. 4,
# whose large, oscillating d emb / dc makes the tangent unstable (Sec. 4.1, Eq. 7); kept for
# ablations (`model.time_embedding='fourier'`), not the paper's choice. The frequencies are
# fixed, not trained: drawn once from numpy's generator with a fixed seed, so every build (and
# every process) has the same ones and the parameter tree is the positional embedding's.
FOURIER_SCALE = 16.0
FOURIER_SEED = 0


def fourier_frequencies(num_channels: int, scale: float = FOURIER_SCALE,
                        seed: int = FOURIER_SEED) -> np.ndarray:
    """The fixed frequencies f_k ~ N(0, scale^2), [num_channels // 2] float64 (numpy)."""
    return np.random.default_rng(seed).standard_normal(num_channels // 2) * scale


def fourier_embedding(c: jax.Array, num_channels: int, scale: float = FOURIER_SCALE,
                      seed: int = FOURIER_SEED):
    """c: [B] -> [B, num_channels] float32 (float64 stays float64)."""
    if num_channels % 2 or num_channels < 4:
        raise ValueError(f"Fourier embedding needs an even width >= 4, got {num_channels}")
    dtype = at_least_f32(c.dtype)
    freqs = jnp.asarray(2 * np.pi * fourier_frequencies(num_channels, scale, seed), dtype)
    angles = c.astype(dtype)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


# `model.time_embedding`: what embeds c_noise(t). 'positional' is the paper's (Sec. 4.1).
TIME_EMBEDDINGS = {"positional": positional_embedding, "fourier": fourier_embedding}

# `model.time_transform`: c_noise(t), the network's time input (sCM Sec. 4.1, Eq. 7).
# 'identity': c_noise(t) = t in radians, the paper's choice: sin(t) d c_noise/dt = sin(t) is
# bounded. 'edm': EDM's c_noise = ln(sigma) / 4 with sigma = sigma_d tan t (Eq. 30), for which
# sin(t) d c_noise/dt = 1 / (4 cos t) blows up as t -> pi/2: the unstable transform of Sec. 4.1
# and Fig. 4, kept for ablations (undefined at t = 0, where ln(0) = -inf).
TIME_TRANSFORMS = ("identity", "edm")


def noise_conditioning(t: jax.Array, transform: str = "identity", sigma_d: float | None = None):
    """c_noise(t): [B] TrigFlow times -> [B] network time inputs, float32 at least.

    transform 'edm' needs the data std `sigma_d` (c_noise = ln(sigma_d tan t) / 4).
    """
    if transform == "identity":
        return t
    if transform == "edm":
        if sigma_d is None:
            raise ValueError("time_transform='edm' needs sigma_d (c_noise = ln(sigma_d tan t) "
                             "/ 4): the objectives fill it from config.data.sigma_d")
        t = t.astype(at_least_f32(t.dtype))
        return jnp.log(sigma_d * jnp.tan(t)) / 4
    raise ValueError(f"unknown time transform {transform!r}; expected one of {TIME_TRANSFORMS}")


# pnorm(a) = a / sqrt(mean_c a^2 + eps): pixel normalization over channels (Karras et al. 2017),
# applied to the per-sample scale and shift of ADN (sCM Sec. 4.1).
def pixel_norm(a: jax.Array, eps: float = 1e-8) -> jax.Array:
    a32 = a.astype(at_least_f32(a.dtype))
    return (a32 * jax.lax.rsqrt(jnp.mean(a32**2, axis=-1, keepdims=True) + eps)).astype(a.dtype)


# ADN (sCM Sec. 4.1): y = norm(h) * pnorm(s(emb)) + pnorm(b(emb)), the paper's formula taken
# literally (no "+1" on the scale). The one copy every U-Net block uses.
def adaptive_double_norm(h_normed: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """h_normed [B, ..., C] (already normalized), scale and shift [B, C] -> [B, ..., C]."""
    expand = (slice(None),) + (None,) * (h_normed.ndim - 2) + (slice(None),)
    return (h_normed * pixel_norm(scale)[expand].astype(h_normed.dtype)
            + pixel_norm(shift)[expand].astype(h_normed.dtype))


# AdaGN of ADM / EDM: y = norm(h) * (1 + s(emb)) + b(emb), with no pixel norm of s and b. The
# modulation that made CM training diverge (Song & Dhariwal 2023; sCM Sec. 4.1), kept for
# ablations (`model.modulation='adagn'`); ADN is the paper's choice.
def adaptive_group_norm(h_normed: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """h_normed [B, ..., C] (already normalized), scale and shift [B, C] -> [B, ..., C]."""
    expand = (slice(None),) + (None,) * (h_normed.ndim - 2) + (slice(None),)
    return (h_normed * (1 + scale)[expand].astype(h_normed.dtype)
            + shift[expand].astype(h_normed.dtype))


# `model.modulation` of the U-Net: how a block's embedding modulates its normalized features.
MODULATIONS = {"adn": adaptive_double_norm, "adagn": adaptive_group_norm}


class AdaptiveDoubleNorm(nn.Module):
    """ADN with a GroupNorm without affine parameters; s and b come from one Dense of width 2C
    on the embedding. h: [B, H, W, C]; emb: [B, E] -> [B, H, W, C].

    modulation='adagn' applies AdaGN's h * (1 + s) + b to the same s and b instead (same
    parameters, same names: only what they mean changes).
    """

    groups: int = 8
    dtype: jnp.dtype = jnp.float32
    modulation: str = "adn"

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        if self.modulation not in MODULATIONS:
            raise ValueError(f"unknown modulation {self.modulation!r}; expected one of "
                             f"{tuple(MODULATIONS)}")
        channels = h.shape[-1]
        h = nn.GroupNorm(num_groups=min(self.groups, channels), use_bias=False, use_scale=False,
                         dtype=self.dtype, name="norm")(h)
        scale_shift = nn.Dense(2 * channels, dtype=at_least_f32(self.dtype), name="affine")(emb)
        return MODULATIONS[self.modulation](h, *jnp.split(scale_shift, 2, axis=-1))


class ConditioningEmbedding(nn.Module):
    """Embedding of time, class label and (optionally) guidance scale: [B] inputs -> [B, E].

    emb = MLP(pos(t)) + Embed(y) + Dense(pos(s)). Class index `num_classes` is the null label
    used for classifier-free guidance dropout. The guidance scale enters through its own
    positional embedding and a linear layer, added to the time embedding (sCM Sec. 7); it is a
    constant in the sCM JVP (zero tangent). The backbone checks the inputs (`check_inputs`).

    `t` here is the network's time input c_noise(t) (`noise_conditioning`); `time_embedding`
    ('positional' | 'fourier', `TIME_EMBEDDINGS`) embeds it. The guidance scale always uses the
    positional embedding.
    """

    emb_channels: int
    noise_channels: int
    num_classes: int = 0
    guidance_input: bool = False
    time_embedding: str = "positional"

    @nn.compact
    def __call__(self, t, y=None, guidance=None):
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"unknown time embedding {self.time_embedding!r}; expected one of "
                             f"{tuple(TIME_EMBEDDINGS)}")
        emb = TIME_EMBEDDINGS[self.time_embedding](t, self.noise_channels)
        emb = nn.Dense(self.emb_channels, name="time_dense0")(emb)
        emb = nn.Dense(self.emb_channels, name="time_dense1")(nn.silu(emb))
        if self.num_classes:
            emb = emb + nn.Embed(self.num_classes + 1, self.emb_channels, name="class_embed")(y)
        if self.guidance_input:
            g = positional_embedding(jnp.broadcast_to(guidance, t.shape), self.noise_channels)
            # Zero-initialized so a student initialized from an unguided teacher starts identical to it.
            emb = emb + nn.Dense(self.emb_channels, kernel_init=nn.initializers.zeros,
                                 name="guidance_dense")(g)
        return nn.silu(emb)


class AdaptiveWeight(nn.Module):
    """The learned loss weighting w_phi(t) of EDM2 / sCM Eq. 8: [B] times -> [B] log-weights.

    A positional embedding of t and one zero-initialized linear layer, so training starts from
    w = 0 (uniform weighting). Sign convention w_phi = -logvar of EDM2 (App. D). Trained
    freshly in every stage; the tangent never passes through it.
    """

    channels: int = 128

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        feats = positional_embedding(t, self.channels)
        return nn.Dense(1, kernel_init=nn.initializers.zeros, name="linear")(feats)[:, 0]
