"""Exponential moving averages of the parameters, used for evaluation and to initialize CMs.

Two profiles (sCM App. G.2):
- 'power': EDM2's power-function EMA with relative std sigma_rel; beta_t = (1 - 1/t)^(gamma + 1)
  where gamma solves sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (EDM2 Eq. 3).
- 'halflife': a classic EMA whose half-life is given in training images (CIFAR-10: 0.5 Mimg).

This module owns the `ema` section of every stage config (`default_config`, `validate`),
including the power EMAs tracked for post-hoc reconstruction (EDM2 Sec. 3: `posthoc_sigma_rels`,
snapshots every `posthoc_every` steps; `scm_jax.posthoc_ema`).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scm_jax.errors import ConfigError

EMA_KINDS = ("power", "halflife")
MAX_SIGMA_REL = 0.28   # the power EMA's sigma_rel is below 0.2887 for any gamma > -1


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The `<stage>.ema` section: kind 'power' (value = sigma_rel) or 'halflife' (value = images)."""
    cfg = ml_collections.ConfigDict(dict(
        kind="power",   # 'power': EDM2's power EMA | 'halflife': a classic EMA
        value=0.05,     # power: sigma_rel (EDM2 Eq. 3) | halflife: the half-life in images
        posthoc_sigma_rels=(),   # power EMAs tracked for post-hoc EMA, e.g. (0.05, 0.1); () = off
        posthoc_every=0,         # steps between their snapshots (and one at the stage's end)
    ))
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ConfigError(f"unknown ema keys {unknown}; expected some of {sorted(cfg.keys())}")
    cfg.update(overrides)
    return cfg


def validate(cfg, where: str) -> None:
    """Raises ConfigError naming `<where>.kind` / `<where>.value` when they are invalid."""
    if cfg.kind not in EMA_KINDS:
        raise ConfigError(f"config.{where}.kind = {cfg.kind!r} is invalid: expected one of "
                          f"{EMA_KINDS}")
    if cfg.kind == "power" and not 0.0 < cfg.value < MAX_SIGMA_REL:
        raise ConfigError(f"config.{where}.value = {cfg.value!r} is invalid: a power EMA's "
                          f"sigma_rel must be in (0, {MAX_SIGMA_REL})")
    if cfg.kind == "halflife" and not cfg.value > 0:
        raise ConfigError(f"config.{where}.value = {cfg.value!r} is invalid: an EMA half-life "
                          f"is a number of training images > 0")
    rels = tuple(cfg.get("posthoc_sigma_rels", ()))
    if any(not 0.0 < float(s) < MAX_SIGMA_REL for s in rels) or len(set(rels)) != len(rels):
        raise ConfigError(f"config.{where}.posthoc_sigma_rels = {rels!r} is invalid: expected "
                          f"distinct power-EMA sigma_rels in (0, {MAX_SIGMA_REL}), e.g. "
                          f"(0.05, 0.1), or () for none")
    if rels and not cfg.posthoc_every >= 1:
        raise ConfigError(f"config.{where}.posthoc_every = {cfg.posthoc_every!r} is invalid: "
                          f"expected a step count >= 1 when posthoc_sigma_rels are tracked")


def posthoc_sigma_rels(cfg) -> tuple:
    """The sigma_rels a stage's `ema` section tracks for post-hoc EMA (() when off or None)."""
    return tuple(float(s) for s in cfg.get("posthoc_sigma_rels", ())) if cfg is not None else ()


def posthoc_key(index: int) -> str:
    """The name of the `index`-th tracked post-hoc EMA in `NetState.posthoc` and snapshots."""
    return f"ema{index}"


def power_ema_exponent(sigma_rel: float) -> float:
    """gamma of EDM2's power EMA: the real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ConfigError(f"power EMA sigma_rel must be in (0, {MAX_SIGMA_REL}), got {sigma_rel}")
    inv = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def ema_weight(kind: str, value: float, step, batch_size: int):
    """1 - beta, the new parameters' weight in the update after optimizer step `step` (0-based),
    as a float32 scalar: power, 1 - (1 - 1/t)^(gamma + 1) with t = step + 1 (1 at the first
    step: the EMA starts at the parameters); halflife, 1 - 0.5^(batch_size / value).

    Computed as -expm1(k log1p(-x)), to float32's relative precision (tested against float64):
    forming beta first and subtracting it from 1 does not keep it, since 1 - 1/t is rounded to
    float32's spacing near 1 (6e-8), a relative error of 1.5e-2 in the weight at t = 1e6."""
    if kind == "power":
        gamma = power_ema_exponent(value)
        t = jnp.asarray(step, jnp.float32) + 1.0
        return -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / t))
    if kind == "halflife":
        if value <= 0:
            raise ConfigError(f"EMA half-life must be > 0 images, got {value}")
        return jnp.float32(-np.expm1(batch_size / value * np.log(0.5)))
    raise ConfigError(f"unknown ema.kind {kind!r}; expected one of {EMA_KINDS}")


def update_ema(ema, params, weight):
    """ema <- ema + weight (params - ema) = (1 - weight) ema + weight params, leaf by leaf
    (`weight` from `ema_weight`)."""
    return jax.tree.map(lambda e, p: e + weight * (p.astype(e.dtype) - e), ema, params)
