"""The Stable Diffusion VAE (`stabilityai/sd-vae-ft-mse`, diffusers `AutoencoderKL`) in NHWC.

sCM encodes ImageNet 512x512 images in [-1, 1] into 4x64x64 latents with this VAE (sCM App. G).
The module tree mirrors diffusers' so that weight names map one to one
(`encoder.down_blocks.0.resnets.1.conv2.weight` <-> encoder/down_blocks_0/resnets_1/conv2/kernel):

  encoder: conv_in -> down_blocks_i (layers_per_block ResnetBlocks, a stride-2 conv but last)
           -> mid_block (ResnetBlock, self-attention, ResnetBlock) -> GroupNorm, SiLU, conv_out
  quant_conv (1x1): 2 * latent_channels moments = (mean, logvar)
  post_quant_conv (1x1) -> decoder: conv_in -> mid_block -> up_blocks_i (layers_per_block + 1
           ResnetBlocks, nearest 2x upsample + conv but last) -> GroupNorm, SiLU, conv_out

All GroupNorms: `norm_num_groups` groups, eps 1e-6. The VAE is frozen: no dropout, no training.
`load_vae_params` reads the published `diffusion_pytorch_model.safetensors`, both of diffusers'
attention key styles (old `query/key/value/proj_attn`, new `to_q/to_k/to_v/to_out.0`).
"""
import os
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.networks.attention import dot_product_attention

VAE_REPO = "stabilityai/sd-vae-ft-mse"
VAE_FILE = "diffusion_pytorch_model.safetensors"
# AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse").num_parameters() in diffusers.
SD_VAE_NUM_PARAMS = 83_653_863
# diffusers clamps the posterior log-variance to this range (DiagonalGaussianDistribution).
LOGVAR_RANGE = (-30.0, 20.0)


def _group_norm(groups, dtype, name):
    # use_fast_variance=False: E[(x - mean)^2], as PyTorch computes it, not E[x^2] - mean^2.
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                        name=name)


class ResnetBlock(nn.Module):
    """x -> shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))). [B, H, W, Cin] -> Cout."""

    out_channels: int
    groups: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """Single-head residual self-attention over positions: x + to_out(attn(norm(x))). [B, H, W, C]."""

    groups: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, h * w, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        y = dot_product_attention(q, k, v).reshape(b, h * w, c)   # softmax in float32
        y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(y)
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """ResnetBlock -> Attention -> ResnetBlock at the lowest resolution. [B, h, w, C]."""

    groups: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
        x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with one zero row/column padded at the bottom/right only (diffusers
    Downsample2D with padding=0). [B, H, W, C] -> [B, H/2, W/2, C]."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(x.shape[-1], (3, 3), strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                       name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv. [B, H, W, C] -> [B, 2H, 2W, C]."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(x.shape[-1], (3, 3), padding=1, dtype=self.dtype, name="conv")(x)


class Stage(nn.Module):
    """One resolution of the encoder (DownEncoderBlock2D) or decoder (UpDecoderBlock2D)."""

    out_channels: int
    num_layers: int
    resample: str   # 'down' | 'up' | 'none'
    groups: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """images [B, H, W, 3] -> moments [B, H/f, W/f, 2 * latent_channels], f = 2^(levels - 1)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        chans = self.block_out_channels
        x = nn.Conv(chans[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
        for i, c in enumerate(chans):
            resample = "down" if i < len(chans) - 1 else "none"
            x = Stage(c, self.layers_per_block, resample, self.groups, self.dtype,
                      name=f"down_blocks_{i}")(x)
        x = MidBlock(self.groups, self.dtype, name="mid_block")(x)
        x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
        return nn.Conv(2 * self.latent_channels, (3, 3), padding=1, dtype=self.dtype,
                       name="conv_out")(x)


class Decoder(nn.Module):
    """latents [B, h, w, latent_channels] -> images [B, f h, f w, 3]."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    out_channels: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        chans = tuple(reversed(self.block_out_channels))
        x = nn.Conv(chans[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(self.groups, self.dtype, name="mid_block")(x)
        for i, c in enumerate(chans):
            resample = "up" if i < len(chans) - 1 else "none"
            x = Stage(c, self.layers_per_block + 1, resample, self.groups, self.dtype,
                      name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
        return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. Defaults are sd-vae-ft-mse's (8x downsampling, 4 latent channels).

    `encode(images [B, H, W, 3] in [-1, 1]) -> (mean, std)`, each [B, H/8, W/8, 4]: the diagonal
    Gaussian posterior. `decode(latents [B, h, w, 4]) -> images [B, 8h, 8w, 3]` (unclipped).
    Raw latents: the paper's normalization lives in `scm_jax.data.latents`.
    """

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {tuple(self.block_out_channels)} must be "
                                 f"multiples of norm_num_groups={self.norm_num_groups}")
        args = (self.block_out_channels, self.layers_per_block)
        self.encoder = Encoder(*args, self.latent_channels, self.norm_num_groups, self.dtype)
        self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
        self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)
        self.decoder = Decoder(*args, self.norm_num_groups, dtype=self.dtype)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, images):
        """images: [B, H, W, 3] in [-1, 1] -> (mean, std), each [B, H/f, W/f, latent_channels]."""
        f = self.downsampling
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"expected images [B, H, W, 3] with H, W multiples of {f}, "
                             f"got {images.shape}")
        moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, latents):
        """latents: [B, h, w, latent_channels] -> images [B, f h, f w, 3] float32."""
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"expected latents [B, h, w, {self.latent_channels}], "
                             f"got {latents.shape}")
        z = self.post_quant_conv(latents.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images):
        """decode(posterior mean): the deterministic reconstruction (also what `init` traces)."""
        return self.decode(self.encode(images)[0])


# ---------------------------------------------------------------------------------------------
# Weights: Flax tree <-> diffusers state dict.
# Conv kernels: Flax HWIO <-> PyTorch OIHW; Dense kernels: [in, out] <-> Linear weight [out, in];
# GroupNorm scale <-> weight. Module names map by `name_3` <-> `name.3`.
# ---------------------------------------------------------------------------------------------

_OLD_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NEW_TO_OLD = {v: k for k, v in _OLD_TO_NEW.items()}
_OLD_ATTENTION_KEY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_NEW_ATTENTION_KEY = re.compile(r"(\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.")


def _torch_key(path) -> str:
    *modules, leaf = (p.key for p in path)
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(modules + [{"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]])


def _to_torch_layout(x):
    """Flax leaf -> PyTorch layout (traceable, so `jax.eval_shape` gives the saved shapes)."""
    if x.ndim == 4:
        return jnp.transpose(x, (3, 2, 0, 1))   # HWIO -> OIHW
    return x.T if x.ndim == 2 else x


def _from_torch_layout(x: np.ndarray, ndim: int) -> np.ndarray:
    if ndim == 4:
        return np.transpose(x, (2, 3, 1, 0))   # OIHW -> HWIO
    return x.T if ndim == 2 else x


def diffusers_state_dict(params, *, attention_keys: str = "new") -> dict:
    """Flax params -> {diffusers key: array in PyTorch layout}.

    attention_keys: 'new' (to_q/to_k/to_v/to_out.0) or 'old' (query/key/value/proj_attn).
    """
    if attention_keys not in ("new", "old"):
        raise ValueError(f"attention_keys must be 'new' or 'old', got {attention_keys!r}")
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = _torch_key(path)
        if attention_keys == "old":
            key = _NEW_ATTENTION_KEY.sub(lambda m: m.group(1) + _NEW_TO_OLD[m.group(2)] + ".", key)
        out[key] = _to_torch_layout(leaf)
    return out


def vae_param_shapes(vae: AutoencoderKL | None = None):
    """The Flax parameter tree of `vae` as ShapeDtypeStructs (no memory, no compute)."""
    vae = vae or AutoencoderKL()
    f = vae.downsampling
    x = jax.ShapeDtypeStruct((1, f, f, 3), jnp.float32)
    return jax.eval_shape(vae.init, jax.random.PRNGKey(0), x)["params"]


def _torch_shape(shape) -> tuple:
    if len(shape) == 4:
        return tuple(shape[i] for i in (3, 2, 0, 1))
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def expected_diffusers_shapes(vae: AutoencoderKL | None = None) -> dict:
    """{diffusers key (new attention style): PyTorch shape} that `load_vae_params` expects."""
    flat = jax.tree_util.tree_flatten_with_path(vae_param_shapes(vae))[0]
    return {_torch_key(path): _torch_shape(leaf.shape) for path, leaf in flat}


def params_from_diffusers(state: dict, vae: AutoencoderKL | None = None, *, source: str = "<dict>"):
    """{diffusers key: PyTorch-layout array} -> Flax params (numpy float32) for `vae`.

    Raises ValueError naming the first offending keys if keys are missing or unexpected or
    shapes differ. Old-style attention keys are renamed; [C, C, 1, 1] attention weights (from
    LDM-converted files) are accepted for Linear [C, C].
    """
    state = {_OLD_ATTENTION_KEY.sub(lambda m: m.group(1) + _OLD_TO_NEW[m.group(2)] + ".", k): v
             for k, v in state.items()}
    flat, treedef = jax.tree_util.tree_flatten_with_path(vae_param_shapes(vae))
    expected = {_torch_key(path): _torch_shape(leaf.shape) for path, leaf in flat}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong, leaves = [], []
    for key, shape in expected.items():
        if key not in state:
            continue
        value = np.asarray(state[key])
        if len(shape) == 2 and value.shape == shape + (1, 1):
            value = value[:, :, 0, 0]
        if value.shape != shape:
            wrong.append(f"{key}: got {value.shape}, expected {shape}")
            continue
        leaves.append(_from_torch_layout(value.astype(np.float32), len(shape)))
    problems = [f"{len(items)} {what} (first: {items[:4]})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong)) if items]
    if problems:
        chans = tuple((vae or AutoencoderKL()).block_out_channels)
        raise ValueError(f"{source} is not a diffusers AutoencoderKL state dict for "
                         f"block_out_channels={chans}: " + "; ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_vae_params(path: str, vae: AutoencoderKL | None = None):
    """Reads sd-vae-ft-mse's `diffusion_pytorch_model.safetensors` (or a directory holding it)
    into Flax params (nested dict of numpy float32) for `vae` (default: the full SD VAE)."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, VAE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VAE weights not found at {path!r}. Nothing is downloaded automatically: download "
            f"{VAE_FILE} from the Hugging Face repository {VAE_REPO} "
            f"(https://huggingface.co/{VAE_REPO}/blob/main/{VAE_FILE}) and pass its path.")
    return params_from_diffusers(load_file(path), vae, source=path)


def save_vae_params_diffusers(params, path: str, *, attention_keys: str = "new") -> None:
    """Writes Flax VAE params as a diffusers-layout safetensors file (inverse of load_vae_params)."""
    from safetensors.numpy import save_file

    state = {k: np.ascontiguousarray(np.asarray(v, np.float32))
             for k, v in diffusers_state_dict(params, attention_keys=attention_keys).items()}
    save_file(state, os.fspath(path))
