"""Backbones behind one interface.

Every backbone is a Flax linen module called as
`module.apply({'params': p}, x, t, y=None, guidance=None, train=..., rngs={'dropout': key})`
with x: [B, H, W, C] (already divided by sigma_d), t: [B] TrigFlow times, y: [B] int labels,
guidance: [B] CFG scales; it returns F with x's shape, in float32.
"""
import jax.numpy as jnp
import ml_collections

from scm_jax.errors import ConfigError
from scm_jax.networks.attention import check_attention_impl
from scm_jax.networks.layers import (MODULATIONS, REMAT_MODES, TIME_EMBEDDINGS, TIME_TRANSFORMS,
                                    AdaptiveWeight)
from scm_jax.networks import ddpmpp, dit, edm2, edm2_names, unet
from scm_jax.networks.scan import init_like_unrolled
from scm_jax.networks.unet import UNet

# name -> module exposing from_config(model, *, dropout, dtype) and, optionally, PRESETS and
# project_params(params) (a projection applied after every optimizer step).
BACKBONES = {"unet": unet, "ddpmpp": ddpmpp, "edm2": edm2, "dit": dit}
SCANNING_BACKBONES = ("ddpmpp", "edm2", "dit")   # those with `model.scan_blocks`
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_network(model: ml_collections.ConfigDict, *, dropout: float | None = None,
                  dtype: str | None = None):
    """Builds the backbone named by `model.name` from the config's `model` section.

    `dropout` overrides `model.dropout` (each training stage sets its own rate); `dtype` overrides
    the compute dtype (e.g. a float32 tangent pass for a bfloat16 model).
    """
    dtype = model.dtype if dtype is None else dtype
    if model.name not in BACKBONES:
        raise ConfigError(f"unknown model.name {model.name!r}; expected one of {sorted(BACKBONES)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown model dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    check_attention_impl(model.attention_impl)
    rate = model.dropout if dropout is None else dropout
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {rate}")
    return BACKBONES[model.name].from_config(model, dropout=rate, dtype=DTYPES[dtype])


# Entries of config.model that do not change what a checkpoint's parameters mean: how the
# network is computed (dtype, attention kernel, rematerialization) and regularized (dropout).
# (The stabilizer switches below do change it, so they are not here.)
# `scan_blocks` changes the parameters' layout, not their meaning: a checkpoint restores into
# the other layout (`networks.scan.convert_like`).
NON_IDENTITY_KEYS = ("attention_impl", "dtype", "dropout", "dropout_max_resolution", "remat",
                     "scan_blocks")

# The sCM Sec. 4.1 architecture switches, for ablations, and EDM2's own network: key ->
# (allowed values, the default (the paper's choice), {backbone: the non-default values it
# implements}); a backbone not listed implements the default alone. A key absent from
# config.model means its default (also for checkpoints written before the key existed).
#   time_transform   'identity': c_noise(t) = t (paper) | 'edm': ln(sigma_d tan t) / 4 (Eq. 7)
#   time_embedding   'positional' (paper) | 'fourier': fixed random features of scale 16
#                    (Fig. 4; unet) | 'mp_fourier': EDM2's MPFourier (edm2)
#   modulation       'adn': adaptive double normalization (paper) | 'adagn': AdaGN
#   edm2_native      False | True: EDM2's published network, negated (edm2.NATIVE): the TrigFlow
#                    F of an EDM2 denoiser, for teachers imported from EDM2 (edm2_names)
# `modulation` is also a key of the other backbones, with values of their own (ddpmpp
# 'additive', edm2 'edm2', dit 'adaln', which their `from_config` checks): for them only
# 'adagn' is rejected here.
STABILIZER_KEYS = {
    "time_transform": (TIME_TRANSFORMS, "identity", {"unet": ("edm",), "edm2": ("edm",)}),
    "time_embedding": (tuple(dict.fromkeys(tuple(TIME_EMBEDDINGS) + edm2.TIME_EMBEDDINGS)),
                       "positional", {"unet": ("fourier",), "edm2": ("mp_fourier",)}),
    "modulation": (tuple(MODULATIONS), "adn", {"unet": ("adagn",)}),
    "edm2_native": ((False, True), False, {"edm2": (True,)}),
}


def _unsupported(key: str, value, backbones: list, name: str) -> str:
    if "unet" in backbones:   # the ablation switches; some EDM2's too
        others = [repr(b) for b in backbones if b != "unet"]
        where = "the 'unet' backbone only" + (f", and by {' and '.join(others)}" if others
                                              else "")
    else:
        where = f"the {' and '.join(repr(b) for b in backbones)} backbone only"
    return f"config.model.{key} = {value!r} is supported by {where} (config.model.name = {name!r})"


def check_stabilizer_keys(model: ml_collections.ConfigDict) -> None:
    """The switches of `STABILIZER_KEYS`: known values, each non-default one on a backbone that
    implements it only. ConfigError naming the key, its value and what is expected."""
    for key, (allowed, default, backbones) in STABILIZER_KEYS.items():
        if key not in model:
            continue
        value = model[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"config.model.{key} = {value!r} is invalid: expected True or "
                              f"False")
        supporters = sorted(b for b, values in backbones.items() if value in values)
        if value != default and supporters and model.name not in supporters:
            raise ConfigError(_unsupported(key, value, supporters, model.name))
        if model.name != "unet" and key == "modulation":
            continue   # the backbone's own values, checked by its from_config
        if value not in allowed:
            raise ConfigError(f"config.model.{key} = {value!r} is invalid: expected one of "
                              f"{allowed}")


def needs_sigma_d(model: ml_collections.ConfigDict) -> bool:
    """Whether the network's time input needs the data std (config.data.sigma_d, which the
    objectives copy into config.model.sigma_d): time_transform 'edm' (c_noise = ln(sigma_d
    tan t) / 4), set directly or by edm2_native."""
    return (model.get("time_transform", "identity") == "edm"
            or model.get("edm2_native", False) is True)


def validate_model_config(model: ml_collections.ConfigDict) -> None:
    """Checks config.model before anything runs: the shared entries here, then the backbone's
    own (`from_config` builds the module, which allocates nothing). Raises ConfigError."""
    for key in ("channels", "num_blocks", "hidden_size", "depth"):   # whichever the backbone has
        if key in model and not (isinstance(model[key], int) and model[key] > 0):
            raise ConfigError(f"config.model.{key} = {model[key]!r} is invalid: expected a "
                              f"positive integer")
    if model.get("num_classes", 0) < 0:
        raise ConfigError(f"config.model.num_classes = {model.num_classes!r} is invalid: "
                          f"expected >= 0 (0: unconditional)")
    if model.get("remat", "none") not in REMAT_MODES:
        raise ConfigError(f"config.model.remat = {model.remat!r} is invalid: expected one of "
                          f"{REMAT_MODES} ('block': recompute each block in the backward pass; "
                          f"a policy name: save what it names)")
    scan = model.get("scan_blocks", False)
    if not isinstance(scan, bool):
        raise ConfigError(f"config.model.scan_blocks = {scan!r} is invalid: expected True or "
                          f"False (runs of equal blocks as one nn.scan)")
    if scan and model.name not in SCANNING_BACKBONES:
        raise ConfigError(f"config.model.scan_blocks = True is supported by the "
                          f"{SCANNING_BACKBONES} backbones, not {model.name!r}")
    channels = model.get("weight_channels", 4)
    if not (isinstance(channels, int) and channels >= 4 and channels % 2 == 0):
        raise ConfigError(f"config.model.weight_channels = {channels!r} is invalid: expected an "
                          f"even integer >= 4 (the adaptive weighting's embedding width)")
    check_stabilizer_keys(model)
    build_network(model)


def init_backbone(module, key, x, t, y=None, guidance=None):
    """The backbone's initial params (logically boxed). A network with `scan_blocks` starts from
    the unrolled network's initial values (the same numbers, stacked per run), so the layout
    does not change what a seed gives."""
    rngs = {"params": key}
    if getattr(module, "scan_blocks", False):
        return init_like_unrolled(module, module.clone(scan_blocks=False), rngs, x, t, y,
                                  guidance, train=False)
    return module.init(rngs, x, t, y, guidance, train=False)["params"]


def bind_apply(module, *, train: bool):
    """The network as a pure function F(params, x_scaled, t, cond, dropout_key) -> F.

    cond is a dict with optional 'y' ([B] int labels) and 'guidance' ([B] scales). This is the
    form the losses and samplers take; with train=False the dropout key is ignored.
    """

    def net_fn(params, x, t, cond, dropout_key=None):
        rngs = {"dropout": dropout_key} if train and dropout_key is not None else {}
        return module.apply({"params": params}, x, t, cond.get("y"), cond.get("guidance"),
                            train=train, rngs=rngs)

    return net_fn


__all__ = ["AdaptiveWeight", "BACKBONES", "NON_IDENTITY_KEYS", "STABILIZER_KEYS", "UNet",
           "bind_apply", "build_network", "init_backbone", "check_stabilizer_keys",
           "edm2_names", "needs_sigma_d", "validate_model_config"]
