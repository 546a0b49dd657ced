"""Shared test helpers: tiny random networks in float32 or float64."""
import functools
import os

import jax
import jax.numpy as jnp

from scm_jax.networks import UNet, bind_apply


@functools.lru_cache(maxsize=None)
def tiny_unet(dtype=jnp.float32, num_classes=0, guidance_input=False, dropout=0.0):
    """Cached, so tests that share a configuration share its compiled functions."""
    return UNet(channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                noise_channels=8, emb_channels=16, num_classes=num_classes,
                guidance_input=guidance_input, dropout=dropout, dtype=dtype)


def random_params(module, key, x, t, cond=None, scale=0.3, dtype=jnp.float32):
    """Initialized params plus noise, so zero-initialized layers do not hide any path."""
    cond = cond or {}
    k_init, k_noise = jax.random.split(key)
    params = jax.jit(module.init)(k_init, x, t, cond.get("y"), cond.get("guidance"))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(k_noise, len(leaves))
    leaves = [(p + scale * jax.random.normal(k, p.shape)).astype(dtype) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def tiny_net_fn(dtype=jnp.float32, key=0, batch=3, **kw):
    """(net_fn, params) of a random tiny U-Net on [batch, 8, 8, 1] inputs."""
    module = tiny_unet(dtype=dtype, **kw)
    x = jnp.zeros((batch, 8, 8, 1), dtype)
    t = jnp.ones((batch,), dtype)
    cond = {}
    if kw.get("num_classes"):
        cond["y"] = jnp.zeros((batch,), jnp.int32)
    if kw.get("guidance_input"):
        cond["guidance"] = jnp.ones((batch,), dtype)
    params = random_params(module, jax.random.PRNGKey(key), x, t, cond, dtype=dtype)
    return _bound(dtype, tuple(sorted(kw.items()))), params


@functools.lru_cache(maxsize=None)
def _bound(dtype, kw):
    kw = dict(kw)
    return jax.jit(bind_apply(tiny_unet(dtype=dtype, **kw), train=kw.get("dropout", 0.0) > 0))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(name: str, arg: str | None = None, overrides=()):
    """experiments/<name>.py[:arg] with 'key=value' overrides, through the package's one
    config loader (`configs.load`, as the command line loads it)."""
    from scm_jax import configs

    spec = os.path.join(REPO, "experiments", f"{name}.py") + (f":{arg}" if arg else "")
    return configs.load(spec, overrides)
