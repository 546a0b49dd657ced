"""The FID network: Inception-v3 (Szegedy et al. 2016) as FID defines it (Heusel et al. 2017).

FID is defined with the 2015-12-05 TensorFlow Inception-v3 graph. This is the standard PyTorch
port of that graph (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) in NHWC, with module
names that map one to one onto its state dict
(`Mixed_5b.branch1x1.conv.weight` <-> Mixed_5b/branch1x1/conv/kernel):

  stem: Conv2d_1a_3x3 (stride 2) -> 2a -> 2b (pad 1) -> max pool 3/2 -> 3b (1x1) -> 4a
        -> max pool 3/2                                       [B, 299, 299, 3] -> [B, 35, 35, 192]
  Mixed_5b/5c/5d: Inception-A                                  -> [B, 35, 35, 288]
  Mixed_6a: Inception-B (grid reduction), Mixed_6b..6e: Inception-C -> [B, 17, 17, 768]
  Mixed_7a: Inception-D (grid reduction), Mixed_7b/7c: Inception-E  -> [B, 8, 8, 2048]
  global average pool: the "pool3" features                   -> [B, 2048]

Every convolution is a BasicConv2d: conv (no bias) -> inference BatchNorm (eps 1e-3) -> ReLU.
Where the TF graph differs from the ImageNet-trained Inception-v3, so does this port: the 3x3
average pools of the A, C and first E blocks exclude the zero padding from the mean, and the last
E block (Mixed_7c) pools with a 3x3 max instead.

Inputs: `preprocess` turns uint8 pixels, or our samples in [-1, 1] (quantized to 8 bits first,
as saved images would be), into [B, 299, 299, 3] in [-1, 1] with the bilinear resize of
pytorch-fid. Nothing is downloaded: `load_params` reads the file the user gives.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scm_jax.evaluation import pixels, weights

FEATURE_DIM = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75   # smallest input whose Mixed_7a output is still 1x1
NUM_CLASSES = 1008    # the TF graph's classifier, unused for FID
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
FORMAT = "scm_jax.inception_fid.v1"
FORMAT_KEY = "__format__"
BN_EPS = 1e-3

_WHAT = f"the FID Inception-v3 weights ({WEIGHTS_FILE})"
_SOURCE = f"download them from {WEIGHTS_URL} and pass the file's path"
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


# ---------------------------------------------------------------------------------------------
# Network.
# ---------------------------------------------------------------------------------------------


class BatchNormInference(nn.Module):
    """BatchNorm with fixed running statistics (the `bn` of a BasicConv2d), then ReLU.

    The statistics and the affine map are applied in float32 whatever the compute dtype, so that
    bfloat16 convolutions are the only rounding bfloat16 adds. [B, H, W, C] -> same.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        f32 = jnp.promote_types(self.dtype, jnp.float32)   # float64 in x64 reference tests
        scale, bias, mean, var = (
            self.param(n, init, (x.shape[-1],), jnp.float32).astype(f32)
            for n, init in (("scale", ones), ("bias", zeros), ("mean", zeros), ("var", ones)))
        y = (x.astype(f32) - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
        return nn.relu(y).astype(self.dtype)


class BasicConv2d(nn.Module):
    """conv (no bias, explicit symmetric zero padding) -> BN -> ReLU. [B, H, W, Cin] -> Cout."""

    features: int
    kernel_size: tuple = (1, 1)
    strides: int = 1
    padding: tuple = (0, 0)   # (rows, columns) padded on each side, as PyTorch's Conv2d
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, tuple(self.kernel_size), strides=self.strides,
                    padding=[(p, p) for p in self.padding], use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32, precision=self.precision, name="conv")(x)
        return BatchNormInference(self.dtype, name="bn")(x)


def _avg_pool_3x3(x):
    # The TF graph averages over the in-image taps only (count_include_pad=False in PyTorch).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3(x, stride):
    # Padding (stride 1 only) enters as -inf: reduce_window pads with the reduction's identity.
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class _Block(nn.Module):
    """Shared fields of the Inception blocks; `conv(name, features, kernel, ...)` builds a
    BasicConv2d named as in the PyTorch state dict."""

    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, name, features, kernel=(1, 1), strides=1, padding=(0, 0)):
        return BasicConv2d(features, kernel, strides, padding, self.dtype, self.precision,
                           name=name)


class InceptionA(_Block):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1. -> 224 + pool_features."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_1", 48)(x)
        b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(b5)
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
        b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
        bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35 -> 17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3/2. [B, H, W, C] -> 480 + C."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
        bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(_Block):
    """17x17 block with 7x7 convolutions factorized into 1x7 and 7x1. [B, H, W, C] -> 768."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7, row, col = self.channels_7x7, dict(padding=(0, 3)), dict(padding=(3, 0))
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), **row)(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), **col)(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), **col)(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), **row)(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), **col)(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), **row)(bd)
        bp = self.conv("branch_pool", 192)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17 -> 8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3/2. -> 512 + C."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_1", 192)(x)
        b3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(_Block):
    """8x8 block with split 1x3 / 3x1 outputs. [B, H, W, C] -> 2048.

    pool: 'avg' (padding-excluding average, Mixed_7b) or 'max' (Mixed_7c): the TF graph's two
    E blocks differ only there.
    """

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        if self.pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        row, col = dict(padding=(0, 1)), dict(padding=(1, 0))
        b1 = self.conv("branch1x1", 320)(x)
        b3 = self.conv("branch3x3_1", 384)(x)
        b3 = [self.conv("branch3x3_2a", 384, (1, 3), **row)(b3),
              self.conv("branch3x3_2b", 384, (3, 1), **col)(b3)]
        bd = self.conv("branch3x3dbl_1", 448)(x)
        bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
        bd = [self.conv("branch3x3dbl_3a", 384, (1, 3), **row)(bd),
              self.conv("branch3x3dbl_3b", 384, (3, 1), **col)(bd)]
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """x [B, S, S, 3] float in [-1, 1] (S = 299; any S >= 75 runs) -> pool3 features [B, 2048]
    float32.

    dtype: the compute dtype of the convolutions (float32 or bfloat16); BN and the final pool run
    in float32. precision: of the convolutions; HIGHEST by default so that float32 means float32
    on every backend (TPUs and recent GPUs otherwise round float32 operands to bfloat16 / TF32).
    """

    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"expected images [B, S, S, 3] with S >= {MIN_INPUT_SIZE} "
                             f"(normally {INPUT_SIZE}), got {x.shape}")
        kw = dict(dtype=self.dtype, precision=self.precision)
        conv = functools.partial(BasicConv2d, **kw)
        x = x.astype(self.dtype)
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(**kw, pool_features=pool_features, name=name)(x)
        x = InceptionB(**kw, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(**kw, channels_7x7=c7, name=name)(x)
        x = InceptionD(**kw, name="Mixed_7a")(x)
        x = InceptionE(**kw, pool="avg", name="Mixed_7b")(x)
        x = InceptionE(**kw, pool="max", name="Mixed_7c")(x)
        return jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------


def preprocess(images, size: int = INPUT_SIZE):
    """images [B, H, W, 3], uint8 0..255 or float in [-1, 1] -> [B, size, size, 3] float32 in
    [-1, 1], as pytorch-fid feeds its network.

    Float images are first quantized to 8 bits (`pixels.quantize`). Then, as pytorch-fid:
    x / 255 in
    [0, 1], a bilinear resize to size x size with half-pixel centres and no antialiasing
    (PyTorch's F.interpolate(mode='bilinear', align_corners=False), also when downscaling), and
    2x - 1.
    """
    x = pixels.bilinear_resize(pixels.pixel_levels(images) / 255.0, size)
    return 2.0 * x - 1.0


def feature_fn(params, size: int = INPUT_SIZE, dtype=jnp.float32):
    """images [B, H, W, 3] (uint8 or float in [-1, 1]) -> features [B, 2048] float32: preprocess
    and the network, with params bound. Pure and jittable.

    Jitting the returned function as is bakes the ~95 MB of weights into the program as
    constants (slow to compile); `jax.jit(lambda p, x: feature_fn(p)(x))` keeps them an argument.
    """
    model = InceptionV3(dtype=dtype)
    return lambda images: model.apply({"params": params}, preprocess(images, size))


# ---------------------------------------------------------------------------------------------
# Weights: PyTorch state dict <-> flat '/'-joined params <-> Flax tree.
# Conv kernels: PyTorch [out, in, kh, kw] <-> Flax [kh, kw, in, out].
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def param_shapes() -> dict:
    """{'Mixed_5b/branch1x1/conv/kernel': shape, ...}: every parameter of InceptionV3, traced
    abstractly (no memory, no compute)."""
    x = jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _torch_key(flat_key: str) -> str:
    *modules, leaf = flat_key.split("/")
    return ".".join(modules + [_TORCH_LEAF[leaf]])


def _torch_shape(shape: tuple) -> tuple:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def expected_state_dict_shapes() -> dict:
    """{PyTorch key: shape} of the FID Inception state dict, the classifier fc.* included."""
    out = {_torch_key(k): _torch_shape(s) for k, s in param_shapes().items()}
    out.update({"fc.weight": (NUM_CLASSES, FEATURE_DIM), "fc.bias": (NUM_CLASSES,)})
    return out


def _ignored(key: str) -> bool:
    # The classifier is not part of pool3, and BN's step counter is training state.
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def _raise_problems(missing, unexpected, wrong, source):
    problems = [f"{len(items)} {what}: {'; '.join(items[:5])}"
                + (f"; ... ({len(items) - 5} more)" if len(items) > 5 else "")
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong)) if items]
    if problems:
        raise ValueError(f"{source} is not {_WHAT}: " + " | ".join(problems))


def convert_state_dict(state: dict, *, source: str = "the state dict") -> dict:
    """PyTorch state dict {'Mixed_5b.branch1x1.conv.weight': [64, 192, 1, 1], ...} -> flat params
    {'Mixed_5b/branch1x1/conv/kernel': [1, 1, 192, 64] float32, ...} plus the marker
    {'__format__': 'scm_jax.inception_fid.v1'}.

    fc.* and *.num_batches_tracked are dropped; a missing, unexpected or wrong-shaped key is a
    ValueError naming the key, its shape and the expected one.
    """
    expected = {_torch_key(k): (k, _torch_shape(s)) for k, s in param_shapes().items()}
    missing = [f"{k} (expected shape {s})" for k, (_, s) in expected.items() if k not in state]
    unexpected = [f"{k} {tuple(np.shape(v))}" for k, v in state.items()
                  if k not in expected and not _ignored(k)]
    wrong, flat = [], {}
    for key, (flat_key, shape) in expected.items():
        if key not in state:
            continue
        value = np.asarray(state[key])
        if value.shape != shape:
            wrong.append(f"{key}: got {value.shape}, expected {shape}")
            continue
        value = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
        flat[flat_key] = np.ascontiguousarray(value, np.float32)
    _raise_problems(missing, unexpected, wrong, source)
    flat[FORMAT_KEY] = np.array(FORMAT)
    return flat


def params_from_flat(flat: dict, *, source: str = "the flat params"):
    """Flat params (as `convert_state_dict` returns; the marker optional) -> the Flax params tree
    (nested dicts of numpy float32), checking every key and shape."""
    flat = dict(flat)
    marker = flat.pop(FORMAT_KEY, None)
    if marker is not None and str(np.asarray(marker)) != FORMAT:
        raise ValueError(f"{source} has format {str(np.asarray(marker))!r}, expected {FORMAT!r}")
    expected = param_shapes()
    missing = [f"{k} (expected shape {s})" for k, s in expected.items() if k not in flat]
    unexpected = [f"{k} {tuple(np.shape(v))}" for k, v in flat.items() if k not in expected]
    wrong = [f"{k}: got {tuple(np.shape(flat[k]))}, expected {s}" for k, s in expected.items()
             if k in flat and tuple(np.shape(flat[k])) != s]
    _raise_problems(missing, unexpected, wrong, source)
    return traverse_util.unflatten_dict(
        {k: np.asarray(flat[k], np.float32) for k in expected}, sep="/")


def flat_from_params(params) -> dict:
    """Inverse of `params_from_flat`: the Flax params tree -> flat numpy params with the marker
    (what `convert_state_dict` returns, and what a converted .npz holds)."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    flat[FORMAT_KEY] = np.array(FORMAT)
    return flat


def load_params(path):
    """The Flax params tree from a converted .npz (it has '__format__') or from the raw PyTorch
    state dict in any format `weights.load_state_dict` reads (converted on the fly).
    MissingInputError naming the path and WEIGHTS_URL if the file is absent."""
    state = weights.load_state_dict(path, what=_WHAT, source=_SOURCE)
    if FORMAT_KEY in state:
        return params_from_flat(state, source=repr(str(path)))
    return params_from_flat(convert_state_dict(state, source=repr(str(path))))


def random_state_dict(seed: int = 0) -> dict:
    """A PyTorch-style state dict with the real keys and shapes (fc.* included) and random float32
    values, for tests and benchmarks. Conv weights have He scaling and BN statistics are near
    identity with positive variances, so activations stay O(1) through the 94 layers."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_state_dict_shapes().items():
        normal = rng.standard_normal(shape, dtype=np.float32)
        if key.endswith("conv.weight") or key == "fc.weight":
            out[key] = normal * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        elif key.endswith("bn.weight"):
            out[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:   # BN bias, running mean, fc.bias
            out[key] = normal * np.float32(0.1)
    return out
