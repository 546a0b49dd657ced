"""The U-Net and its sCM layers: positional embedding, ADN, conditioning, dropout, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.networks import build_network, layers
from tests.helpers import load_experiment, random_params, tiny_unet


def test_positional_embedding_formula():
    c = jnp.asarray(np.random.uniform(0, 1.6, 5), jnp.float32)
    emb = layers.positional_embedding(c, 8)
    freqs = (1 / 10000.0) ** (np.arange(4) / 3)
    expected = np.concatenate([np.cos(np.outer(c, freqs)), np.sin(np.outer(c, freqs))], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    # Bounded derivative in t: |d emb/dt| <= max frequency = 1 (the "s ~ 0.02" regime of Sec. 4.1).
    d = jax.jacfwd(lambda x: layers.positional_embedding(x, 64))(c)
    assert float(jnp.max(jnp.abs(d))) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="even width"):
        layers.positional_embedding(c, 7)


def test_adaptive_double_norm_matches_formula():
    key = jax.random.PRNGKey(np.random.randint(1 << 30))
    h = jax.random.normal(key, (2, 4, 4, 16)) * 3 + 1
    emb = jax.random.normal(jax.random.fold_in(key, 1), (2, 32))
    adn = layers.AdaptiveDoubleNorm(groups=4)
    params = adn.init(key, h, emb)
    out = adn.apply(params, h, emb)
    # norm(h): GroupNorm without affine; s, b from one Dense; pnorm over channels; no "+1".
    g = h.reshape(2, 4, 4, 4, 4)
    normed = ((g - g.mean(axis=(1, 2, 4), keepdims=True))
              / jnp.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)).reshape(h.shape)
    dense = params["params"]["affine"]
    sb = emb @ dense["kernel"] + dense["bias"]
    s, b = sb[:, :16], sb[:, 16:]
    pn = lambda a: a / jnp.sqrt(jnp.mean(a**2, -1, keepdims=True) + 1e-8)  # noqa: E731
    expected = normed * pn(s)[:, None, None] + pn(b)[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_unet_shapes_conditioning_and_errors():
    module = tiny_unet(num_classes=10, guidance_input=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
    t = jnp.full((3,), 0.7)
    y = jnp.asarray([1, 2, 10])   # 10 = the null label
    s = jnp.ones((3,))
    params = jax.jit(module.init)(jax.random.PRNGKey(1), x, t, y, s)["params"]
    apply = jax.jit(lambda p, y, s: module.apply({"params": p}, x, t, y, s))
    out = apply(params, y, s)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # The guidance input starts at zero weight (student == teacher at init), then matters.
    np.testing.assert_array_equal(apply(params, y, s), apply(params, y, 3 * s))
    noisy = random_params(module, jax.random.PRNGKey(2), x, t, {"y": y, "guidance": s})
    assert not np.allclose(apply(noisy, y, s), apply(noisy, y, 3 * s))
    assert not np.allclose(apply(noisy, y, s), apply(noisy, (y + 1) % 10, s))
    with pytest.raises(ValueError, match="class-conditional"):
        module.apply({"params": params}, x, t, None, s)
    with pytest.raises(ValueError, match="guidance"):
        module.apply({"params": params}, x, t, y, None)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        module.apply({"params": params}, x[0], t, y, s)
    with pytest.raises(ValueError, match="t of shape"):
        module.apply({"params": params}, x, t[:2], y, s)


def test_dropout_uses_the_given_key():
    module = tiny_unet(dropout=0.5)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    t = jnp.full((2,), 0.5)
    params = random_params(module, jax.random.PRNGKey(1), x, t)
    run = jax.jit(lambda k: module.apply({"params": params}, x, t, train=True,
                                         rngs={"dropout": k}))
    a, b = run(jax.random.PRNGKey(5)), run(jax.random.PRNGKey(5))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, run(jax.random.PRNGKey(6)))


def test_build_network_from_config_and_bad_values():
    config = load_experiment("digits")
    module = build_network(config.model, dropout=0.1)
    assert module.dropout == 0.1 and module.channels == config.model.channels
    config.model.name = "resnet"
    with pytest.raises(ValueError, match="model.name 'resnet'"):
        build_network(config.model)
    config.model.name = "unet"
    with pytest.raises(ValueError, match="dropout"):
        build_network(config.model, dropout=1.5)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        build_network(config.model, dtype="int8")
