"""The FD-DINOv2 network: DINOv2 ViT-L/14 (Oquab et al. 2023), without registers, in Flax.

FD-DINOv2 (Stein et al. 2023; EDM2, Karras et al. 2024; sCM) is the Frechet distance between
Gaussians fitted to this network's class-token features. The Flax tree mirrors the torch-hub
`dinov2_vitl14` state dict (`blocks.3.attn.qkv.weight` <-> blocks_3/attn/qkv/kernel):

  patch_embed: conv 14x14 stride 14 (bias)             [B, 224, 224, 3] -> [B, 16 * 16, D]
  [cls_token; patches] + pos_embed                     -> [B, 1 + 256, D]
  depth x pre-norm block: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))
      attn: qkv with bias, 64-channel heads; mlp: fc1 -> exact (erf) GELU -> fc2
  norm (LayerNorm, eps 1e-6 as every norm); the feature is token 0       -> [B, D]

The hub model was trained at 518x518 (37x37 patches) and resizes its position table to the
input's grid on every call; here that is done once, in float64, when the weights are converted
(`interpolate_pos_embed`), so converted params are for one input size (224).

Inputs as EDM2's FD-DINOv2 prepares them (`preprocess`): 8-bit pixels, an antialiased bicubic
resize to 224x224 (torch F.interpolate(mode='bicubic', antialias=True)), / 255, then the
ImageNet mean and std. Nothing is downloaded: `load_params` reads the file the user gives.
"""
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scm_jax.evaluation import pixels, weights

FEATURE_DIM = 1024
INPUT_SIZE = 224
PATCH = 14
WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + WEIGHTS_FILE
PRESETS = {
    "vitl14": dict(dim=1024, depth=24, heads=16, mlp_ratio=4),
    "tiny": dict(dim=64, depth=2, heads=4, mlp_ratio=4),   # tests and benchmarks only
}
FORMAT = "scm_jax.dinov2.v1"
FORMAT_KEY = "__format__"
PRESET_KEY = "__preset__"   # int64 [4]: dim, depth, heads, mlp_ratio
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The hub model's `interpolate_offset`: it resizes its position table by the scale factor
# (grid + 0.1) / 37 (a kludge kept for backward compatibility), and that factor, not the output
# size, sets the source coordinates.
POS_OFFSET = 0.1
HIGHEST = jax.lax.Precision.HIGHEST

_WHAT = f"the DINOv2 ViT-L/14 weights ({WEIGHTS_FILE})"
_SOURCE = (f"download them from {WEIGHTS_URL} (or facebook/dinov2-large's model.safetensors) "
           "and pass the file's path")


# ---------------------------------------------------------------------------------------------
# Network. LayerNorms, softmax and the residual stream run in float32 (float64 in x64 references)
# whatever the matmul dtype. Matmuls use HIGHEST precision: XLA's default for float32 on TPU (one
# bfloat16 pass) and GPU (TF32) is not float32, and the reference runs float32 matmuls.
# ---------------------------------------------------------------------------------------------


def _f32(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _layer_norm(name):
    # use_fast_variance=False: E[(x - mean)^2], as PyTorch computes it.
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, param_dtype=jnp.float32, name=name)


def _dense(features, name, dtype):
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, precision=HIGHEST, name=name)


class Attention(nn.Module):
    """Self-attention, qkv with bias, channels ordered (q/k/v, head, c) as the hub model reads
    them. x [B, N, D] -> [B, N, D] in `dtype`."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        qkv = _dense(3 * d, "qkv", self.dtype)(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]             # [B, N, H, hd]
        logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision=HIGHEST,
                            preferred_element_type=_f32(self.dtype)) * hd ** -0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhnm,bmhd->bnhd", probs, v, precision=HIGHEST)
        return _dense(d, "proj", self.dtype)(out.reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2. x [B, N, D] -> [B, N, D] in `dtype`."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(_dense(self.hidden, "fc1", self.dtype)(x), approximate=False)
        return _dense(x.shape[-1], "fc2", self.dtype)(h)


class LayerScale(nn.Module):
    """x * gamma, gamma [D] (Touvron et al. 2021). [..., D] -> same, in float32 at least."""

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return x.astype(_f32(x.dtype)) * gamma


class Block(nn.Module):
    """x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)). x [B, N, D] -> same, float32."""

    heads: int
    mlp_ratio: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(_f32(x.dtype))
        h = Attention(self.heads, self.dtype, name="attn")(_layer_norm("norm1")(x))
        x = x + LayerScale(name="ls1")(h)
        h = Mlp(x.shape[-1] * self.mlp_ratio, self.dtype, name="mlp")(_layer_norm("norm2")(x))
        return x + LayerScale(name="ls2")(h)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p conv with bias. [B, H, W, 3] -> [B, (H/p)(W/p), D], row-major."""

    dim: int
    patch: int = PATCH
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch
        y = nn.Conv(self.dim, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, precision=HIGHEST, name="proj")(x)
        return y.reshape(y.shape[0], -1, self.dim)


class DINOv2(nn.Module):
    """DINOv2 ViT without registers (Oquab et al. 2023); PRESETS['vitl14'] is FD-DINOv2's.

    x [B, S, S, 3] ImageNet-normalized float (S = INPUT_SIZE for converted weights) -> the class
    token after the final LayerNorm, [B, dim] float32 (the hub model's `x_norm_clstoken`).
    dtype: of the matmuls (float32 or bfloat16).
    """

    dim: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    patch: int = PATCH
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2] or x.shape[1] % self.patch:
            raise ValueError(f"expected images [B, S, S, 3] with S a multiple of {self.patch}, "
                             f"got shape {x.shape}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not a multiple of heads={self.heads}")
        # Flax rejects a pos_embed of another shape (weights converted for another size).
        tokens = 1 + (x.shape[1] // self.patch) ** 2
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.dim), jnp.float32)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, tokens, self.dim),
                         jnp.float32)
        h = PatchEmbed(self.dim, self.patch, self.dtype, name="patch_embed")(x.astype(self.dtype))
        h = h.astype(_f32(h.dtype))
        h = jnp.concatenate([jnp.broadcast_to(cls.astype(h.dtype), (x.shape[0], 1, self.dim)), h],
                            axis=1) + pos
        for i in range(self.depth):
            h = Block(self.heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(h)
        return _layer_norm("norm")(h[:, 0])


# ---------------------------------------------------------------------------------------------
# Inputs, and the position table (resized once, at conversion, as the hub does on every call).
# ---------------------------------------------------------------------------------------------


def preprocess(images, size: int = INPUT_SIZE):
    """images [B, H, W, 3], uint8 0..255 or float in [-1, 1] -> [B, size, size, 3] float32, as
    EDM2's FD-DINOv2 (Karras et al. 2024) feeds the network: floats quantized
    (`pixels.quantize`), the antialiased bicubic resize (`pixels.resize_antialiased`, no clipping after it), / 255, then
    (x - ImageNet mean) / ImageNet std."""
    x = pixels.resize_antialiased(pixels.pixel_levels(images), size) / 255.0
    return (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def feature_fn(params, preset, dtype=jnp.float32):
    """images [B, H, W, 3] (uint8 or float in [-1, 1]) -> features [B, dim] float32: preprocess
    to the size the position table was converted for, then the network, with params bound. Pure
    and jittable. Jitting the returned function as is bakes the weights (1.2 GB for ViT-L/14)
    into the program as constants; `jax.jit(lambda p, x: feature_fn(p, preset)(x))` keeps them
    an argument."""
    model = DINOv2(**_preset_fields(preset), dtype=dtype)
    size = _input_size(params["pos_embed"].shape)
    return lambda images: model.apply({"params": params}, preprocess(images, size))


def pos_interpolation_matrix(grid_in: int, grid_out: int) -> np.ndarray:
    """[grid_out, grid_in] float64 weights of torch's F.interpolate(mode='bicubic',
    antialias=False, align_corners=False, scale_factor=s), s = (grid_out + 0.1) / grid_in, along
    one axis: output i reads u = (i + 0.5) / s - 0.5 by Keys' cubic with a = -0.75 on the taps
    floor(u) - 1 .. floor(u) + 2 clamped to [0, grid_in - 1]; its size floor(grid_in s) = grid_out.
    """
    s = (grid_out + POS_OFFSET) / grid_in
    if math.floor(grid_in * s) != grid_out:
        raise ValueError(f"scale factor {s} maps {grid_in} positions to "
                         f"{math.floor(grid_in * s)}, not {grid_out}")
    out = np.zeros((grid_out, grid_in))
    for i in range(grid_out):
        u = (i + 0.5) / s - 0.5
        lo = min(math.floor(u), grid_in - 1)
        t = min(max(u - lo, 0.0), 1.0)
        for k in range(-1, 3):
            out[i, min(max(lo + k, 0), grid_in - 1)] += pixels.cubic(t - k, -0.75)
    return out


def interpolate_pos_embed(pos, grid: int) -> np.ndarray:
    """pos [1, 1 + M*M, D] -> [1, 1 + grid*grid, D] float32, as the hub's interpolate_pos_encoding
    for a grid x grid input: the class-token row kept, the M x M patch table (row-major) resized
    by `pos_interpolation_matrix` along both axes in float64; unchanged if M == grid (the hub
    skips the resize then too)."""
    pos = np.asarray(pos, np.float64)
    m = math.isqrt(pos.shape[1] - 1)
    if m != grid:
        w = pos_interpolation_matrix(m, grid)
        table = np.einsum("ih,hwd,jw->ijd", w, pos[0, 1:].reshape(m, m, -1), w)
        pos = np.concatenate([pos[:, :1], table.reshape(1, grid * grid, -1)], axis=1)
    return pos.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Weights: torch-hub or transformers state dict -> flat '/'-joined params <-> Flax tree.
# Linear weights [out, in] -> kernels [in, out]; conv [out, in, kh, kw] -> [kh, kw, in, out].
# ---------------------------------------------------------------------------------------------

# hub key -> transformers key (`facebook/dinov2-large`), applied in order; '{}' marks qkv, which
# transformers splits row-wise into query / key / value.
_HF_RULES = [(r"^blocks\.(\d+)\.", r"encoder.layer.\1."), (r"^norm\.", "layernorm."),
             (r"^(cls|mask)_token$", r"embeddings.\1_token"),
             (r"^pos_embed$", "embeddings.position_embeddings"),
             (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
             (r"\.attn\.qkv\.", ".attention.attention.{}."),
             (r"\.attn\.proj\.", ".attention.output.dense."),
             (r"\.ls(\d)\.gamma$", r".layer_scale\1.lambda1")]
_QKV = ("query", "key", "value")
_MASK = {"hub": "mask_token", "hf": "embeddings.mask_token"}   # pretraining only: dropped
# transformers >= 5 renames q/k/v/o in memory (`attention.q_proj`); its files keep these names.
_HF5 = re.compile(r"\.attention\.([qkvo])_proj\.")
_HF5_NAMES = {"q": ".attention.attention.query.", "k": ".attention.attention.key.",
              "v": ".attention.attention.value.", "o": ".attention.output.dense."}


def _preset_fields(preset) -> dict:
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    return {k: int(preset[k]) for k in ("dim", "depth", "heads", "mlp_ratio")}


def _input_size(pos_shape) -> int:
    return math.isqrt(pos_shape[1] - 1) * PATCH


@functools.lru_cache(maxsize=8)
def param_shapes(dim: int, depth: int, heads: int, mlp_ratio: int, size: int = INPUT_SIZE):
    """{'blocks_0/attn/qkv/kernel': shape, ...} of DINOv2 for size x size inputs (abstract)."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tree = jax.eval_shape(DINOv2(dim, depth, heads, mlp_ratio).init, jax.random.PRNGKey(0), x)
    flat = traverse_util.flatten_dict(tree["params"], sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def _key_table(preset) -> list:
    """[(our flat key, hub key, transformers key or its q/k/v template)], mask_token excluded."""
    rows = []
    for ours in param_shapes(**_preset_fields(preset)):
        *modules, leaf = ours.split("/")
        hub = ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in modules]
                       + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
        hf = functools.reduce(lambda k, rule: re.sub(*rule, k), _HF_RULES, hub)
        rows.append((ours, hub, hf))
    return rows


def state_dict_shapes(preset="vitl14", grid: int = 37, naming: str = "hub") -> dict:
    """{key: shape} of the published state dict of `preset` (a PRESETS name or dict) with a
    grid x grid position table (37: trained at 518x518), mask_token included; naming 'hub'
    (torch hub, `dinov2_vitl14_pretrain.pth`) or 'hf' (transformers, `facebook/dinov2-large`)."""
    if naming not in _MASK:
        raise ValueError(f"naming must be 'hub' or 'hf', got {naming!r}")
    p = _preset_fields(preset)
    ours = dict(param_shapes(**p), pos_embed=(1, 1 + grid * grid, p["dim"]))
    out = {_MASK[naming]: (1, p["dim"])}
    for o, hub, hf in _key_table(p):
        shape = ours[o]
        if o.endswith("kernel"):   # Linear [out, in], conv [out, in, kh, kw]
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        if naming == "hub":
            out[hub] = shape
        else:
            out.update({hf.format(n): (shape[0] // 3,) + shape[1:] for n in _QKV} if "{}" in hf
                       else {hf: shape})
    return out


def _check_keys(state: dict, expected: dict, source: str, optional=()):
    """ValueError naming every missing, unexpected or wrong-shaped key (first five of each)."""
    problems = {
        "missing keys": [f"{k} (expected shape {s})" for k, s in expected.items()
                         if k not in state and k not in optional],
        "unexpected keys": [f"{k} {np.shape(v)}" for k, v in state.items() if k not in expected],
        "wrong shapes": [f"{k}: got {np.shape(state[k])}, expected {s}"
                         for k, s in expected.items() if k in state and np.shape(state[k]) != s]}
    text = [f"{len(v)} {what}: {'; '.join(v[:5])}" + (" ..." if len(v) > 5 else "")
            for what, v in problems.items() if v]
    if text:
        raise ValueError(f"{source} is not a DINOv2 state dict: " + " | ".join(text))


def _infer_preset(state: dict, naming: str, heads, source: str):
    """(preset, grid) from the shapes: dim from cls_token, depth from the block indices, the MLP
    ratio from fc1, heads = dim // 64 (every DINOv2 ViT has 64-channel heads) unless the shapes
    are a PRESETS entry's (then its heads) or `heads` is given; grid from the position table.
    Shapes that fit nothing are left for `_check_keys` to report."""
    hf = naming == "hf"
    keys = (("embeddings.cls_token", "embeddings.position_embeddings",
             "encoder.layer.0.mlp.fc1.weight") if hf else
            ("cls_token", "pos_embed", "blocks.0.mlp.fc1.weight"))
    cls, pos, fc1 = (state.get(k) for k in keys)
    if cls.ndim != 3 or cls.shape[:2] != (1, 1):
        raise ValueError(f"{source}: {keys[0]} has shape {cls.shape}, expected (1, 1, D)")
    dim = cls.shape[-1]
    ratio = max(fc1.shape[0] // dim, 1) if fc1 is not None and fc1.ndim == 2 else 4
    ok = pos is not None and pos.ndim == 3 and pos.shape[1] > 1
    grid = math.isqrt(pos.shape[1] - 1) if ok else 37
    blocks = r"encoder\.layer\.(\d+)\." if hf else r"blocks\.(\d+)\."
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(blocks, k))), default=0)
    preset = dict(dim=dim, depth=depth, heads=heads, mlp_ratio=ratio)
    if heads is None:
        same = [p["heads"] for p in PRESETS.values()
                if (p["dim"], p["depth"], p["mlp_ratio"]) == (dim, depth, ratio)]
        preset["heads"] = same[0] if same else max(dim // 64, 1)
    if dim % preset["heads"]:
        raise ValueError(f"{source}: dim={dim} cannot be split into {preset['heads']} heads; "
                         f"pass heads=")
    return preset, grid


def convert_state_dict(state: dict, *, size: int = INPUT_SIZE, heads: int | None = None,
                       source: str = "the state dict") -> dict:
    """A torch-hub (`cls_token`, `blocks.N.attn.qkv.weight`, ...) or transformers
    (`embeddings.cls_token`, `encoder.layer.N.attention.attention.query.weight`, ...; also the
    in-memory `attention.q_proj` names of transformers >= 5) state dict -> flat params
    {'blocks_0/attn/qkv/kernel': [D, 3D] float32, ...} for size x size inputs, with the markers
    '__format__' = 'scm_jax.dinov2.v1' and '__preset__' = [dim, depth, heads, mlp_ratio].

    The preset comes from the shapes (`_infer_preset`); the position table is resized to the
    size / 14 grid (`interpolate_pos_embed`); mask_token is dropped. A missing, unexpected or
    wrong-shaped key is a ValueError naming the key, its shape and the expected shape.
    """
    if size % PATCH:
        raise ValueError(f"size must be a multiple of the patch size {PATCH}, got {size}")
    state = {k: np.asarray(v) for k, v in state.items()}
    if "cls_token" in state:
        naming = "hub"
    elif "embeddings.cls_token" in state:
        naming = "hf"
        state = {_HF5.sub(lambda m: _HF5_NAMES[m.group(1)], k): v for k, v in state.items()}
    else:
        raise ValueError(f"{source} has neither cls_token (torch hub) nor embeddings.cls_token "
                         f"(transformers); first keys: {sorted(state)[:5]}")
    preset, grid = _infer_preset(state, naming, heads, source)
    _check_keys(state, state_dict_shapes(preset, grid, naming), source, [_MASK[naming]])
    flat = {}
    for ours, hub, hf in _key_table(preset):
        if naming == "hub":
            value = state[hub]
        else:
            value = (np.concatenate([state[hf.format(n)] for n in _QKV]) if "{}" in hf
                     else state[hf])
        if ours == "pos_embed":
            value = interpolate_pos_embed(value, size // PATCH)
        elif value.ndim == 4:
            value = np.transpose(value, (2, 3, 1, 0))
        elif value.ndim == 2:
            value = value.T
        flat[ours] = np.ascontiguousarray(value, np.float32)
    return flat_from_params(traverse_util.unflatten_dict(flat, sep="/"), preset)


def params_from_flat(flat: dict, *, source: str = "the flat params"):
    """Flat params with markers (as `convert_state_dict` returns, or a converted .npz holds) ->
    (Flax params tree of numpy float32, preset dict), checking the format and every key and
    shape against the preset (the input size is read off the position table)."""
    flat = dict(flat)
    marker = str(np.asarray(flat.pop(FORMAT_KEY, "<none>")))
    if marker != FORMAT:
        raise ValueError(f"{source} has format {marker!r}, expected {FORMAT!r}")
    values = flat.pop(PRESET_KEY, None)
    if np.shape(values) != (4,):
        raise ValueError(f"{source}: {PRESET_KEY} must be [dim, depth, heads, mlp_ratio], got "
                         f"{values!r}")
    preset = dict(zip(("dim", "depth", "heads", "mlp_ratio"), (int(v) for v in values)))
    pos = np.shape(flat.get("pos_embed"))
    size = _input_size(pos) if len(pos) == 3 and pos[1] > 1 else INPUT_SIZE
    expected = param_shapes(**preset, size=size)
    _check_keys(flat, expected, source)
    tree = {k: np.asarray(flat[k], np.float32) for k in expected}
    return traverse_util.unflatten_dict(tree, sep="/"), preset


def flat_from_params(params, preset) -> dict:
    """(Flax params tree, preset) -> flat numpy params with the markers: what
    `convert_state_dict` returns and a converted .npz holds."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    flat[FORMAT_KEY] = np.array(FORMAT)
    flat[PRESET_KEY] = np.array(list(_preset_fields(preset).values()), np.int64)
    return flat


def load_params(path, *, size: int = INPUT_SIZE):
    """(params, preset) from a converted .npz (it has '__format__') or from a raw torch-hub or
    transformers state dict in any format `weights.load_state_dict` reads (.pth, .safetensors,
    .npz; converted on the fly for size x size inputs). MissingInputError naming the path and
    WEIGHTS_URL if the file is absent."""
    state = weights.load_state_dict(path, what=_WHAT, source=_SOURCE)
    source = repr(str(path))
    if FORMAT_KEY not in state:
        state = convert_state_dict(state, size=size, source=source)
    params, preset = params_from_flat(state, source=source)
    if _input_size(params["pos_embed"].shape) != size:
        raise ValueError(f"{source} was converted for {_input_size(params['pos_embed'].shape)}px "
                         f"inputs, not {size}px: convert the original state dict with size={size}")
    return params, preset


def random_state_dict(preset="tiny", seed: int = 0, grid: int = 37, naming: str = "hub") -> dict:
    """A state dict with the real keys and shapes of `preset` (grid x grid position table) and
    random float32 values, for tests and benchmarks; naming 'hf' holds the same values under the
    transformers names. Fan-in scaled weights and norms / LayerScales near 1 keep activations
    O(1)."""
    if naming not in _MASK:
        raise ValueError(f"naming must be 'hub' or 'hf', got {naming!r}")
    rng = np.random.default_rng(seed)
    hub = {}
    for key, shape in state_dict_shapes(preset, grid, "hub").items():
        if key.endswith("weight") and len(shape) > 1:
            value = rng.standard_normal(shape) * np.prod(shape[1:]) ** -0.5
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
            value = rng.uniform(0.5, 1.5, shape)
        else:   # biases, tokens and the position table
            value = rng.normal(0.0, 0.5 if len(shape) > 1 else 0.1, shape)
        hub[key] = value.astype(np.float32)
    if naming == "hub":
        return hub
    out = {"embeddings.mask_token": hub["mask_token"]}
    for _, h, t in _key_table(preset):
        out.update(zip(map(t.format, _QKV), np.split(hub[h], 3)) if "{}" in t else {t: hub[h]})
    return out
