"""FID Inception-v3 (evaluation/inception.py) against references written out here.

The network's structure is written out a second time below (`_block_*`,
`_reference_features`), independently of the module, over two backends: float64 numpy (always)
and PyTorch's own kernels (when torch is installed). Random weights with the real key names and
shapes; the network runs at the minimum input size 75x75 except in the PyTorch parity test
(299x299, as pytorch-fid).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.errors import MissingInputError
from scm_jax.evaluation import inception as I
from scm_jax.evaluation import pixels as P

SIZE = I.MIN_INPUT_SIZE
# One jitted function: one compile per (input shape, size, dtype) in the whole module.
_FEATURES = jax.jit(lambda p, x, size, dtype=jnp.float32: I.feature_fn(p, size, dtype)(x),
                    static_argnames=("size", "dtype"))


@pytest.fixture(scope="module")
def state():
    return I.random_state_dict(seed=1)


@pytest.fixture(scope="module")
def params(state):
    return I.params_from_flat(I.convert_state_dict(state))


def _uint8_images(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ the reference network


class _NumpyOps:
    """float64 NHWC ops over a PyTorch state dict. avg_include_pad / max_pad_value switch to the
    ImageNet Inception's pooling, to show the tests can tell the two apart."""

    def __init__(self, state, avg_include_pad=False, max_pad_value=-np.inf):
        self.s = {k: np.asarray(v, np.float64) for k, v in state.items()}
        self.avg_include_pad, self.max_pad_value = avg_include_pad, max_pad_value

    def conv(self, name, x, stride=1, pad=(0, 0)):
        """BasicConv2d: explicit sum over kernel taps, BN with running statistics, ReLU."""
        w = self.s[f"{name}.conv.weight"]   # [out, in, kh, kw]
        x = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
        kh, kw = w.shape[2:]
        ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
        y = 0.0
        for dy in range(kh):
            for dx in range(kw):
                patch = x[:, dy:dy + stride * ho:stride, dx:dx + stride * wo:stride]
                y = y + np.tensordot(patch, w[:, :, dy, dx], axes=([3], [1]))
        s = lambda n: self.s[f"{name}.bn.{n}"]  # noqa: E731
        y = (y - s("running_mean")) / np.sqrt(s("running_var") + 1e-3) * s("weight") + s("bias")
        return np.maximum(y, 0.0)

    def _windows(self, x, stride, value):
        """[B, H, W, C] -> the 9 shifted views [9, B, Ho, Wo, C] of 3x3 windows (pad 1 with
        `value` at stride 1, unpadded at stride 2)."""
        pad = 1 if stride == 1 else 0
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=value)
        ho, wo = (x.shape[1] - 3) // stride + 1, (x.shape[2] - 3) // stride + 1
        return np.stack([x[:, dy:dy + stride * ho:stride, dx:dx + stride * wo:stride]
                         for dy in range(3) for dx in range(3)])

    def avg3(self, x):
        total = self._windows(x, 1, 0.0).sum(0)
        count = 9.0 if self.avg_include_pad else self._windows(np.ones_like(x[:1]), 1, 0.0).sum(0)
        return total / count

    def max3(self, x, stride):
        return self._windows(x, stride, self.max_pad_value if stride == 1 else 0.0).max(0)

    def cat(self, xs):
        return np.concatenate(xs, axis=-1)

    def global_pool(self, x):
        return x.mean(axis=(1, 2))


def _block_a(op, p, x):
    b5 = op.conv(f"{p}.branch5x5_2", op.conv(f"{p}.branch5x5_1", x), pad=(2, 2))
    bd = op.conv(f"{p}.branch3x3dbl_2", op.conv(f"{p}.branch3x3dbl_1", x), pad=(1, 1))
    bd = op.conv(f"{p}.branch3x3dbl_3", bd, pad=(1, 1))
    return op.cat([op.conv(f"{p}.branch1x1", x), b5, bd, op.conv(f"{p}.branch_pool", op.avg3(x))])


def _block_b(op, p, x):
    bd = op.conv(f"{p}.branch3x3dbl_2", op.conv(f"{p}.branch3x3dbl_1", x), pad=(1, 1))
    bd = op.conv(f"{p}.branch3x3dbl_3", bd, stride=2)
    return op.cat([op.conv(f"{p}.branch3x3", x, stride=2), bd, op.max3(x, 2)])


def _block_c(op, p, x):
    b7 = op.conv(f"{p}.branch7x7_2", op.conv(f"{p}.branch7x7_1", x), pad=(0, 3))
    b7 = op.conv(f"{p}.branch7x7_3", b7, pad=(3, 0))
    bd = op.conv(f"{p}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), ((3, 0), (0, 3), (3, 0), (0, 3))):
        bd = op.conv(f"{p}.branch7x7dbl_{i}", bd, pad=pad)
    return op.cat([op.conv(f"{p}.branch1x1", x), b7, bd, op.conv(f"{p}.branch_pool", op.avg3(x))])


def _block_d(op, p, x):
    b3 = op.conv(f"{p}.branch3x3_2", op.conv(f"{p}.branch3x3_1", x), stride=2)
    b7 = op.conv(f"{p}.branch7x7x3_2", op.conv(f"{p}.branch7x7x3_1", x), pad=(0, 3))
    b7 = op.conv(f"{p}.branch7x7x3_4", op.conv(f"{p}.branch7x7x3_3", b7, pad=(3, 0)), stride=2)
    return op.cat([b3, b7, op.max3(x, 2)])


def _block_e(op, p, x, pool):
    b3 = op.conv(f"{p}.branch3x3_1", x)
    bd = op.conv(f"{p}.branch3x3dbl_2", op.conv(f"{p}.branch3x3dbl_1", x), pad=(1, 1))
    pooled = op.avg3(x) if pool == "avg" else op.max3(x, 1)
    return op.cat([op.conv(f"{p}.branch1x1", x),
                   op.conv(f"{p}.branch3x3_2a", b3, pad=(0, 1)),
                   op.conv(f"{p}.branch3x3_2b", b3, pad=(1, 0)),
                   op.conv(f"{p}.branch3x3dbl_3a", bd, pad=(0, 1)),
                   op.conv(f"{p}.branch3x3dbl_3b", bd, pad=(1, 0)),
                   op.conv(f"{p}.branch_pool", pooled)])


def _reference_features(op, x):
    """x in [-1, 1] at 299x299 (or >= 75) -> pool3 [B, 2048], in op's layout."""
    x = op.conv("Conv2d_2a_3x3", op.conv("Conv2d_1a_3x3", x, stride=2))
    x = op.max3(op.conv("Conv2d_2b_3x3", x, pad=(1, 1)), 2)
    x = op.max3(op.conv("Conv2d_4a_3x3", op.conv("Conv2d_3b_1x1", x)), 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _block_a(op, name, x)
    x = _block_b(op, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _block_c(op, name, x)
    x = _block_d(op, "Mixed_7a", x)
    return op.global_pool(_block_e(op, "Mixed_7c", _block_e(op, "Mixed_7b", x, "avg"), "max"))


def _torch_bilinear(x, size):
    """PyTorch's F.interpolate(mode='bilinear', align_corners=False) written out: per axis,
    source coordinate (i + 0.5) * in / out - 0.5 clamped at 0, two taps. x [B, H, W, C] float64."""
    for axis in (1, 2):
        n = x.shape[axis]
        src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        lam = (src - i0).reshape([-1 if a == axis else 1 for a in range(4)])
        x = (1 - lam) * np.take(x, i0, axis=axis) + lam * np.take(x, i1, axis=axis)
    return x


# ------------------------------------------------------------------------------ structure


def test_state_dict_structure():
    shapes = I.expected_state_dict_shapes()
    assert len(shapes) == 94 * 5 + 2   # 94 BasicConv2d (conv + 4 BN tensors) and fc
    # torchvision's Inception3 has 27,161,264 parameters with its aux classifier (3,326,696:
    # 768->128 1x1, 128->768 5x5, each with BN, and a 768->1000 fc) and a 1000-way fc; the FID
    # graph has no aux classifier and a 1008-way fc; the state dict adds 2 BN buffers a channel.
    bn_channels = sum(s[0] for k, s in shapes.items() if k.endswith("running_mean"))
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n - 2 * bn_channels == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    known = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.running_var": (192,), "fc.weight": (1008, 2048),
    }
    assert {k: shapes[k] for k in known} == known


def test_random_state_dict(state):
    assert {k: v.shape for k, v in state.items()} == I.expected_state_dict_shapes()
    assert all(v.dtype == np.float32 for v in state.values())
    assert min(v.min() for k, v in state.items() if k.endswith("running_var")) > 0
    assert not np.array_equal(state["fc.bias"], I.random_state_dict(seed=2)["fc.bias"])


# ------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("shape", [(2, 32, 40), (1, 512, 512)], ids=["up", "down"])
def test_resize_matches_torch_bilinear(shape):
    images = _uint8_images(*shape, seed=5)
    ref = 2 * _torch_bilinear(images / 255.0, I.INPUT_SIZE) - 1
    out = np.asarray(I.preprocess(images))
    assert out.shape == (shape[0], 299, 299, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    # Antialiasing (jax's default) would blur the downscaled image; the test sees it.
    if shape[1] > 299:
        aa = jax.image.resize(images / 255.0, out.shape, "bilinear", antialias=True) * 2 - 1
        assert np.abs(np.asarray(aa) - ref).max() > 0.1
    same = _uint8_images(1, SIZE, SIZE, seed=6)   # no resize at the network's size
    np.testing.assert_allclose(I.preprocess(same, SIZE), same / 127.5 - 1, rtol=0, atol=1e-6)


def test_resize_formula_is_pytorchs():
    """The numpy formula above is F.interpolate's, checked in float64 (in float32 PyTorch rounds
    its source coordinates, ~5e-5 off at 512 -> 299)."""
    torch = pytest.importorskip("torch")
    for shape in ((1, 32, 40), (1, 512, 300)):
        x = np.random.default_rng(11).uniform(size=shape + (3,))
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(
            299, 299), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(_torch_bilinear(x, 299), ref, rtol=0, atol=1e-12)


def test_quantization_of_float_samples():
    levels = np.arange(256, dtype=np.uint8)
    # Data read as u / 127.5 - 1 comes back to u: +128 then floor rounds to the nearest level.
    np.testing.assert_array_equal(P.quantize(levels / np.float32(127.5) - 1), levels)
    x = np.random.default_rng(7).uniform(-1.2, 1.2, (2, 6, 6, 3)).astype(np.float32)
    x[0, 0, 0] = [-1.0, 1.0, 0.0]
    q = np.clip(np.floor(x.astype(np.float64) * 127.5 + 128), 0, 255)
    assert q[0, 0, 0].tolist() == [0, 255, 128]
    np.testing.assert_array_equal(P.quantize(x), q)
    # Float samples and their 8-bit image give the same network input.
    out = np.asarray(I.preprocess(x, size=6))
    np.testing.assert_array_equal(out, np.asarray(I.preprocess(q.astype(np.uint8), size=6)))
    np.testing.assert_allclose(out, q / 255 * 2 - 1, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="int32"):
        I.preprocess(q.astype(np.int32))
    with pytest.raises(ValueError, match=r"\(2, 6, 6\)"):
        I.preprocess(x[..., 0])


# ------------------------------------------------------------------------------ the network


def _block_module(kind, **kw):
    return {"A": I.InceptionA, "B": I.InceptionB, "C": I.InceptionC, "D": I.InceptionD,
            "E": I.InceptionE}[kind](dtype=jnp.float64, **kw)


BLOCKS = [  # name, module kind and fields, reference, input [B, H, W, C]
    ("Mixed_5b", "A", dict(pool_features=32), _block_a, (2, 5, 5, 192)),
    ("Mixed_6a", "B", {}, _block_b, (1, 7, 7, 288)),
    ("Mixed_6c", "C", dict(channels_7x7=160), _block_c, (1, 5, 4, 768)),
    ("Mixed_7a", "D", {}, _block_d, (1, 7, 7, 768)),
    ("Mixed_7b", "E", dict(pool="avg"), lambda o, p, x: _block_e(o, p, x, "avg"), (1, 3, 4, 1280)),
    ("Mixed_7c", "E", dict(pool="max"), lambda o, p, x: _block_e(o, p, x, "max"), (2, 3, 3, 2048)),
]


@pytest.mark.parametrize("name,kind,fields,reference,shape", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_matches_float64_reference(x64, state, params, name, kind, fields, reference,
                                         shape):
    """Each block type in float64 on small random maps, where the padding of the 3x3 pools and of
    the factorized convolutions touches most outputs. The input has both signs, so a max pool
    padded with zeros instead of -inf would differ."""
    x = np.random.default_rng(8).normal(size=shape)
    block_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params[name])
    out = jax.jit(_block_module(kind, **fields).apply)({"params": block_params}, x)
    assert out.dtype == jnp.float64
    ref = reference(_NumpyOps(state), name, x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)
    if name in ("Mixed_5b", "Mixed_7c"):   # the ImageNet Inception's pooling is far from it
        other = reference(_NumpyOps(state, avg_include_pad=True, max_pad_value=0.0), name, x)
        assert np.abs(other - ref).max() > 1e-2


@pytest.fixture(scope="module")
def images_and_features(params):
    images = _uint8_images(2, 40, 48, seed=9)
    return images, np.asarray(_FEATURES(params, images, size=SIZE))


def test_features_shape_determinism_and_rows(params, images_and_features):
    images, out = images_and_features
    assert out.shape == (2, I.FEATURE_DIM) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 0.1
    np.testing.assert_array_equal(_FEATURES(params, images, size=SIZE), out)
    changed = images.copy()
    changed[0] = 255 - changed[0]
    again = np.asarray(_FEATURES(params, changed, size=SIZE))
    np.testing.assert_array_equal(again[1], out[1])   # rows never mix
    assert np.abs(again[0] - out[0]).max() > 1e-2


def test_features_match_float64_reference(state, images_and_features):
    """Preprocessing and the whole network in float32 against the numpy float64 reference
    (measured: max abs error 7e-7 of the largest feature)."""
    images, out = images_and_features
    x = 2 * _torch_bilinear(images / 255.0, SIZE) - 1
    ref = _reference_features(_NumpyOps(state), x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_bfloat16_compute_close(params, images_and_features):
    """bfloat16 convolutions (BN and the final pool in float32): relative L2 error under 3% on
    random weights (measured 0.6%)."""
    images, out = images_and_features
    low = np.asarray(_FEATURES(params, images, size=SIZE, dtype=jnp.bfloat16))
    assert low.dtype == np.float32
    assert np.linalg.norm(low - out) / np.linalg.norm(out) < 0.03


def test_input_size_checked(params):
    x = jax.ShapeDtypeStruct((1, SIZE - 1, SIZE, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"S >= 75.*\(1, 74, 75, 3\)"):
        jax.eval_shape(lambda p, x: I.InceptionV3().apply({"params": p}, x), params, x)


# ------------------------------------------------------------------------------ weights


def test_converter_round_trip_and_loading(state, params, tmp_path):
    flat = I.convert_state_dict(state)
    assert str(flat["__format__"]) == "scm_jax.inception_fid.v1"
    assert len(flat) == 94 * 5 + 1   # fc.* dropped, the marker added
    np.testing.assert_array_equal(flat["Mixed_6b/branch7x7_2/conv/kernel"],
                                  state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["Mixed_7c/branch_pool/bn/var"],
                                  state["Mixed_7c.branch_pool.bn.running_var"])
    back = I.flat_from_params(I.params_from_flat(flat))
    assert back.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])
    # BN step counters (written by training runs) are ignored, like fc.*.
    counted = dict(state, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.array(7)})
    assert I.convert_state_dict(counted).keys() == flat.keys()

    np.savez(tmp_path / "raw.npz", **state)
    np.savez(tmp_path / "converted.npz", **flat)
    raw, converted = (I.load_params(tmp_path / n) for n in ("raw.npz", "converted.npz"))
    for tree in (raw, converted):
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b)


def test_weight_errors(state, tmp_path):
    key = "Mixed_6b.branch7x7_2.conv.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=r"missing keys: Mixed_6b\.branch7x7_2\.conv\.weight "
                                         r"\(expected shape \(128, 128, 1, 7\)\)"):
        I.convert_state_dict(missing)
    wrong = dict(state, **{key: state[key].transpose(0, 1, 3, 2)})
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight: got "
                                         r"\(128, 128, 7, 1\), expected \(128, 128, 1, 7\)"):
        I.convert_state_dict(wrong)
    extra = dict(state, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: AuxLogits\.fc\.weight \(1000, 768\)"):
        I.convert_state_dict(extra)

    flat = I.convert_state_dict(state)
    with pytest.raises(ValueError, match=r"Conv2d_1a_3x3/bn/mean: got \(3,\), expected \(32,\)"):
        I.params_from_flat(dict(flat, **{"Conv2d_1a_3x3/bn/mean": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="format 'other.v0'"):
        I.params_from_flat(dict(flat, __format__=np.array("other.v0")))

    absent = tmp_path / "weights" / I.WEIGHTS_FILE
    with pytest.raises(MissingInputError) as info:
        I.load_params(absent)
    assert str(absent) in str(info.value) and I.WEIGHTS_URL in str(info.value)


# ------------------------------------------------------------------------------ PyTorch


class _TorchOps:
    """PyTorch's kernels (NCHW, float32): the layers of pytorch-fid's blocks, functionally."""

    def __init__(self, state):
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.s = {k: torch.from_numpy(v) for k, v in state.items()}

    def conv(self, name, x, stride=1, pad=(0, 0)):
        s = lambda n: self.s[f"{name}.{n}"]  # noqa: E731
        y = self.F.conv2d(x, s("conv.weight"), stride=stride, padding=pad)
        y = self.F.batch_norm(y, s("bn.running_mean"), s("bn.running_var"), s("bn.weight"),
                              s("bn.bias"), training=False, eps=1e-3)
        return self.F.relu(y)

    def avg3(self, x):
        return self.F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def max3(self, x, stride):
        return self.F.max_pool2d(x, 3, stride=stride, padding=1 if stride == 1 else 0)

    def cat(self, xs):
        return self.torch.cat(xs, dim=1)

    def global_pool(self, x):
        return x.mean(dim=(2, 3))


def _torch_features(state, images, monkeypatch):
    """pytorch-fid's InceptionV3 on uint8 images [B, H, W, 3] if it imports (its download
    replaced by `state`), else the same computation from PyTorch's layers. -> (network input
    [B, 299, 299, 3] or None, features [B, 2048], which)."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255   # pytorch-fid's input
    try:
        import pytorch_fid.inception as pfi
    except ImportError:
        x = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                align_corners=False) - 1
        with torch.no_grad():
            out = _reference_features(_TorchOps(state), x)
        return x.permute(0, 2, 3, 1).numpy(), out.numpy(), "torch layers"
    weights = {k: torch.from_numpy(v) for k, v in state.items()}
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: weights)
    model = pfi.InceptionV3([3]).eval()
    with torch.no_grad():
        return None, model(x)[0][:, :, 0, 0].numpy(), "pytorch_fid"


def test_parity_with_pytorch(state, params, monkeypatch):
    """2 images at 64x64 (upscaled) and 2 at 512x512 (downscaled), uint8, at 299x299."""
    inputs, refs = [], []
    for size in (64, 512):
        images = _uint8_images(2, size, size, seed=10 + size)
        torch_input, ref, how = _torch_features(state, images, monkeypatch)
        inputs.append(I.preprocess(images))
        refs.append(ref)
        if torch_input is not None:
            err = np.abs(np.asarray(inputs[-1]) - torch_input).max()
            print(f"\nresize {size} -> 299 vs torch F.interpolate: max abs {err:.3g}")
            assert err < 1e-4   # PyTorch computes its source coordinates in float32
    # One compile: the network alone on both pairs (preprocess + network = features).
    out = np.asarray(jax.jit(I.InceptionV3().apply)({"params": params}, jnp.concatenate(inputs)))
    ref = np.concatenate(refs)
    for name, rows in (("64x64", slice(0, 2)), ("512x512", slice(2, 4))):
        err, scale = np.abs(out[rows] - ref[rows]).max(), np.abs(ref[rows]).max()
        print(f"parity vs {how}, {name}: max abs {err:.3g}, relative to max |feature| "
              f"{err / scale:.3g}, relative L2 "
              f"{np.linalg.norm(out[rows] - ref[rows]) / np.linalg.norm(ref[rows]):.3g}")
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
