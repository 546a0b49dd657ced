"""The feature networks the paper's metrics are defined with, loaded from the user's files and
run on the evaluation mesh.

    'inception'  FID (Heusel et al. 2017): Inception-v3 pool features [B, 2048]   inception.py
    'dinov2'     FD-DINOv2 (Stein et al. 2023; EDM2): DINOv2 ViT-L/14 class token [B, 1024]
                                                                                   dinov2.py

`load(ev)` reads the weights named by `config.eval` (`inception_weights`, `dinov2_weights`; a
converted `.npz` or the original state dict), and `featurizer(networks, mesh, decode)` is one
jitted function from a batch of samples (pixels in [-1, 1], or latents that `decode` turns into
pixels) to every network's features, the batch split over the mesh and the features returned
to every process. Adding a metric's network: a module with `load_params` / `feature_fn`, and
one entry in `NETWORKS` (its metric, its weights' config key, its loader).
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from scm_jax import sharding
from scm_jax.evaluation.pixels import to_uint8
from scm_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    name: str               # 'inception' | 'dinov2'
    metric: str             # 'fid' | 'fd_dinov2'
    dim: int                # feature width
    params: Any             # numpy params (placed on the mesh by `featurizer`)
    fn: Callable            # pure (params, images [B, H, W, 3] in [-1, 1]) -> [B, dim] float32


def _inception(path: str, dtype) -> FeatureNetwork:
    from scm_jax.evaluation import inception

    params = inception.load_params(path)
    return FeatureNetwork("inception", "fid", inception.FEATURE_DIM, params,
                          lambda p, images: inception.feature_fn(p, dtype=dtype)(images))


def _dinov2(path: str, dtype) -> FeatureNetwork:
    from scm_jax.evaluation import dinov2

    params, preset = dinov2.load_params(path)
    return FeatureNetwork("dinov2", "fd_dinov2", int(preset["dim"]), params,
                          lambda p, images: dinov2.feature_fn(p, preset, dtype=dtype)(images))


@dataclasses.dataclass(frozen=True)
class NetworkEntry:
    metric: str                                  # the score it defines
    weights_key: str                             # config.eval key of its weights file
    load: Callable[[str, Any], FeatureNetwork]   # (weights path, compute dtype) -> network


# The registry: every feature network the evaluation knows, by `config.eval.features` name.
NETWORKS = {
    "inception": NetworkEntry("fid", "inception_weights", _inception),
    "dinov2": NetworkEntry("fd_dinov2", "dinov2_weights", _dinov2),
}


def validate(ev, where: str = "eval") -> None:
    """The feature settings of an `eval` section (names, dtype); weights are checked on load."""
    unknown = [n for n in ev.features if n not in NETWORKS]
    if unknown:
        raise ConfigError(f"config.{where}.features = {tuple(ev.features)!r} is invalid: "
                          f"expected names among {tuple(NETWORKS)}")
    if ev.feature_dtype not in DTYPES:
        raise ConfigError(f"config.{where}.feature_dtype = {ev.feature_dtype!r} is invalid: "
                          f"expected one of {tuple(DTYPES)}")


def load(ev) -> list:
    """[FeatureNetwork] of `ev.features`, weights read from `ev.<name>_weights` (a missing file
    is a MissingInputError naming it and where to get it)."""
    validate(ev)
    dtype = DTYPES[ev.feature_dtype]
    return [NETWORKS[name].load(ev[NETWORKS[name].weights_key], dtype) for name in ev.features]


def featurizer(networks, mesh, decode: Callable | None = None, decode_params=None):
    """featurize(samples, with_images=False) -> ({name: [B, dim] float32}, uint8 images or None),
    every array whole on every process.

    samples: [B, ...] with B divisible by the mesh's batch devices; `decode(decode_params,
    samples) -> images [B, H, W, 3] in [-1, 1]` (the VAE for latent models), identity when None.
    with_images=True also returns the images as uint8 [B, H, W, C] (grids, saved samples).
    Parameters are replicated over the mesh once; one compile per batch shape and flag.
    """
    repl, split = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    params = jax.device_put(tuple(n.params for n in networks), repl)
    dparams = jax.device_put(decode_params, repl) if decode is not None else None
    fns = tuple(n.fn for n in networks)
    names = tuple(n.name for n in networks)

    def run(params, dparams, samples, with_images):
        images = samples if decode is None else decode(dparams, samples)
        images = jax.lax.with_sharding_constraint(images, split)
        feats = {name: fn(p, images).astype(jnp.float32) for name, fn, p in zip(names, fns, params)}
        return feats, (to_uint8(images) if with_images else None)

    jitted = jax.jit(run, out_shardings=repl, static_argnums=(3,))
    return lambda samples, with_images=False: jitted(params, dparams, samples, with_images)
