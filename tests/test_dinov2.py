"""FD-DINOv2's network (evaluation/dinov2.py): DINOv2 ViT-L/14 (Oquab et al. 2023) in Flax.

The 'tiny' preset (dim 64, 2 blocks, 4 heads) runs through the same code as ViT-L/14, whose
structure is checked abstractly with `jax.eval_shape`. References are float64 numpy written out
from the formulas (torch's resize kernels included); the parity tests against torch and
transformers skip when those are not installed.
"""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from scm_jax.errors import MissingInputError
from scm_jax.evaluation import dinov2 as D
from scm_jax.evaluation import pixels as P

TINY = D.PRESETS["tiny"]
MEAN, STD = np.array(D.IMAGENET_MEAN), np.array(D.IMAGENET_STD)


@pytest.fixture(scope="module")
def hub_state():
    """Random tiny weights with a 16x16 position table: 224px inputs use it as is (no resize),
    as transformers' model does at image_size=224."""
    return D.random_state_dict("tiny", seed=0, grid=16)


@pytest.fixture(scope="module")
def params(hub_state):
    params, preset = D.params_from_flat(D.convert_state_dict(hub_state))
    assert preset == TINY
    return params


def _jit_features(dtype=jnp.float32):
    # Params as an argument, not constants baked into the program.
    return jax.jit(lambda p, x: D.feature_fn(p, TINY, dtype)(x))


@pytest.fixture(scope="module")
def features(params):
    return functools.partial(_jit_features(), params)


def _uint8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _to_model_names(state, names):
    """Published transformers names -> those of the installed version (>= 5: q_proj / o_proj)."""
    def rename(key):
        if key in names:
            return key
        key = re.sub(r"\.attention\.attention\.(query|key|value)\.",
                     lambda m: f".attention.{m.group(1)[0]}_proj.", key)
        return key.replace(".attention.output.dense.", ".attention.o_proj.")
    return {rename(k): v for k, v in state.items()}


# ------------------------------------------------------------------------- float64 references


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * w + b


def _block_ref(x, state, i, heads):
    """x [B, N, D] float64 through blocks.i of a hub state dict (torch layout, rows = outputs)."""
    g = lambda k: state[f"blocks.{i}.{k}"].astype(np.float64)   # noqa: E731
    b, n, d = x.shape
    hd = d // heads
    h = _layer_norm(x, g("norm1.weight"), g("norm1.bias"))
    qkv = (h @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(b, n, 3, heads, hd)
    q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))          # [B, H, N, hd]
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    o = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    x = x + g("ls1.gamma") * (o @ g("attn.proj.weight").T + g("attn.proj.bias"))
    h = _layer_norm(x, g("norm2.weight"), g("norm2.bias"))
    h = h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
    h = 0.5 * h * (1 + erf(h / math.sqrt(2)))                                  # exact GELU
    return x + g("ls2.gamma") * (h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias"))


def _network_ref(x, state, preset):
    """x [B, S, S, 3] float64 -> class-token feature [B, D], from the hub state dict."""
    b, s, _, _ = x.shape
    g, p = s // D.PATCH, D.PATCH
    w = state["patch_embed.proj.weight"].astype(np.float64)                     # [D, 3, p, p]
    patches = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, -1)
    tokens = patches @ w.reshape(w.shape[0], -1).T + state["patch_embed.proj.bias"]
    cls = np.broadcast_to(state["cls_token"], (b, 1, w.shape[0]))
    h = np.concatenate([cls, tokens], axis=1) + state["pos_embed"]
    for i in range(preset["depth"]):
        h = _block_ref(h, state, i, preset["heads"])
    return _layer_norm(h[:, 0], state["norm.weight"], state["norm.bias"])


def _cubic_conv(t, a):
    """torch's upsample_bicubic2d taps for fraction t: the cubic convolution coefficients of the
    points floor(u) - 1 .. floor(u) + 2 (Keys 1981), as written in its kernel."""
    c1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1            # noqa: E731  |x| <= 1
    c2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a      # noqa: E731  1 < |x| < 2
    return [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]


def _pos_resize_ref(table, scale):
    """torch F.interpolate(bicubic, antialias=False, scale_factor=scale) of table [M, M, C]."""
    m = table.shape[0]
    n = math.floor(m * scale)
    taps = []
    for i in range(n):
        u = (i + 0.5) / scale - 0.5
        f = math.floor(u)
        taps.append(([min(max(f - 1 + k, 0), m - 1) for k in range(4)], _cubic_conv(u - f, -0.75)))
    out = np.zeros((n, n, table.shape[2]))
    for i, (ri, wi) in enumerate(taps):
        for j, (rj, wj) in enumerate(taps):
            for a in range(4):
                for c in range(4):
                    out[i, j] += wi[a] * wj[c] * table[ri[a], rj[c]]
    return out


def _aa_ref_matrix(n_in, n_out):
    """torch's antialiased bicubic weights (_compute_indices_min_size_weights_aa), one axis."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    a = -0.5
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(int(center + support + 0.5), n_in) - xmin
        for j in range(xsize):
            x = abs((j + xmin - center + 0.5) * invscale)
            out[i, xmin + j] = (((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else
                                ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0)
        out[i] /= out[i].sum()
    return out


def _resize_ref(x, size):
    """x [B, H, W, C] -> [B, size, size, C] float64 by `_aa_ref_matrix` along H and W."""
    wh, ww = _aa_ref_matrix(x.shape[1], size), _aa_ref_matrix(x.shape[2], size)
    return np.einsum("oh,bhwc,pw->bopc", wh, x.astype(np.float64), ww, optimize=True)


# ------------------------------------------------------------------------------- network


def test_vitl14_structure_and_parameter_count():
    d, hidden = 1024, 4096
    # Per block: norm1 + norm2 (2 x 2d), qkv (d x 3d + 3d), proj (d x d + d), fc1 (d x 4d + 4d),
    # fc2 (4d x d + d), ls1 + ls2 (2d) = 12,598,272.
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (hidden * d + hidden) + (hidden * d + d) \
        + 2 * d
    assert block == 12_598_272
    # Ours at 224px: patch conv (3*14*14 d + d), cls token (d), pos_embed for 1 + 16*16 tokens,
    # 24 blocks, the final norm (2d); mask_token dropped.
    ours = D.param_shapes(**D.PRESETS["vitl14"])
    n_ours = sum(math.prod(s) for s in ours.values())
    assert n_ours == (3 * 14 * 14 * d + d) + d + (1 + 16 * 16) * d + 24 * block + 2 * d \
        == 303_227_904
    # The published state dict: pos_embed for 1 + 37*37 tokens (trained at 518px) and mask_token.
    hub = D.state_dict_shapes("vitl14", grid=37)
    hf = D.state_dict_shapes("vitl14", grid=37, naming="hf")
    for shapes in (hub, hf):
        assert sum(math.prod(s) for s in shapes.values()) \
            == n_ours + (37 * 37 - 16 * 16) * d + d == 304_368_640
    assert len(hub) == 7 + 24 * 14 and len(hf) == 7 + 24 * 18
    known = {"cls_token": (1, 1, d), "pos_embed": (1, 1370, d), "mask_token": (1, d),
             "patch_embed.proj.weight": (d, 3, 14, 14), "blocks.23.attn.qkv.weight": (3 * d, d),
             "blocks.0.ls1.gamma": (d,), "blocks.5.mlp.fc1.weight": (hidden, d),
             "blocks.5.mlp.fc2.weight": (d, hidden), "norm.bias": (d,)}
    assert {k: hub[k] for k in known} == known
    assert hf["encoder.layer.23.attention.attention.value.weight"] == (d, d)
    assert hf["embeddings.position_embeddings"] == (1, 1370, d)
    model = D.DINOv2(**D.PRESETS["vitl14"], dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.PRNGKey(0), x), x)
    assert out.shape == (2, D.FEATURE_DIM) and out.dtype == jnp.float32


def test_features_shapes_determinism_and_rows(features):
    x = _uint8((3, 64, 64, 3), seed=1)
    f = np.asarray(features(x))
    assert f.shape == (3, 64) and f.dtype == np.float32 and np.isfinite(f).all()
    np.testing.assert_array_equal(f, features(x))
    assert np.abs(f[0] - f[1]).max() > 0.1   # different images, different features
    y = x[::-1].copy()
    y[0] = _uint8((64, 64, 3), seed=2)      # rows: new, x[1], x[0]
    g = np.asarray(features(y))
    np.testing.assert_allclose(g[1:], f[1::-1], rtol=1e-6, atol=1e-6)
    assert np.abs(g[0] - f[2]).max() > 0.1


def test_float32_vs_bfloat16(params, features):
    x = _uint8((3, 64, 64, 3), seed=1)
    f32 = np.asarray(features(x))
    bf16 = np.asarray(_jit_features(jnp.bfloat16)(params, x))
    assert bf16.dtype == np.float32
    err = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert 0 < err < 3e-2, err


def test_block_matches_numpy_float64(x64, hub_state, params):
    x = np.random.default_rng(3).normal(size=(2, 9, 64))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params["blocks_1"])
    out = D.Block(TINY["heads"], TINY["mlp_ratio"], jnp.float64).apply({"params": p64}, x)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, _block_ref(x, hub_state, 1, TINY["heads"]), rtol=1e-10,
                               atol=1e-10)


def test_network_matches_numpy_float64(x64, hub_state, params):
    x = np.random.default_rng(4).normal(size=(2, 224, 224, 3))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    out = D.DINOv2(**TINY, dtype=jnp.float64).apply({"params": p64}, x)
    np.testing.assert_allclose(out, _network_ref(x, hub_state, TINY), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------ position table


@pytest.mark.parametrize("grid", [16, 40])   # 224px (downscale 37 -> 16) and 560px (upscale)
def test_pos_resize_matches_torch_formula(grid):
    pos = np.random.default_rng(grid).normal(size=(1, 1 + 37 * 37, 6))
    out = D.interpolate_pos_embed(pos, grid)
    assert out.shape == (1, 1 + grid * grid, 6) and out.dtype == np.float32
    ref = _pos_resize_ref(pos[0, 1:].reshape(37, 37, 6), (grid + 0.1) / 37)
    np.testing.assert_allclose(out[0, 1:].reshape(grid, grid, 6), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[0, 0], pos[0, 0].astype(np.float32))   # class token kept
    np.testing.assert_array_equal(D.interpolate_pos_embed(pos, 37), pos.astype(np.float32))


def test_pos_resize_keeps_constants_and_ramps():
    const = np.full((1, 1 + 37 * 37, 2), 0.7)
    np.testing.assert_allclose(D.interpolate_pos_embed(const, 16), 0.7, rtol=1e-6)
    ramp = np.broadcast_to(np.arange(37.0), (37, 37))                       # table[r, c] = c
    pos = np.concatenate([[[0.0]], ramp.reshape(-1, 1)])[None]
    out = D.interpolate_pos_embed(pos, 16)[0, 1:, 0].reshape(16, 16)
    np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), atol=1e-5)   # per row
    u = (np.arange(16) + 0.5) * 37 / 16.1 - 0.5                              # source columns
    t = u - np.floor(u)
    inside = (np.floor(u) >= 1) & (np.floor(u) <= 37 - 3)                  # 4 taps in range
    # Keys' cubic reproduces ramps exactly only for a = -0.5; for a = -0.75 the error is
    # -(2a + 1) t (1 - t) (1 - 2t) = t (1 - t) (1 - 2t) / 2, at most 0.048 of a position.
    np.testing.assert_allclose(out[0, inside], (u + t * (1 - t) * (1 - 2 * t) / 2)[inside],
                               atol=1e-5)
    assert np.abs(out[0, inside] - u[inside]).max() < 0.05


def test_pos_resize_matches_torch():
    torch = pytest.importorskip("torch")
    pos = np.random.default_rng(5).normal(size=(1, 1 + 37 * 37, 8)).astype(np.float32)
    table = torch.from_numpy(pos[0, 1:].reshape(1, 37, 37, 8)).permute(0, 3, 1, 2)
    s = (16 + 0.1) / 37
    ref = torch.nn.functional.interpolate(table, mode="bicubic", antialias=False,
                                          scale_factor=(s, s)).permute(0, 2, 3, 1).numpy()
    ours = D.interpolate_pos_embed(pos, 16)[0, 1:].reshape(1, 16, 16, 8)
    print(f"pos_embed 37->16 vs torch float32: max abs {np.abs(ours - ref).max():.2e}")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-5)   # torch's own float32 rounding


# -------------------------------------------------------------------------------- weights


def test_converter_round_trip_and_layout(tmp_path):
    state = D.random_state_dict("tiny", seed=6, grid=37)
    flat = D.convert_state_dict(state)
    assert "mask_token" not in flat and str(flat["__format__"]) == "scm_jax.dinov2.v1"
    np.testing.assert_array_equal(flat["__preset__"], [64, 2, 4, 4])
    np.testing.assert_array_equal(flat["blocks_1/attn/qkv/kernel"],
                                  state["blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(flat["patch_embed/proj/kernel"][2, 5, 1],
                                  state["patch_embed.proj.weight"][:, 1, 2, 5])
    np.testing.assert_array_equal(flat["pos_embed"], D.interpolate_pos_embed(state["pos_embed"],
                                                                              16))
    params, preset = D.params_from_flat(flat)
    again = D.flat_from_params(params, preset)
    assert set(again) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(again[k], flat[k])
    np.savez(tmp_path / "dinov2.npz", **again)   # what convert_weights writes
    np.savez(tmp_path / "raw.npz", **state)
    save_file(D.random_state_dict("tiny", seed=6, grid=37, naming="hf"),
              tmp_path / "hf.safetensors")
    for name in ("dinov2.npz", "raw.npz", "hf.safetensors"):
        loaded, p = D.load_params(tmp_path / name)
        assert p == preset and jax.tree.structure(loaded) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"converted for 224px inputs, not 448px"):
        D.load_params(tmp_path / "dinov2.npz", size=448)


def test_hub_and_transformers_namings_give_identical_params():
    hub = D.random_state_dict("tiny", seed=7)
    hf = D.random_state_dict("tiny", seed=7, naming="hf")
    np.testing.assert_array_equal(hf["encoder.layer.1.attention.attention.key.weight"],
                                  hub["blocks.1.attn.qkv.weight"][64:128])
    new_names = _to_model_names(hf, set())   # transformers >= 5 in memory: attention.q_proj
    assert "encoder.layer.0.attention.q_proj.weight" in new_names
    ref = D.convert_state_dict(hub)
    for state in (hf, new_names):
        flat = D.convert_state_dict(state)
        assert set(flat) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(flat[k], ref[k])


def test_load_torch_save_file(tmp_path):
    """A `torch.save` state dict (read without torch by weights.load_state_dict)."""
    torch = pytest.importorskip("torch")
    state = D.random_state_dict("tiny", seed=11, grid=37)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / D.WEIGHTS_FILE)
    params, preset = D.load_params(tmp_path / D.WEIGHTS_FILE)
    ref, _ = D.params_from_flat(D.convert_state_dict(state))
    assert preset == TINY
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)


def test_converter_errors(tmp_path):
    hub = D.random_state_dict("tiny", seed=8)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.bias \(expected shape \(64,\)\)"):
        D.convert_state_dict({k: v for k, v in hub.items() if k != "blocks.1.mlp.fc2.bias"})
    bad = dict(hub, **{"blocks.0.attn.qkv.weight": hub["blocks.0.attn.qkv.weight"].T})
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight: got \(64, 192\), "
                                         r"expected \(192, 64\)"):
        D.convert_state_dict(bad)
    with pytest.raises(ValueError, match=r"unexpected keys: register_tokens \(1, 4, 64\)"):
        D.convert_state_dict(dict(hub, register_tokens=np.zeros((1, 4, 64), np.float32)))
    hf = D.random_state_dict("tiny", seed=8, naming="hf")
    del hf["encoder.layer.0.attention.attention.value.bias"]
    with pytest.raises(ValueError, match=r"attention\.value\.bias \(expected shape \(64,\)\)"):
        D.convert_state_dict(hf)
    with pytest.raises(ValueError, match="neither cls_token"):
        D.convert_state_dict({"head.weight": np.zeros((2, 2))})
    no_mask = {k: v for k, v in hub.items() if k != "mask_token"}   # unused: may be absent
    assert D.convert_state_dict(no_mask)["__preset__"][0] == 64
    flat = D.convert_state_dict(hub)
    with pytest.raises(ValueError, match=r"format 'other', expected 'scm_jax\.dinov2\.v1'"):
        D.params_from_flat(dict(flat, __format__=np.array("other")))
    with pytest.raises(ValueError, match=r"norm/scale: got \(63,\), expected \(64,\)"):
        D.params_from_flat(dict(flat, **{"norm/scale": np.ones(63, np.float32)}))
    missing = tmp_path / D.WEIGHTS_FILE
    with pytest.raises(MissingInputError, match=re.escape(str(missing))) as info:
        D.load_params(missing)
    assert D.WEIGHTS_URL in str(info.value)


# ------------------------------------------------------------------------------ preprocess


@pytest.mark.parametrize("n", [512, 32, 64])
def test_resize_matches_torch_formula(x64, n):
    x = np.random.default_rng(n).uniform(0, 255, (2, n, n, 3)).astype(np.float32)
    ref = _resize_ref(x, 224)
    out = np.asarray(P.resize_antialiased(x, 224))
    assert out.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-4)   # float32 at 255: 1.5e-5 per ulp
    # jax.image.resize is the same formula (a = -0.5, border taps dropped): equal in float64.
    jax_out = jax.image.resize(x.astype(np.float64), (2, 224, 224, 3), "bicubic", antialias=True)
    np.testing.assert_allclose(jax_out, ref, rtol=0, atol=1e-9)


def test_preprocess_uint8_and_float():
    x = _uint8((2, 32, 32, 3), seed=9)
    ref = (_resize_ref(x, 224) / 255 - MEAN) / STD
    out = D.preprocess(x)
    assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    # Floats in [-1, 1] go through the 8-bit levels EDM2 saves: clip(floor(127.5 x + 128)).
    np.testing.assert_array_equal(P.quantize(np.array([-1.2, -1, -0.999, 0, 0.999, 1, 1.5])),
                                  [0, 0, 0, 128, 255, 255, 255])
    samples = np.random.default_rng(10).uniform(-1.1, 1.1, (2, 32, 32, 3)).astype(np.float32)
    levels = np.clip(np.floor(samples * 127.5 + 128), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(D.preprocess(samples), D.preprocess(levels))
    with pytest.raises(ValueError, match="got dtype int32"):
        D.preprocess(x.astype(np.int32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\], got shape \(2, 32, 32\)"):
        D.preprocess(x[..., 0])


def test_preprocess_matches_torch():
    torch = pytest.importorskip("torch")
    mean = torch.tensor(D.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(D.IMAGENET_STD)[:, None, None]
    for n in (512, 32, 64):
        x = _uint8((2, n, n, 3), seed=n)
        t = torch.from_numpy(x).permute(0, 3, 1, 2).to(torch.float32)   # EDM2's DINOv2Detector
        t = torch.nn.functional.interpolate(t, size=(224, 224), mode="bicubic", antialias=True)
        ref = ((t / 255 - mean) / std).permute(0, 2, 3, 1).numpy()
        diff = np.abs(np.asarray(D.preprocess(x)) - ref).max()
        print(f"preprocess {n}->224 vs torch float32: max abs {diff:.2e} (normalized units)")
        assert diff < 1e-4


def test_matches_transformers(hub_state, features):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=224,
        patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
        use_swiglu_ffn=False)
    model = transformers.Dinov2Model(config).eval()
    hf = D.random_state_dict("tiny", seed=0, grid=16, naming="hf")   # = hub_state's values
    names = set(model.state_dict())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in _to_model_names(hf, names).items()},
                          strict=True)
    x = _uint8((3, 64, 64, 3), seed=1)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).to(torch.float32)
    t = torch.nn.functional.interpolate(t, size=(224, 224), mode="bicubic", antialias=True) / 255
    t = (t - torch.tensor(D.IMAGENET_MEAN)[:, None, None]) / torch.tensor(D.IMAGENET_STD)[
        :, None, None]
    with torch.no_grad():
        out = model(pixel_values=t)
    ref = out.pooler_output.numpy()
    np.testing.assert_array_equal(ref, out.last_hidden_state[:, 0].numpy())
    ours = np.asarray(features(x))
    diff = np.abs(ours - ref).max()
    print(f"features vs transformers Dinov2Model: max abs {diff:.2e}, relative "
          f"{diff / np.abs(ref).max():.2e}")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-5 * np.abs(ref).max())
