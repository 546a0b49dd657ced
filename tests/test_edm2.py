"""The EDM2 U-Net with the sCM changes: MP primitives, forced weight normalization, JVP against
float64 finite differences, EDM2's parameter counts, dropout placement, guidance input, errors."""
import functools

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate

from scm_jax.networks import edm2, mp_layers
from scm_jax.sharding import WEIGHT_AXES

SHAPE = (2, 16, 16, 4)
NUM_CLASSES = 10


@functools.lru_cache(maxsize=None)
def tiny(dtype=jnp.float32, **kw):
    """The 'xs' preset; cached so tests sharing a configuration share compiled functions."""
    return edm2.EDM2UNet(**{**edm2.PRESETS["xs"], "dtype": dtype, **kw})


@functools.lru_cache(maxsize=None)
def jitted_apply(module):
    return jax.jit(lambda p, x, t, y, g: module.apply({"params": p}, x, t, y, g))


def inputs(seed, dtype=jnp.float32, cond=True, guided=True):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k[0], SHAPE, dtype)
    t = jax.random.uniform(k[1], SHAPE[:1], dtype, 0.1, 1.5)
    y = jax.random.randint(k[2], SHAPE[:1], 0, NUM_CLASSES + 1) if cond else None
    g = jax.random.uniform(k[3], SHAPE[:1], dtype, 1.0, 2.0) if guided else None
    return x, t, y, g


def is_mp(path):
    return jax.tree_util.keystr(path).endswith(f"['{mp_layers.MP_WEIGHT}']")


@functools.lru_cache(maxsize=None)
def param_shapes(module):
    """Boxed ShapeDtypeStructs of the params for SHAPE inputs: init traced, never compiled (its RNG
    code is slow to compile, and no test needs init's values)."""
    dtype = module.dtype
    x = jax.ShapeDtypeStruct(SHAPE, dtype)
    t = jax.ShapeDtypeStruct(SHAPE[:1], dtype)
    y = jax.ShapeDtypeStruct(SHAPE[:1], jnp.int32) if module.num_classes else None
    g = jax.ShapeDtypeStruct(SHAPE[:1], dtype) if module.guidance_input else None
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, y, g)["params"]


def random_params(module, seed, dtype=jnp.float32):
    """Random params: N(0, 1) MP weights, gains in [0.5, 1.5], other leaves N(0, 0.3^2), so no
    zero-initialized layer (out_gain, emb_gain, the guidance kernel) hides a path."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if not s.shape:
            return jnp.asarray(rng.uniform(0.5, 1.5), dtype)
        return jnp.asarray(rng.standard_normal(s.shape) * (1.0 if is_mp(path) else 0.3), dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(param_shapes(module)))


def mp_weights(params):
    return {jax.tree_util.keystr(p): w for p, w in jax.tree_util.tree_flatten_with_path(params)[0]
            if is_mp(p)}


def channel_rms(w):
    w = np.asarray(w, np.float64)
    return np.sqrt(np.mean(w.reshape(-1, w.shape[-1]) ** 2, axis=0))


# ------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives
# ------------------------------------------------------------------------------------------------
def test_mp_primitives_preserve_magnitude():
    # 0.596 is sqrt(E[silu(z)^2]) for z ~ N(0, 1) (EDM2 Eq. 81), by quadrature.
    second_moment = integrate.quad(
        lambda z: (z / (1 + np.exp(-z))) ** 2 * np.exp(-z * z / 2) / np.sqrt(2 * np.pi), -40, 40)[0]
    assert abs(np.sqrt(second_moment) / 0.596 - 1) < 1e-3
    rng = np.random.default_rng()
    a, b = rng.standard_normal((2, 4000, 96))
    t = rng.uniform(0.1, 0.9)
    out = np.asarray(mp_layers.mp_sum(a, b, t))
    expected = ((1 - t) * a + t * b) / np.sqrt((1 - t) ** 2 + t ** 2)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    assert abs(np.mean(out ** 2) - 1) < 0.02
    # mp_cat: unit mean square overall, and the parts' energies in the ratio (1 - t)^2 : t^2.
    cat = np.asarray(mp_layers.mp_cat(a[..., :32], b, t))
    assert cat.shape == (4000, 128) and abs(np.mean(cat ** 2) - 1) < 0.02
    ratio = np.sum(cat[:, :32] ** 2) / np.sum(cat[:, 32:] ** 2)
    assert abs(ratio / ((1 - t) ** 2 / t ** 2) - 1) < 0.03
    feats = mp_layers.mp_positional_features(jnp.asarray(rng.uniform(0, 1.6, 7)), 64)
    np.testing.assert_allclose(np.mean(np.asarray(feats) ** 2, axis=-1), 1.0, rtol=1e-5)


def test_mp_conv_matches_float64_reference(x64):
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 6, 5, 7))
    gain = rng.uniform(0.5, 2)
    conv = mp_layers.MPConv(4, (3, 3), dtype=jnp.float64, param_dtype=jnp.float64)
    shape = nn.meta.unbox(jax.eval_shape(conv.init, jax.random.PRNGKey(0), x))["params"]
    w = rng.standard_normal(shape[mp_layers.MP_WEIGHT].shape) * rng.uniform(0.1, 9, 4)
    apply = jax.jit(conv.apply)
    out = apply({"params": {mp_layers.MP_WEIGHT: w}}, x, gain)
    # Reference: w / (1e-4 + rms_out) * gain / sqrt(fan_in) (EDM2 Eqs. 47, 66), "same" padding.
    wn = w / (1e-4 + channel_rms(w)) * gain / np.sqrt(9 * 7)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(np.einsum("bhwi,io->bhwo", xp[:, i:i + 6, j:j + 5], wn[i, j])
              for i in range(3) for j in range(3))
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    # Magnitude preserving: unit-variance white input -> unit-variance output (gain 1).
    big = jnp.asarray(rng.standard_normal((8, 32, 32, 7)))
    interior = np.asarray(apply({"params": {mp_layers.MP_WEIGHT: w}}, big, 1.0))[:, 1:-1, 1:-1]
    assert abs(np.mean(interior ** 2) - 1) < 0.05


def unit_rms(a, axis=-1, eps=1e-4):
    return a / (eps + np.sqrt(np.mean(a ** 2, axis=axis, keepdims=True)))


@pytest.mark.parametrize("kind", ["adn", "edm2"])
def test_modulation_matches_float64_reference(kind, x64):
    rng = np.random.default_rng()
    h, emb = rng.standard_normal((2, 3, 3, 6)) * 2, rng.standard_normal((2, 5))
    mod = edm2.Modulation(kind)
    params = nn.meta.unbox(jax.eval_shape(mod.init, jax.random.PRNGKey(0), h, emb))["params"]
    params = jax.tree.map(lambda v: rng.standard_normal(v.shape), params)
    out = np.asarray(jax.jit(mod.apply)({"params": params}, h, emb))
    w = np.asarray(params["emb_linear"][mp_layers.MP_WEIGHT])
    proj = emb @ (unit_rms(w, axis=0) / np.sqrt(5))
    if kind == "adn":
        # sCM Sec. 4.1: norm(h) * pnorm(s) + pnorm(b), no "+1"; norm = pixel norm over channels.
        pn = lambda a: a / np.sqrt(np.mean(a ** 2, -1, keepdims=True) + 1e-8)  # noqa: E731
        s, b = pn(proj[:, :6])[:, None, None], pn(proj[:, 6:])[:, None, None]
        expected = unit_rms(h) * s + b
    else:
        expected = h * (1 + proj * float(params["emb_gain"]))[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_attention_matches_float64_reference(x64):
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 4, 4, 8))
    attn = edm2.MPSelfAttention(num_heads=2, dtype=jnp.float64)
    params = nn.meta.unbox(jax.eval_shape(attn.init, jax.random.PRNGKey(0), x))["params"]
    params = jax.tree.map(lambda v: rng.standard_normal(v.shape), params)
    out = np.asarray(jax.jit(attn.apply)({"params": params}, x))
    wqkv, wproj = (np.asarray(params[k][mp_layers.MP_WEIGHT])[0, 0] for k in ("qkv", "proj"))
    qkv = (x.reshape(2, 16, 8) @ (unit_rms(wqkv, axis=0) / np.sqrt(8))).reshape(2, 16, 3, 2, 4)
    q, k, v = np.moveaxis(unit_rms(qkv), 2, 0)          # cosine attention: unit RMS per head
    logits = np.einsum("bnhd,bmhd->bhnm", q, k) / 2.0   # / sqrt(head_dim)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    y = np.einsum("bhnm,bmhd->bnhd", p / p.sum(-1, keepdims=True), v).reshape(2, 16, 8)
    expected = (y @ (unit_rms(wproj, axis=0) / np.sqrt(8))).reshape(x.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Forward: shapes, dtypes, logical axes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cond,guided", [(False, False), (True, False), (True, True)])
def test_output_shape_and_dtype(cond, guided):
    module = tiny(num_classes=NUM_CLASSES if cond else 0, guidance_input=guided)
    x, t, y, g = inputs(0, cond=cond, guided=guided)
    out = jax.eval_shape(module.apply, {"params": nn.meta.unbox(param_shapes(module))}, x, t, y, g)
    assert out.shape == SHAPE and out.dtype == jnp.float32


def test_every_input_matters_and_rows_are_independent():
    module = tiny(num_classes=NUM_CLASSES, guidance_input=True)
    x, t, y, g = inputs(0)
    params = random_params(module, 1)
    apply = jitted_apply(module)
    out = apply(params, x, t, y, g)
    assert out.shape == SHAPE and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    y_other = (y + 1) % (NUM_CLASSES + 1)    # index NUM_CLASSES is the null label
    for other in (apply(params, x, t + 0.3, y, g), apply(params, -x, t, y, g),
                  apply(params, x, t, y_other, g), apply(params, x, t, y, g + 1)):
        assert float(jnp.max(jnp.abs(other - out))) > 1e-3
    np.testing.assert_allclose(apply(params, x[::-1], t[::-1], y[::-1], g[::-1]), out[::-1],
                               atol=1e-5)
    # The null label embeds as EDM2's all-zero label vector: the label table does not reach it.
    y = y.at[0].set(NUM_CLASSES).at[1].set(3)
    other_table = {**params, "emb_label": jax.tree.map(lambda w: -w, params["emb_label"])}
    out, changed = apply(params, x, t, y, g), apply(other_table, x, t, y, g)
    np.testing.assert_allclose(changed[0], out[0], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(changed[1] - out[1]))) > 1e-3


def test_low_precision_convs_and_float32_embedding():
    module = tiny(jnp.bfloat16, num_classes=NUM_CLASSES, guidance_input=True)
    x, t, y, g = inputs(0)
    params = param_shapes(module)
    fn = lambda p: module.apply({"params": p}, x, t, y, g)  # noqa: E731
    out = jax.eval_shape(fn, params)
    assert out.shape == SHAPE and out.dtype == jnp.float32
    eqns = jax.make_jaxpr(fn)(nn.meta.unbox(params)).jaxpr.eqns
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    trig = [e for e in eqns if e.primitive.name in ("sin", "cos")]
    assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
    assert trig and all(e.outvars[0].aval.dtype == jnp.float32 for e in trig)


def test_logical_axes_on_every_weight_and_block_activation():
    module = tiny(num_classes=NUM_CLASSES, guidance_input=True)
    x, t, y, g = inputs(0)
    boxed = param_shapes(module)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    for v in leaves:
        assert len(v.names) == v.value.ndim and set(v.names) <= set(WEIGHT_AXES)
        if v.value.ndim == 4:
            assert v.names == ("conv_height", "conv_width", "embed_in", "embed_out")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(boxed))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data")]):
        jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, x, t, y, g))(params)
    # Block outputs carry ("batch", "height", "width", "channels") -> P("data", None, None, None).
    constraints = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "sharding_constraint"
                   and tuple(e.params["sharding"].spec) == ("data", None, None, None)]
    blocks = [k for k in boxed if "_block" in k or k.endswith(("_down", "_up", "_in0", "_in1"))]
    assert len(constraints) == len(blocks) == 10


# ------------------------------------------------------------------------------------------------
# JVP (the sCM tangent pass) against float64 central differences
# ------------------------------------------------------------------------------------------------
def test_jvp_matches_float64_central_difference(x64):
    module = tiny(jnp.float64, num_classes=NUM_CLASSES, guidance_input=True)
    x, t, y, g = inputs(np.random.randint(1 << 30), jnp.float64)
    params = random_params(module, np.random.randint(1 << 30), dtype=jnp.float64)
    k1, k2 = jax.random.split(jax.random.PRNGKey(np.random.randint(1 << 30)))
    dx = jax.random.normal(k1, x.shape, jnp.float64)
    dt = jax.random.normal(k2, t.shape, jnp.float64)
    eps = 1e-5

    @jax.jit
    def tangents_and_differences(params, x, t, dx, dt):
        # Two directions, (dx, dt) and (0, dt), stacked along the batch (rows are independent):
        # one JVP and one forward at (x, t) +- eps (dx, dt) serve both.
        two = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
        X, T, Y, G = two(x, x), two(t, t), two(y, y), two(g, g)
        DX, DT = two(dx, jnp.zeros_like(dx)), two(dt, dt)
        F = lambda x, t, y, g: module.apply({"params": params}, x, t, y, g)  # noqa: E731
        _, tangent = jax.jvp(lambda x, t: F(x, t, Y, G), (X, T), (DX, DT))
        pm = F(two(X + eps * DX, X - eps * DX), two(T + eps * DT, T - eps * DT),
               two(Y, Y), two(G, G))
        plus, minus = jnp.split(pm, 2)
        return tangent, (plus - minus) / (2 * eps)

    tangent, fd = tangents_and_differences(params, x, t, dx, dt)
    assert tangent.dtype == jnp.float64
    np.testing.assert_allclose(tangent, fd, rtol=1e-5, atol=1e-7 * float(jnp.max(jnp.abs(fd))))
    tangent, t_only = jnp.split(tangent, 2)
    # The time path (positional embedding -> ADN) carries a real part of the tangent.
    assert float(jnp.linalg.norm(t_only)) > 1e-3 * float(jnp.linalg.norm(tangent))


# ------------------------------------------------------------------------------------------------
# Forced weight normalization as a projection
# ------------------------------------------------------------------------------------------------
def test_project_params_normalizes_is_idempotent_and_forward_is_invariant():
    module = tiny(num_classes=NUM_CLASSES, guidance_input=True)
    x, t, y, g = inputs(3)
    params = random_params(module, 4)
    rng = np.random.default_rng()
    # Rescale every MP weight per output channel (positive factors): a different raw tree.
    scaled = jax.tree_util.tree_map_with_path(
        lambda p, w: w * rng.uniform(0.2, 5.0, w.shape[-1]).astype(np.float32) if is_mp(p) else w,
        params)
    project = jax.jit(edm2.project_params)
    projected = project(scaled)
    weights = mp_weights(projected)
    assert len(weights) > 20
    for name, w in weights.items():
        raw = np.asarray(mp_weights(scaled)[name], np.float64)
        assert w.dtype == jnp.float32 and np.max(np.abs(channel_rms(raw) - 1)) > 0.1
        # EDM2 Eq. 66 (forced weight normalization): unit RMS per output channel.
        np.testing.assert_allclose(w, raw / channel_rms(raw), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(channel_rms(w), 1.0, rtol=1e-6, err_msg=name)
    # Non-MP leaves (gains, the guidance kernel) pass through untouched.
    before = dict(jax.tree_util.tree_flatten_with_path(scaled)[0])
    others = [(p, w) for p, w in jax.tree_util.tree_flatten_with_path(projected)[0]
              if not is_mp(p)]
    assert {jax.tree_util.keystr(p) for p, _ in others} == {"['emb_guidance']['kernel']",
                                                            "['out_gain']"}
    for p, w in others:
        np.testing.assert_array_equal(w, before[p])
    again = project(projected)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(projected)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    # The forward normalizes its own copy: raw, rescaled and projected weights agree.
    apply = jitted_apply(module)
    out = apply(params, x, t, y, g)
    assert float(jnp.max(jnp.abs(out))) > 1e-2
    for other in (scaled, projected):
        np.testing.assert_allclose(apply(other, x, t, y, g), out, rtol=2e-3, atol=2e-3 * float(
            jnp.max(jnp.abs(out))))


def test_project_params_keeps_boxes_and_dtypes():
    rng = np.random.default_rng()
    shapes = param_shapes(tiny(num_classes=NUM_CLASSES, guidance_input=True))
    shapes = {k: shapes[k] for k in ("enc_16x16_conv", "emb_guidance", "out_gain")}
    boxed = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 3.0, s.dtype), shapes)
    out = edm2.project_params(boxed)
    conv = out["enc_16x16_conv"][mp_layers.MP_WEIGHT]
    assert isinstance(conv, nn.LogicallyPartitioned) and conv.names == boxed["enc_16x16_conv"][
        mp_layers.MP_WEIGHT].names
    np.testing.assert_allclose(channel_rms(conv.value), 1.0, rtol=1e-6)
    for name in ("emb_guidance", "out_gain"):
        for a, b in zip(jax.tree.leaves(out[name]), jax.tree.leaves(boxed[name])):
            np.testing.assert_array_equal(a, b)
    half = edm2.project_params({"a": {mp_layers.MP_WEIGHT: jnp.full((3, 2), 7.0, jnp.bfloat16)},
                                "b": {"kernel": jnp.full((3, 2), 7.0)}})
    assert half["a"][mp_layers.MP_WEIGHT].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half["a"][mp_layers.MP_WEIGHT], np.float32), 1.0,
                               atol=1e-2)
    np.testing.assert_array_equal(half["b"]["kernel"], 7.0)


# ------------------------------------------------------------------------------------------------
# Structure: EDM2's published parameter counts; ADN's extra parameters
# ------------------------------------------------------------------------------------------------
EDM2_IMG512_PARAMS_M = {"s": 280.2, "m": 497.8, "l": 777.6, "xl": 1119.4, "xxl": 1523.4}


def count_params(size, modulation):
    module = edm2.EDM2UNet(**edm2.PRESETS[size], num_classes=1000, modulation=modulation)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 4)),
                            jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes))


def block_widths(preset):
    """Output width of every Block of the U-Net, from the architecture (EDM2 Fig. 21)."""
    mult, nb = preset.get("channel_mult", (1, 2, 3, 4)), preset.get("num_blocks", 3)
    c = [preset["model_channels"] * m for m in mult]
    widths = []
    for level in range(len(c)):
        widths += ([c[level - 1]] if level else []) + [c[level]] * nb        # down, blocks
    widths += [c[-1]] * 2                                                    # in0, in1
    for level in reversed(range(len(c))):
        widths += [c[level + 1]] if level < len(c) - 1 else []                   # up
        widths += [c[level]] * (nb + 1)                                           # blocks
    return widths


@pytest.mark.parametrize("size", ["s", "m", "l", "xl", "xxl"])
def test_parameter_counts_match_edm2(size):
    edm2_count, adn_count = count_params(size, "edm2"), count_params(size, "adn")
    print(f"{size}: edm2 modulation {edm2_count:,}  adn {adn_count:,}")
    assert abs(edm2_count / (EDM2_IMG512_PARAMS_M[size] * 1e6) - 1) < 0.005
    # ADN doubles each block's embedding projection (E x C -> E x 2C) and drops its scalar gain.
    emb = edm2.PRESETS[size]["model_channels"] * 4
    widths = block_widths(edm2.PRESETS[size])
    assert len(widths) == 4 * 3 + 3 + 2 + 3 + 4 * 4
    assert adn_count - edm2_count == sum(emb * w for w in widths) - len(widths)


# ------------------------------------------------------------------------------------------------
# Dropout placement, guidance input, configs, errors
# ------------------------------------------------------------------------------------------------
def count_primitive(jaxpr, name):
    """Occurrences of a primitive in a jaxpr, nested jaxprs (jit, custom_jvp, ...) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += count_primitive(sub, name)
    return n


@pytest.mark.parametrize("max_res,blocks", [(4, 0), (8, 6), (0, 10)])
def test_dropout_masks_only_blocks_at_low_resolution(max_res, blocks):
    # One dropout mask (one random_bits) per block whose convs run at <= max_res (0: all 10).
    # At 8: enc_8x8_{down,block0}, dec_8x8_{in0,in1,block0,block1}; dec_16x16_up runs at 16.
    module = tiny(dropout=0.5, dropout_max_resolution=max_res)
    x, t, _, _ = inputs(0, cond=False, guided=False)
    params = nn.meta.unbox(param_shapes(module))
    def fn(p, key):
        return module.apply({"params": p}, x, t, train=True, rngs={"dropout": key})

    jaxpr = jax.make_jaxpr(fn)(params, jax.random.PRNGKey(0))
    assert count_primitive(jaxpr.jaxpr, "random_bits") == blocks


def test_dropout_changes_only_low_resolution_activations():
    x, t, _, _ = inputs(6, cond=False, guided=False)
    module = tiny(dropout=0.5, dropout_max_resolution=8)
    params = random_params(module, 7)
    run = jax.jit(lambda p, k: module.apply({"params": p}, x, t, train=True, rngs={"dropout": k},
                                            capture_intermediates=True, mutable=["intermediates"]))
    out1, inter1 = run(params, jax.random.PRNGKey(1))
    out2, inter2 = run(params, jax.random.PRNGKey(2))
    first = lambda inter, name: inter["intermediates"][name]["__call__"][0]  # noqa: E731
    np.testing.assert_array_equal(first(inter1, "enc_16x16_block0"),
                                  first(inter2, "enc_16x16_block0"))
    assert not np.allclose(first(inter1, "enc_8x8_down"), first(inter2, "enc_8x8_down"))
    assert not np.allclose(out1, out2)
    # The key is the only randomness: the same key reproduces the output (the sCM passes share it).
    np.testing.assert_array_equal(run(params, jax.random.PRNGKey(1))[0], out1)


def test_zero_guidance_weights_equal_the_unguided_net():
    guided = tiny(num_classes=NUM_CLASSES, guidance_input=True)
    plain = tiny(num_classes=NUM_CLASSES)
    x, t, y, g = inputs(8)
    params = random_params(guided, 9)
    guidance_keys = [k for k in params if "guidance" in k]
    assert guidance_keys == ["emb_guidance"]
    zeroed = {**params, "emb_guidance": jax.tree.map(jnp.zeros_like, params["emb_guidance"])}
    teacher = {k: v for k, v in params.items() if k != "emb_guidance"}
    ref = jitted_apply(plain)(teacher, x, t, y, None)
    np.testing.assert_allclose(jitted_apply(guided)(zeroed, x, t, y, g), ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(jitted_apply(guided)(params, x, t, y, g), ref, atol=1e-3)


def model_config(**overrides):
    return ml_collections.ConfigDict({**dict(
        name="edm2", channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
        channels_per_head=8, num_classes=10, guidance_input=True, attention_impl="xla",
        dropout_max_resolution=16, noise_channels=16, modulation="adn"), **overrides})


def test_from_config():
    module = edm2.from_config(model_config(), dropout=0.2, dtype=jnp.bfloat16)
    assert (module.model_channels, module.channel_mult, module.num_blocks, module.attn_resolutions,
            module.channels_per_head, module.num_classes, module.guidance_input,
            module.dropout_max_resolution, module.noise_channels, module.emb_channels,
            module.modulation, module.dropout, module.dtype) == (
        16, (1, 2), 1, (8,), 8, 10, True, 16, 16, None, "adn", 0.2, jnp.bfloat16)
    x, t, y, g = inputs(0)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, y, g)["params"]
    assert shapes["emb_noise"][mp_layers.MP_WEIGHT].value.shape == (16, 32)   # E = 16 * max(mult)
    assert edm2.from_config(model_config(emb_channels=24), dropout=0.0,
                            dtype=jnp.float32).emb_channels == 24
    cfg = model_config()
    del cfg["channels_per_head"]
    with pytest.raises(ValueError, match="channels_per_head"):
        edm2.from_config(cfg, dropout=0.0, dtype=jnp.float32)
    with pytest.raises(ValueError, match="modulation"):
        edm2.from_config(model_config(modulation="adagn"), dropout=0.0, dtype=jnp.float32)


def test_bad_inputs_raise_clear_errors():
    x, t, y, g = inputs(0)
    cond, plain = tiny(num_classes=NUM_CLASSES, guidance_input=True), tiny()
    init = lambda m, *a: jax.eval_shape(m.init, jax.random.PRNGKey(0), *a)  # noqa: E731
    cases = [
        (plain, (x, t, y, None), "unconditional"),
        (cond, (x, t, None, g), "class-conditional"),
        (cond, (x, t, y.astype(jnp.float32), g), "int labels"),
        (cond, (x, t, y, None), "guidance scale"),
        (plain, (x, t, None, g), "without a guidance input"),
        (cond, (x, t, y, g[:1]), "guidance of shape"),
        (plain, (x, t[:1], None, None), "t of shape"),
        (plain, (x[:, :, :8], t, None, None), "square"),
        (plain, (x[:, :7, :7], t, None, None), "divisible"),
        (tiny(modulation="film"), (x, t, None, None), "modulation"),
        (tiny(attention_impl="cuda"), (x, t, None, None), "attention_impl"),
        (tiny(channels_per_head=12), (x, t, None, None), "channels_per_head"),
    ]
    for module, args, message in cases:
        with pytest.raises(ValueError, match=message):
            init(module, *args)
