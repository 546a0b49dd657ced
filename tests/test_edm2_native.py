"""EDM2-native mode: the package's EDM2UNet, with EDM2's parameters (`edm2_names`), computes the
TrigFlow F of EDM2's published denoiser, F(x_t / sd, t, y) = -F_edm(x_t / sd, ln(sd tan t) / 4,
y), so f(x_t, t) = cos t x_t - sd sin t F = D(x_t / cos t; sd tan t) (Karras et al. 2024; sCM
Eq. 5 and 30, Lu & Song 2025).

The reference below is EDM2's network and preconditioning written again in float64 NumPy from
the paper's equations (EDM2 Eq. 47, 66, 75, 81, 88, 103, Fig. 21) in EDM2's own layout (NCHW,
PyTorch weight shapes, EDM2's state_dict names); it shares no code with the package.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scm_jax.errors import ConfigError
from scm_jax.networks import (edm2, edm2_names, layers, mp_layers, needs_sigma_d, scan,
                              validate_model_config)

SD = 0.57                 # sigma_data; not EDM2's 0.5, so a misplaced sd shows
ARCH = dict(resolution=16, img_channels=4, model_channels=16, channel_mult=(1, 2), num_blocks=1,
            attn_resolutions=(8,), channels_per_head=8, label_dim=10)
pytestmark = pytest.mark.usefixtures("x64_module")


# ------------------------------------------------------------------------------------------------
# EDM2 in float64 NumPy (NCHW, EDM2's names and shapes)
# ------------------------------------------------------------------------------------------------
def normalize(x, axis, eps=1e-4):
    """x / (eps + ||x|| sqrt(norm.size / x.size)) over `axis` (EDM2 Eq. 66 / pixel norm)."""
    norm = np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))
    return x / (eps + norm * np.sqrt(norm.size / x.size))


def mp_conv(x, w, gain=1.0):
    """EDM2 Eq. 47: w normalized per output channel, times gain / sqrt(fan_in); zero padding."""
    w = normalize(w, axis=tuple(range(1, w.ndim))) * (gain / np.sqrt(w[0].size))
    if w.ndim == 2:
        return x @ w.T
    k, (h, wd) = w.shape[-1], x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    return sum(np.einsum("oc,nchw->nohw", w[:, :, a, b], xp[:, :, a:a + h, b:b + wd])
               for a in range(k) for b in range(k))


def mp_silu(x):
    return x / (1 + np.exp(-x)) / 0.596


def mp_sum(a, b, t):
    return ((1 - t) * a + t * b) / np.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t):   # over channels (axis 1)
    na, nb = a.shape[1], b.shape[1]
    c = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return np.concatenate([a * (c / np.sqrt(na) * (1 - t)), b * (c / np.sqrt(nb) * t)], axis=1)


def resample(x, mode):   # filter [1, 1]: 2x2 average down, nearest up
    n, c, h, w = x.shape
    if mode == "down":
        return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
    if mode == "up":
        return x.repeat(2, axis=2).repeat(2, axis=3)
    return x


def block(x, emb, w, name, *, flavor, mode, heads):
    p = lambda k: w.get(f"unet.{name}.{k}")  # noqa: E731
    x = resample(x, mode)
    if flavor == "enc":
        if p("conv_skip.weight") is not None:
            x = mp_conv(x, p("conv_skip.weight"))
        x = normalize(x, axis=1)
    y = mp_conv(mp_silu(x), p("conv_res0.weight"))
    c = mp_conv(emb, p("emb_linear.weight"), gain=p("emb_gain")) + 1
    y = mp_conv(mp_silu(y * c[:, :, None, None]), p("conv_res1.weight"))
    if flavor == "dec" and p("conv_skip.weight") is not None:
        x = mp_conv(x, p("conv_skip.weight"))
    x = mp_sum(x, y, 0.3)
    if heads:
        n, ch, h, wd = x.shape
        qkv = normalize(mp_conv(x, p("attn_qkv.weight")).reshape(n, heads, -1, 3, h * wd), axis=2)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        logits = np.einsum("nhcq,nhck->nhqk", q, k / np.sqrt(q.shape[2]))
        a = np.exp(logits - logits.max(axis=3, keepdims=True))
        a /= a.sum(axis=3, keepdims=True)
        y = np.einsum("nhqk,nhck->nhcq", a, v).reshape(n, ch, h, wd)
        x = mp_sum(x, mp_conv(y, p("attn_proj.weight")), 0.3)
    return np.clip(x, -256, 256)


def architecture(resolution, img_channels, model_channels, channel_mult, num_blocks,
                 attn_resolutions, channels_per_head, label_dim):
    """EDM2's UNet modules in order: (name, in, out, settings) for the encoder and decoder."""
    cblock = [model_channels * m for m in channel_mult]
    enc, dec, cout = [], [], img_channels + 1
    for level, ch in enumerate(cblock):
        res = resolution >> level
        if level == 0:
            enc.append((f"enc.{res}x{res}_conv", cout, ch, None))
            cout = ch
        else:
            enc.append((f"enc.{res}x{res}_down", cout, cout, dict(flavor="enc", mode="down")))
        for i in range(num_blocks):
            enc.append((f"enc.{res}x{res}_block{i}", cout, ch,
                        dict(flavor="enc", mode="keep", attn=res in attn_resolutions)))
            cout = ch
    skips = [out for _, _, out, _ in enc]
    for level, ch in reversed(list(enumerate(cblock))):
        res = resolution >> level
        if level == len(cblock) - 1:
            dec += [(f"dec.{res}x{res}_in0", cout, cout,
                     dict(flavor="dec", mode="keep", attn=True)),
                    (f"dec.{res}x{res}_in1", cout, cout, dict(flavor="dec", mode="keep"))]
        else:
            dec.append((f"dec.{res}x{res}_up", cout, cout, dict(flavor="dec", mode="up")))
        for i in range(num_blocks + 1):
            dec.append((f"dec.{res}x{res}_block{i}", cout + skips.pop(), ch,
                        dict(flavor="dec", mode="keep", attn=res in attn_resolutions)))
            cout = ch
    return enc, dec, cout


def edm2_shapes(arch):
    """EDM2's Precond state_dict shapes (the U-Net's and the logvar head's)."""
    enc, dec, cout = architecture(**arch)
    cnoise = arch["model_channels"] * arch["channel_mult"][0]
    cemb = arch["model_channels"] * max(arch["channel_mult"])
    shapes = {"unet.emb_fourier.freqs": (cnoise,), "unet.emb_fourier.phases": (cnoise,),
              "unet.emb_noise.weight": (cemb, cnoise),
              "unet.emb_label.weight": (cemb, arch["label_dim"]),
              "unet.out_conv.weight": (arch["img_channels"], cout, 3, 3), "unet.out_gain": (),
              "logvar_fourier.freqs": (128,), "logvar_fourier.phases": (128,),
              "logvar_linear.weight": (1, 128)}
    for name, cin, out, s in enc + dec:
        p = f"unet.{name}."
        if s is None:
            shapes[p + "weight"] = (out, cin, 3, 3)
            continue
        shapes.update({p + "emb_gain": (), p + "emb_linear.weight": (out, cemb),
                       p + "conv_res0.weight": (out, out if s["flavor"] == "enc" else cin, 3, 3),
                       p + "conv_res1.weight": (out, out, 3, 3)})
        if cin != out:
            shapes[p + "conv_skip.weight"] = (out, cin, 1, 1)
        if s.get("attn"):
            shapes[p + "attn_qkv.weight"] = (3 * out, out, 1, 1)
            shapes[p + "attn_proj.weight"] = (out, out, 1, 1)
    return shapes


def edm2_state(arch, seed=0):
    """Random EDM2 weights: N(0, 1) weights, gains in [0.5, 1.5] (no zero gain hides a path),
    MPFourier buffers drawn as EDM2 draws them."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in edm2_shapes(arch).items():
        if name.endswith("freqs"):
            state[name] = 2 * np.pi * rng.standard_normal(shape)
        elif name.endswith("phases"):
            state[name] = 2 * np.pi * rng.random(shape)
        else:
            state[name] = rng.uniform(0.5, 1.5, shape) if not shape else rng.standard_normal(shape)
    return state


def edm2_unet(w, x, c_noise, labels, arch):
    """F_edm(x, c_noise, labels): x [N, C, R, R], c_noise [N], labels [N, label_dim] one-hot."""
    emb = np.cos(np.outer(c_noise, w["unet.emb_fourier.freqs"]) + w["unet.emb_fourier.phases"])
    emb = mp_conv(emb * np.sqrt(2), w["unet.emb_noise.weight"])
    emb = mp_sum(emb, mp_conv(labels * np.sqrt(labels.shape[1]), w["unet.emb_label.weight"]), 0.5)
    emb = mp_silu(emb)
    enc, dec, _ = architecture(**arch)
    heads = lambda s, out: out // arch["channels_per_head"] if s.get("attn") else 0  # noqa: E731
    x, skips = np.concatenate([x, np.ones_like(x[:, :1])], axis=1), []
    for name, _, out, s in enc:
        x = (mp_conv(x, w[f"unet.{name}.weight"]) if s is None else
             block(x, emb, w, name, flavor=s["flavor"], mode=s["mode"], heads=heads(s, out)))
        skips.append(x)
    for name, _, out, s in dec:
        if "block" in name:
            x = mp_cat(x, skips.pop(), 0.5)
        x = block(x, emb, w, name, flavor=s["flavor"], mode=s["mode"], heads=heads(s, out))
    return mp_conv(x, w["unet.out_conv.weight"], gain=w["unet.out_gain"])


def edm2_denoiser(w, x, sigma, labels, arch, sd=SD):
    """EDM2's Precond: D(x; sigma) = c_skip x + c_out F_edm(c_in x, ln(sigma) / 4, labels)."""
    s = sigma[:, None, None, None]
    c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2)
    c_in = 1 / np.sqrt(sd ** 2 + s ** 2)
    return c_skip * x + c_out * edm2_unet(w, c_in * x, np.log(sigma) / 4, labels, arch)


# ------------------------------------------------------------------------------------------------
# The package's network
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def native(num_blocks=1, scan_blocks=False):
    return edm2.EDM2UNet(model_channels=16, channel_mult=(1, 2), num_blocks=num_blocks,
                         attn_resolutions=(8,), channels_per_head=8, num_classes=10, sigma_d=SD,
                         scan_blocks=scan_blocks, dtype=jnp.float64, **edm2.NATIVE)


@functools.lru_cache(maxsize=None)
def apply_fn(module):
    return jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))


def inputs(seed, batch=3):
    """x_t = cos t x0 + sin t z (sd-scaled) [B, R, R, C], t in (0, pi/2), labels incl. null."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.02, np.pi / 2 - 0.02, batch)
    shape = (batch, ARCH["resolution"], ARCH["resolution"], ARCH["img_channels"])
    x0, z = SD * rng.standard_normal(shape), SD * rng.standard_normal(shape)
    x_t = np.cos(t)[:, None, None, None] * x0 + np.sin(t)[:, None, None, None] * z
    y = np.append(rng.integers(0, 10, batch - 1), 10)   # 10: the null label, EDM2's zeros
    return x_t, t, y


def to_nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


def one_hot(y):
    return np.eye(11)[y][:, :10]


def check_against_edm2(module, arch, seed):
    state = edm2_state(arch, seed)
    params = edm2_names.params_from_edm2(state, module)
    x_t, t, y = inputs(seed)
    F = np.asarray(apply_fn(module)(params, jnp.asarray(x_t / SD), jnp.asarray(t), jnp.asarray(y)))
    assert F.dtype == np.float64
    F_edm = edm2_unet(state, to_nchw(x_t / SD), np.log(SD * np.tan(t)) / 4, one_hot(y), arch)
    np.testing.assert_allclose(to_nchw(F), -F_edm, rtol=0, atol=1e-10 * np.abs(F_edm).max())
    c, s = (v[:, None, None, None] for v in (np.cos(t), np.sin(t)))
    f = to_nchw(c * x_t - s * SD * F)
    D = edm2_denoiser(state, to_nchw(x_t) / c, SD * np.tan(t), one_hot(y), arch)
    np.testing.assert_allclose(f, D, rtol=0, atol=1e-10 * np.abs(D).max())
    return state, params


def test_native_network_is_edm2_negated_and_f_is_edm2_denoiser():
    check_against_edm2(native(), ARCH, seed=1)


def test_scanned_and_unrolled_mappings_agree():
    arch = {**ARCH, "num_blocks": 2}   # runs of two or more equal blocks exist
    state, scanned = check_against_edm2(native(2, scan_blocks=True), arch, seed=2)
    assert scan.is_scanned_tree(scanned)
    unrolled = edm2_names.params_from_edm2(state, native(2))
    assert not scan.is_scanned_tree(unrolled)
    as_unrolled = scan.convert_like(scanned, unrolled, stack=np.stack, take=lambda v, k: v[k])
    jax.tree.map(np.testing.assert_array_equal, as_unrolled, unrolled)
    for params in (scanned, unrolled):
        back = edm2_names.params_to_edm2(params, native(2, scan_blocks=True))
        assert set(back) == {k for k in state if k.startswith("unet.")}
        for k, v in back.items():
            np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_round_trip_and_qkv_permutation():
    state = edm2_state(ARCH, seed=3)
    params = edm2_names.params_from_edm2(state, native())
    back = edm2_names.params_to_edm2(params, native())
    assert set(back) == {k for k in state if not k.startswith("logvar_")}
    for k, v in back.items():
        assert v.shape == state[k].shape and v.dtype == state[k].dtype
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    again = edm2_names.params_from_edm2(back, native())
    jax.tree.map(np.testing.assert_array_equal, again, params)
    # Ours [3, heads, cph] vs EDM2's [heads, cph, 3] along qkv's output channels (C=32, cph=8).
    perm = edm2_names.qkv_permutation(32, 8)
    assert sorted(perm) == list(range(96))
    which, head, c = 1, 2, 5
    assert perm[which * 32 + head * 8 + c] == head * 24 + c * 3 + which
    ours = params["enc_8x8_block0"]["attn"]["qkv"]["mp_weight"]
    theirs = state["unet.enc.8x8_block0.attn_qkv.weight"]
    np.testing.assert_array_equal(ours[0, 0, :, which * 32 + head * 8 + c],
                                  theirs[head * 24 + c * 3 + which, :, 0, 0])


def test_bad_states_are_refused():
    state = edm2_state(ARCH, seed=4)
    key = "unet.enc.8x8_block0.conv_res0.weight"
    cases = [({k: v for k, v in state.items() if k != key}, rf"missing {key} \(32, 32, 3, 3\)"),
             ({**state, key: state[key].transpose(0, 1, 3, 2)[:, :16]},
              rf"{key} has shape \(32, 16, 3, 3\), expected \(32, 32, 3, 3\)"),
             ({**state, "unet.enc.8x8_block7.emb_gain": np.float64(1)},
              r"unexpected unet\.enc\.8x8_block7\.emb_gain \(\)"),
             ({k: v for k, v in state.items() if not k.endswith("16x16_conv.weight")},
              r"unet\.enc\.\{R\}x\{R\}_conv\.weight")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            edm2_names.params_from_edm2(bad, native())
    with pytest.raises(ValueError, match=r"concat_balance=0\.3 \(EDM2: 0\.5\)"):
        edm2_names.params_from_edm2(state, native().clone(concat_balance=0.3))
    with pytest.raises(ValueError, match="guidance input"):
        edm2_names.params_from_edm2(state, native().clone(guidance_input=True))
    params = edm2_names.params_from_edm2(state, native())
    del params["out_conv"]
    with pytest.raises(ValueError, match=r"missing out_conv/mp_weight \(3, 3, 16, 4\)"):
        edm2_names.params_to_edm2(params, native())


def test_default_network_is_unchanged():
    """Absent switches build today's network: its parameter tree (names and shapes) and the
    config's reading are as before EDM2-native mode existed."""
    module = edm2.EDM2UNet(**edm2.PRESETS["xs"], num_classes=10, guidance_input=True)
    assert (module.time_transform, module.time_embedding, module.negate_output,
            module.concat_balance, module.modulation) == (
        "identity", "positional", False, 0.3, "adn")
    x = jax.ShapeDtypeStruct((1, 16, 16, 4), jnp.float32)
    t, y = jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, y, t)["params"]
    leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes))[0]
    names = {"/".join(k.key for k in p) for p, _ in leaves}
    assert (len(leaves), sum(int(np.prod(v.shape)) for _, v in leaves)) == (49, 190545)
    assert not any("fourier" in n for n in names)
    cfg = model_config()
    built = edm2.from_config(cfg, dropout=0.0, dtype=jnp.float32)
    assert (built.time_transform, built.time_embedding, built.negate_output, built.sigma_d,
            built.concat_balance) == ("identity", "positional", False, None, 0.3)
    assert not needs_sigma_d(cfg)


# ------------------------------------------------------------------------------------------------
# The time path: MPFourier, the tangent
# ------------------------------------------------------------------------------------------------
def test_mp_fourier_buffers_are_fixed_and_get_no_gradient():
    x_t, t, y = inputs(5)
    shapes = jax.eval_shape(native().init, jax.random.PRNGKey(0), jnp.asarray(x_t),
                            jnp.asarray(t), jnp.asarray(y))["params"]
    assert {k: v.value.shape for k, v in shapes["emb_fourier"].items()} == {
        "freqs": (16,), "phases": (16,)}
    fourier, c = mp_layers.MPFourier(16), jnp.asarray(np.log(SD * np.tan(t)) / 4)
    first, second = (fourier.init(jax.random.PRNGKey(k), c)["params"] for k in (0, 1))
    freqs, phases = mp_layers.mp_fourier_buffers(16)
    for params in (first, second):   # a fixed seed, not the init key
        np.testing.assert_array_equal(params["freqs"].value, np.float32(freqs))
        np.testing.assert_array_equal(params["phases"].value, np.float32(phases))
    np.testing.assert_allclose(fourier.apply({"params": first}, c), np.sqrt(2) * np.cos(
        np.outer(c, np.float32(freqs)) + np.float32(phases)), rtol=0, atol=1e-12)
    grad = jax.grad(lambda p: jnp.sum(fourier.apply({"params": p}, c) ** 2))(
        nn.meta.unbox(first))
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad))


def test_jvp_in_t_matches_finite_differences_and_edm2():
    """d F / dt of the native network: jax.jvp against a float64 central difference of the same
    network and, through c_noise, of the NumPy EDM2. The rearranged tangent of the time input
    (sCM Sec. 5.1: t tangent cos t sin t) is cos t sin t d c_noise/dt = 1/4 at every t."""
    module, state = native(), edm2_state(ARCH, 6)
    params = edm2_names.params_from_edm2(state, module)
    x_t, _, y = inputs(6)
    t = np.array([0.05, 0.8, 1.55])
    u, yj = jnp.asarray(x_t / SD), jnp.asarray(y)
    cs = np.cos(t) * np.sin(t)
    F = lambda tt: module.apply({"params": params}, u, tt, yj)  # noqa: E731
    _, tangent = jax.jit(lambda tt, dt: jax.jvp(F, (tt,), (dt,)))(jnp.asarray(t), jnp.asarray(cs))
    eps = 1e-6
    fd = (apply_fn(module)(params, u, jnp.asarray(t + eps * cs), yj)
          - apply_fn(module)(params, u, jnp.asarray(t - eps * cs), yj)) / (2 * eps)
    scale = np.abs(np.asarray(fd)).max()
    np.testing.assert_allclose(tangent, fd, rtol=0, atol=1e-6 * scale)
    # -(1/4) dF_edm/dc_noise, the EDM2 network's own derivative in its time input.
    c_noise, h = np.log(SD * np.tan(t)) / 4, 1e-6
    edm = lambda c: edm2_unet(state, to_nchw(x_t / SD), c, one_hot(y), ARCH)  # noqa: E731
    expected = -0.25 * (edm(c_noise + h) - edm(c_noise - h)) / (2 * h)
    np.testing.assert_allclose(to_nchw(np.asarray(tangent)), expected, rtol=0, atol=1e-6 * scale)
    assert np.abs(np.asarray(tangent)).max() > 1e-3
    # The factor over (0, pi/2): cos t sin t d c_noise/dt = 1/4; sin t d c_noise/dt = 1/(4 cos t).
    grid = jnp.linspace(1e-4, np.pi / 2 - 1e-4, 2001)
    _, dc = jax.jvp(lambda tt: layers.noise_conditioning(tt, "edm", SD), (grid,),
                    (jnp.cos(grid) * jnp.sin(grid),))
    assert np.abs(np.asarray(dc) - 0.25).max() < 1e-12
    unrearranged = np.asarray(dc) / np.cos(np.asarray(grid))
    assert unrearranged.max() > 1e3 * unrearranged.min()


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def model_config(**overrides):
    return ml_collections.ConfigDict({**dict(
        name="edm2", channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
        channels_per_head=8, num_classes=10, guidance_input=False, attention_impl="xla",
        dropout_max_resolution=0, noise_channels=0, modulation="edm2", dtype="float32",
        dropout=0.0), **overrides})


def test_config_switches():
    built = edm2.from_config(model_config(edm2_native=True, sigma_d=SD), dropout=0.0,
                             dtype=jnp.float64)
    assert not edm2.native_mismatches(built) and built.sigma_d == SD
    assert needs_sigma_d(model_config(edm2_native=True))
    assert needs_sigma_d(model_config(time_transform="edm"))
    for ok in (dict(edm2_native=True), dict(edm2_native=True, time_transform="edm",
                                            time_embedding="mp_fourier"),
               dict(edm2_native=False), dict(time_transform="edm", modulation="adn"),
               dict(time_embedding="mp_fourier")):
        validate_model_config(model_config(**ok))
    one = edm2.from_config(model_config(time_embedding="mp_fourier"), dropout=0.0,
                           dtype=jnp.float32)
    assert (one.time_embedding, one.time_transform, one.negate_output) == (
        "mp_fourier", "identity", False)
    bad = [(dict(edm2_native=True, modulation="adn"),
            r"model\.modulation = 'adn' contradicts config\.model\.edm2_native = True: "
            r"expected 'edm2'"),
           (dict(edm2_native=True, time_transform="identity"),
            r"model\.time_transform = 'identity' contradicts .* expected 'edm'"),
           (dict(edm2_native=True, time_embedding="positional"),
            r"model\.time_embedding = 'positional' contradicts .* expected 'mp_fourier'"),
           (dict(edm2_native="yes"), r"model\.edm2_native = 'yes' is invalid: expected True"),
           (dict(time_embedding="fourier"),
            r"model\.time_embedding = 'fourier' is supported by the 'unet' backbone only"),
           (dict(time_embedding="sinusoid"), r"model\.time_embedding = 'sinusoid' is invalid")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate_model_config(model_config(**overrides))
    unet = ml_collections.ConfigDict(dict(name="unet", attention_impl="xla", dtype="float32",
                                          dropout=0.0))
    for key, value in (("edm2_native", True), ("time_embedding", "mp_fourier")):
        with unet.unlocked():
            unet[key] = value
        with pytest.raises(ConfigError, match=rf"model\.{key} = {value!r} is supported by the "
                                              r"'edm2' backbone only"):
            validate_model_config(unet)
        del unet[key]
    ddpmpp = model_config(name="ddpmpp", time_transform="edm")
    with pytest.raises(ConfigError, match=r"'edm' is supported by the 'unet' backbone only, "
                                          r"and by 'edm2'"):
        validate_model_config(ddpmpp)
    with pytest.raises(ValueError, match="needs sigma_d"):
        module = edm2.from_config(model_config(edm2_native=True), dropout=0.0, dtype=jnp.float32)
        x_t, t, y = inputs(0)
        jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(x_t, jnp.float32),
                       jnp.asarray(t, jnp.float32), jnp.asarray(y))
