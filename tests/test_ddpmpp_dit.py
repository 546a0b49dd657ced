"""DDPM++ and DiT backbones: shapes and conditioning, JVP against float64 central differences,
parameter counts against the published sizes, the zero guidance path, sharding names, errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scm_jax import sharding
from scm_jax.networks import ddpmpp, dit
from scm_jax.networks.attention import ATTENTION_IMPLS

unbox = nn.meta.unbox

# EDM's DDPM++ for CIFAR-10 (Karras et al. 2022, "config F"; NVlabs/edm SongUNet with
# model_channels 128, channel_mult [2, 2, 2], num_blocks 4, attn [16], augment_dim 9): 55.73M
# parameters, exactly 55,733,891 from the layer shapes of NVlabs/edm training/networks.py. That
# count includes EDM's 9 -> 128 augmentation-label map (no bias), which we do not have.
EDM_DDPMPP_CIFAR10 = 55_733_891
EDM_AUGMENT_MAP = 9 * 128
# DiT (Peebles & Xie 2023) S/2, B/2, L/2, XL/2 at 32x32x4 latents, 1000 classes: 33M, 130M,
# 458M, 675M (675M for XL/2 is also sCM's Table 2). DiT counts its fixed position embedding
# and a second (learned-sigma) half of the output layer, which we do not have.
DIT_PUBLISHED = {"s": 33e6, "b": 130e6, "l": 458e6, "xl": 675e6}

SHAPES = {"ddpmpp": (2, 16, 16, 3), "dit": (2, 8, 8, 4)}


def _module(name, **kw):
    if name == "ddpmpp":
        return ddpmpp.DDPMPP(**{**ddpmpp.PRESETS["xs"], **kw})
    return dit.DiT(**{**dit.PRESETS["xs"], **kw})


def _inputs(key, shape, dtype=jnp.float32, num_classes=0, guided=False):
    kx, kt, ky, kg = jax.random.split(key, 4)
    x = jax.random.normal(kx, shape, dtype)
    t = jax.random.uniform(kt, shape[:1], dtype, 0.1, 1.5)
    y = jax.random.randint(ky, shape[:1], 0, num_classes + 1) if num_classes else None
    g = jax.random.uniform(kg, shape[:1], dtype, 1.0, 3.0) if guided else None
    return x, t, y, g


def _random_params(module, *args, seed=0, **kwargs):
    """Random values for every weight, from numpy (nothing to compile): kernels ~ N(0, 1/fan_in),
    embeddings ~ N(0, 1), norm gains 1 + N(0, 0.3^2), biases N(0, 0.3^2). Nothing is zero, so
    the zero-initialized layers (last convs, gates, output) hide no path."""
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs), *args)
    shapes = unbox(shapes["params"])
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        z = rng.standard_normal(spec.shape)
        name = path[-1].key
        if name == "kernel":
            z = z / np.sqrt(np.prod(spec.shape[:-1]))
        elif name == "scale":
            z = 1.0 + 0.3 * z
        elif name == "bias":
            z = 0.3 * z
        return jnp.asarray(z, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def init(module, *args):
    """Shapes of module.init(key, *args): traces (and raises) without computing anything."""
    return jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a), *args)


@functools.lru_cache(maxsize=None)
def _net(name, guided):
    """(module, random params, jitted apply) of a tiny class-conditional float32 net, with or
    without the guidance input; cached across tests. The DiT also has QK normalization."""
    extra = {"qk_norm": True} if name == "dit" else {}
    module = _module(name, num_classes=10, guidance_input=guided, **extra)
    params = _random_params(module, *_inputs(jax.random.PRNGKey(0), SHAPES[name], num_classes=10,
                                             guided=guided))
    apply = jax.jit(lambda p, x, t, y, g: module.apply({"params": p}, x, t, y, g))
    return module, params, apply


def _count(module, shape, y=False):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    labels = jax.ShapeDtypeStruct(shape[:1], jnp.int32) if y else None
    guid = jax.ShapeDtypeStruct(shape[:1], jnp.float32) if module.guidance_input else None
    tree = unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, labels, guid)["params"])
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree)), tree


@pytest.mark.parametrize("name", ["ddpmpp", "dit"])
def test_shapes_conditioning_and_dtypes(name):
    key = jax.random.PRNGKey(np.random.randint(1 << 30))
    shape = SHAPES[name]
    for guided in (False, True):
        module, params, apply = _net(name, guided=guided)
        x, t, y, g = _inputs(key, shape, num_classes=10, guided=guided)
        out = apply(params, x, t, y, g)
        assert out.shape == shape and out.dtype == jnp.float32
        assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 0
        # Labels (the null label 10 included) reach the output; so does the guidance scale.
        assert not np.allclose(out, apply(params, x, t, (y + 1) % 11, g))
        if guided:
            assert not np.allclose(out, apply(params, x, t, y, g + 1.0))
        # Low-precision compute still returns float32 (shapes only: nothing compiles).
        for dtype in (jnp.bfloat16, jnp.float16):
            low = module.clone(dtype=dtype)
            spec = jax.eval_shape(lambda p: low.apply({"params": p}, x, t, y, g), params)
            assert spec.shape == shape and spec.dtype == jnp.float32
    # The unconditional net (its values are checked in the dropout test for DDPM++).
    plain = _module(name)
    spec = jax.eval_shape(lambda x, t: plain.apply(plain.init(key, x, t), x, t), x, t)
    assert spec.shape == shape and spec.dtype == jnp.float32


@pytest.mark.parametrize("name", ["ddpmpp", "dit"])
def test_jvp_matches_float64_central_difference(x64, name):
    """jax.jvp of F w.r.t. (x, t) against a float64 central difference, with random params
    (noise on every weight, so zero-initialized layers hide no path), labels and guidance."""
    module, params32, _ = _net(name, guided=True)
    module = module.clone(dtype=jnp.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params32)
    key = jax.random.PRNGKey(np.random.randint(1 << 30))
    x, t, y, g = _inputs(key, SHAPES[name], jnp.float64, num_classes=10, guided=True)
    jvp = jax.jit(lambda x, t, dx, dt: jax.jvp(lambda a, b: module.apply(
        {"params": params}, a, b, y, g), (x, t), (dx, dt)))
    f = lambda x, t: jvp(x, t, jnp.zeros_like(x), jnp.zeros_like(t))[0]  # noqa: E731
    kx, kt = jax.random.split(jax.random.fold_in(key, 2))
    dx = jax.random.normal(kx, x.shape, jnp.float64)
    dt = jax.random.normal(kt, t.shape, jnp.float64)
    eps = 1e-6
    # Both tangents together, then t alone (so the time path is checked on its own).
    for tx in (dx, jnp.zeros_like(dx)):
        _, tangent = jvp(x, t, tx, dt)
        assert tangent.dtype == jnp.float64 and tangent.shape == x.shape
        fd = (f(x + eps * tx, t + eps * dt) - f(x - eps * tx, t - eps * dt)) / (2 * eps)
        scale = float(jnp.max(jnp.abs(fd)))
        assert scale > 1e-3
        np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-6 * scale)
    if name == "dit" and "pallas" in ATTENTION_IMPLS:
        # The switch reaches every attention layer: the fused forward+JVP kernel (interpret
        # mode on CPU) gives the same tangent as XLA attention.
        fused = module.clone(attention_impl="pallas")
        _, fused_tangent = jax.jit(lambda x, t, dx, dt: jax.jvp(lambda a, b: fused.apply(
            {"params": params}, a, b, y, g), (x, t), (dx, dt)))(x, t, dx, dt)
        np.testing.assert_allclose(fused_tangent, jvp(x, t, dx, dt)[1], rtol=1e-9, atol=1e-9)


def _np_group_norm(h, groups, eps=1e-6):
    g = h.reshape(h.shape[:3] + (groups, h.shape[3] // groups))
    mu, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mu) / np.sqrt(var + eps)).reshape(h.shape)


def _np_layer_norm(h, eps=1e-6):
    return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps)


def _np_conv(h, p):
    """'SAME' convolution, kernel [k, k, Cin, Cout]."""
    k = np.asarray(p["kernel"])
    r, (_, hh, ww, _) = k.shape[0] // 2, h.shape
    pad = np.pad(h, ((0, 0), (r, r), (r, r), (0, 0)))
    return sum(pad[:, i:i + hh, j:j + ww] @ k[i, j]
               for i in range(k.shape[0]) for j in range(k.shape[1])) + np.asarray(p["bias"])


def _np_dense(h, p):
    return h @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def _np_pnorm(a):
    return a / np.sqrt(np.mean(a**2, axis=-1, keepdims=True) + 1e-8)


def _np_silu(a):
    return a / (1 + np.exp(-a))


@pytest.mark.parametrize("modulation", ["adn", "additive"])
def test_ddpmpp_block_matches_float64_reference(x64, modulation):
    """One residual block against numpy: ADN is norm(h) * pnorm(s) + pnorm(b), no "+1"."""
    rng = np.random.default_rng(np.random.randint(1 << 30))
    x, emb = rng.standard_normal((2, 6, 6, 8)), rng.standard_normal((2, 12))
    block = ddpmpp.UNetBlock(16, modulation=modulation, dtype=jnp.float64)
    p = _random_params(block, x, emb, train=False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    out = jax.jit(lambda p, x, e: block.apply({"params": p}, x, e, train=False))(p, x, emb)
    gn = lambda h, q: _np_group_norm(h, h.shape[-1] // 4) * q["scale"] + q["bias"]  # noqa: E731
    h = _np_conv(_np_silu(gn(x, p["norm0"])), p["conv0"])
    mod = _np_dense(emb, p["affine"])[:, None, None, :]
    if modulation == "adn":
        assert "norm1" not in p and mod.shape[-1] == 32
        h = _np_group_norm(h, 4) * _np_pnorm(mod[..., :16]) + _np_pnorm(mod[..., 16:])
    else:
        h = gn(h + mod, p["norm1"])
    expected = (_np_conv(_np_silu(h), p["conv1"]) + _np_conv(x, p["skip"])) * np.sqrt(0.5)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_dit_block_matches_float64_reference(x64):
    """One DiT block (ADN, gates, QK norm) against numpy."""
    rng = np.random.default_rng(np.random.randint(1 << 30))
    x, c = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 12))
    block = dit.DiTBlock(num_heads=2, qk_norm=True, dtype=jnp.float64)
    p = _random_params(block, x, c, train=False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    out = jax.jit(lambda p, x, c: block.apply({"params": p}, x, c, train=False))(p, x, c)
    mods = _np_dense(c, p["modulation"]["adn_modulation"])
    shift1, scale1, shift2, scale2 = np.split(mods, 4, -1)
    gate1, gate2 = np.split(_np_dense(c, p["modulation"]["gate"]), 2, -1)

    def mod(h, shift, scale):
        return h * _np_pnorm(scale)[:, None] + _np_pnorm(shift)[:, None]

    def rms(a, q):
        return a / np.sqrt(np.mean(a**2, -1, keepdims=True) + 1e-6) * q["scale"]

    qkv = _np_dense(mod(_np_layer_norm(x), shift1, scale1), p["qkv"]).reshape(2, 5, 3, 2, 8)
    q, k, v = rms(qkv[:, :, 0], p["q_norm"]), rms(qkv[:, :, 1], p["k_norm"]), qkv[:, :, 2]
    logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    a = np.einsum("bhnm,bmhd->bnhd", weights, v).reshape(2, 5, 16)
    x1 = x + gate1[:, None] * _np_dense(a, p["proj"])
    h = _np_dense(mod(_np_layer_norm(x1), shift2, scale2), p["mlp_fc1"])
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    expected = x1 + gate2[:, None] * _np_dense(h, p["mlp_fc2"])
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["ddpmpp", "dit"])
def test_zero_guidance_weights_equal_the_unguided_net(name):
    module, params, apply = _net(name, guided=True)
    plain, _, plain_apply = _net(name, guided=False)
    assert plain == module.clone(guidance_input=False)
    guidance_key = "map_guidance" if name == "ddpmpp" else "guidance_embed"
    assert "guidance" in guidance_key and set(params[guidance_key]) == {"kernel", "bias"}
    zeroed = {**params, guidance_key: jax.tree.map(jnp.zeros_like, params[guidance_key])}
    shared = {k: v for k, v in params.items() if k != guidance_key}
    x, t, y, g = _inputs(jax.random.PRNGKey(np.random.randint(1 << 30)), SHAPES[name],
                         num_classes=10, guided=True)
    guided_out = apply(zeroed, x, t, y, g)
    np.testing.assert_allclose(guided_out, apply(zeroed, x, t, y, 5.0 * g), rtol=0, atol=0)
    plain_out = plain_apply(shared, x, t, y, None)
    np.testing.assert_allclose(guided_out, plain_out, rtol=1e-6, atol=1e-6)


def test_ddpmpp_parameter_count_matches_edm():
    """'additive' is EDM's DDPM++; ADN replaces affine(C) + GroupNorm(C) affine by affine(2C)."""
    n_additive, tree = _count(ddpmpp.DDPMPP(**ddpmpp.PRESETS["cifar10"], modulation="additive"),
                              (1, 32, 32, 3))
    n_adn, adn_tree = _count(ddpmpp.DDPMPP(**ddpmpp.PRESETS["cifar10"]), (1, 32, 32, 3))
    assert n_additive + EDM_AUGMENT_MAP == EDM_DDPMPP_CIFAR10
    assert abs(n_additive + EDM_AUGMENT_MAP - 55.73e6) < 0.005e6
    # ADN per residual block: affine E -> 2C (with bias) instead of E -> C, and norm1 loses its
    # C scales and C biases. Summed over the blocks of the additive net:
    emb = ddpmpp.PRESETS["cifar10"]["emb_channels"]
    blocks = [b for b in tree.values() if "affine" in b]
    added = sum((emb + 1) * 2 * c - (emb + 1) * c - 2 * c
                for c in (b["affine"]["kernel"].shape[-1] for b in blocks))
    assert len(blocks) == 33 and added > 0
    assert n_adn - n_additive == added
    assert all("norm1" not in b for b in adn_tree.values() if "affine" in b)
    print(f"\nDDPM++ cifar10: additive {n_additive:,} (EDM {EDM_DDPMPP_CIFAR10:,} incl. its "
          f"{EDM_AUGMENT_MAP} augment-map params); ADN {n_adn:,} (+{added:,})")


def test_dit_parameter_counts_match_published():
    counts = {}
    for size in ("s", "b", "l", "xl"):
        n, tree = _count(dit.DiT(**dit.PRESETS[size], num_classes=1000, modulation="adaln"),
                         (1, 32, 32, 4), y=True)
        assert abs(n - DIT_PUBLISHED[size]) < 0.01 * DIT_PUBLISHED[size], (size, n)
        counts[size] = n
    # ADN at XL: each modulation's [E, 3 sites D] (adaLN-Zero) kernel becomes [E, 2 sites D]
    # (ADN scale/shift) + [E, sites D] (gates); every other weight keeps its shape.
    n_adn, adn_tree = _count(dit.DiT(**dit.PRESETS["xl"], num_classes=1000), (1, 32, 32, 4), y=True)
    d = dit.PRESETS["xl"]["hidden_size"]
    mod = tree["block0"]["modulation"]["adaLN_modulation"]["kernel"].shape
    adn_mod = adn_tree["block0"]["modulation"]
    assert mod == (d, 6 * d)
    assert adn_mod["adn_modulation"]["kernel"].shape == (d, 4 * d)
    assert adn_mod["gate"]["kernel"].shape == (d, 2 * d)
    added = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(adn_mod)) - (d + 1) * 6 * d
    assert n_adn - counts["xl"] == dit.PRESETS["xl"]["depth"] * added == 0
    # QK norm adds a gain per head dimension for q and k in every block; the guidance input a
    # linear layer noise_channels -> D.
    s = dit.PRESETS["s"]
    guided = dit.DiT(**s, num_classes=1000, qk_norm=True, guidance_input=True)
    n_guided, _ = _count(guided, (1, 32, 32, 4), y=True)
    head_dim = s["hidden_size"] // s["num_heads"]
    expected = s["depth"] * 2 * head_dim + (guided.noise_channels + 1) * s["hidden_size"]
    assert n_guided - counts["s"] == expected
    print("\nDiT adaLN-Zero: " + ", ".join(f"{k.upper()}/2 {v:,}" for k, v in counts.items())
          + f"; XL/2 ADN {n_adn:,}")


@pytest.mark.parametrize("name", ["ddpmpp", "dit"])
def test_weights_carry_logical_axis_names(name):
    module = _module(name, num_classes=10, guidance_input=True)
    x, t, y, g = _inputs(jax.random.PRNGKey(0), SHAPES[name], num_classes=10, guided=True)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, y, g)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
    for a in leaves:
        assert len(a.names) == a.value.ndim and set(a.names) <= set(sharding.WEIGHT_AXES)
    label = boxed["map_label" if name == "ddpmpp" else "y_embed"]["embedding"]
    assert label.names == ("vocab", "embed_out") and label.value.shape[0] == 11
    if name == "ddpmpp":
        conv = boxed["enc_16x16_block0"]["conv0"]["kernel"]
        assert conv.names == ("conv_height", "conv_width", "embed_in", "embed_out")


def test_ddpmpp_dropout_only_up_to_max_resolution():
    module = _module("ddpmpp", dropout=0.5, dropout_max_resolution=8)
    x, t, _, _ = _inputs(jax.random.PRNGKey(0), SHAPES["ddpmpp"])
    params = _random_params(module, x, t)
    run = jax.jit(lambda k: module.apply({"params": params}, x, t, train=True, rngs={"dropout": k},
                                         capture_intermediates=True, mutable=["intermediates"]))
    (out_a, state_a), (out_b, state_b) = run(jax.random.PRNGKey(2)), run(jax.random.PRNGKey(3))
    inter_a, inter_b = state_a["intermediates"], state_b["intermediates"]
    # 16x16 blocks (before any 8x8 block) do not drop; the first 8x8 block does.
    np.testing.assert_array_equal(inter_a["enc_16x16_block0"]["__call__"][0],
                                  inter_b["enc_16x16_block0"]["__call__"][0])
    assert not np.allclose(inter_a["enc_8x8_down"]["__call__"][0],
                           inter_b["enc_8x8_down"]["__call__"][0])
    assert not np.allclose(out_a, out_b)


def test_dit_adn_block_starts_as_identity():
    """ADN scale/shift are unit-RMS per sample, gates zero: the block is exactly the identity."""
    key = jax.random.PRNGKey(np.random.randint(1 << 30))
    x = jax.random.normal(key, (2, 6, 16))
    c = jax.random.normal(jax.random.fold_in(key, 1), (2, 24))
    block = dit.DiTBlock(num_heads=2)
    out = jax.jit(lambda x, c: block.apply(block.init(key, x, c, train=False), x, c, train=False))
    np.testing.assert_array_equal(out(x, c), x)
    mod = dit.Modulation(16, 2, True)
    sites = jax.jit(lambda c: mod.apply(mod.init(key, c), c))(c)
    for shift, scale, gate in sites:
        for a in (shift, scale):
            np.testing.assert_allclose(jnp.sqrt(jnp.mean(a**2, axis=-1)), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(gate, 0.0)
    assert not np.allclose(sites[0][1], sites[1][1])
    # The position embedding: the first half encodes the row only, the second the column only.
    pos = dit.sincos_position_embedding(3, 4, 16).reshape(3, 4, 16)
    assert np.all(pos[:, :, :8] == pos[:, :1, :8]) and np.all(pos[:, :, 8:] == pos[:1, :, 8:])
    assert len(np.unique(pos.reshape(12, 16).round(12), axis=0)) == 12


def test_errors_name_the_bad_value():
    net = _module("dit", patch_size=3)
    x = jnp.zeros((2, 8, 8, 4))
    t = jnp.ones((2,))
    with pytest.raises(ValueError, match=r"patch_size 3 .*8x8"):
        init(net, x, t)
    for name in ("ddpmpp", "dit"):
        x = jnp.zeros(SHAPES[name])
        cond = _module(name, num_classes=10)
        plain = _module(name)
        with pytest.raises(ValueError, match="class-conditional"):
            init(cond, x, t)
        with pytest.raises(ValueError, match="unconditional"):
            init(plain, x, t, jnp.zeros((2,), jnp.int32))
        with pytest.raises(ValueError, match="guidance"):
            init(plain, x, t, None, t)
        with pytest.raises(ValueError, match="guidance"):
            init(_module(name, guidance_input=True), x, t)
        with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
            init(plain, x[0], t)
        with pytest.raises(ValueError, match="t of shape"):
            init(plain, x, t[:1])
        with pytest.raises(ValueError, match="modulation"):
            init(_module(name, modulation="film"), x, t)
    with pytest.raises(ValueError, match=r"15x15 is not divisible by 2"):
        init(_module("ddpmpp"), jnp.zeros((2, 15, 15, 3)), t)



@pytest.mark.parametrize("name", ["ddpmpp", "dit"])
def test_from_config(name):
    lib = ddpmpp if name == "ddpmpp" else dit
    preset = dict(lib.PRESETS["xs"])
    preset.pop("dropout", None)
    model = ml_collections.ConfigDict(dict(
        preset, num_classes=10, guidance_input=True, attention_impl="xla",
        **({"noise_channels": 16, "emb_channels": 32, "dropout_max_resolution": 16,
            "modulation": "adn"} if name == "ddpmpp" else
           {"mlp_ratio": 4.0, "qk_norm": True, "modulation": "adaln"})))
    for key in lib.CONFIG_KEYS:
        assert key in model
    net = lib.from_config(model, dropout=0.2, dtype=jnp.bfloat16)
    assert net.dropout == 0.2 and net.dtype == jnp.bfloat16 and net.num_classes == 10
    assert net.modulation == model.modulation
    del model["num_heads"]
    with pytest.raises(ValueError, match="num_heads"):
        lib.from_config(model, dropout=0.0, dtype=jnp.float32)
