"""Optimizers and learning-rate schedules from optax, configured per training stage.

- Adam / RAdam with the paper's (beta1, beta2, eps): teachers Adam; ImageNet CMs Adam with eps
  1e-11; CIFAR-10 CMs RAdam (sCM App. G, Tables 4/5).
- Schedules: 'constant', or EDM2's inverse square root (Karras et al. 2024, App. B; sCM Tables
  4/5), both with EDM2's optional linear ramp-up:
      lr(step) = lr * min(step / warmup_steps, 1) / sqrt(max(step / t_ref, 1)),
  with the absolute step in both factors, as EDM2's `learning_rate_schedule` computes it from
  the image count (t_ref and warmup_steps count optimizer steps here).
- Optionally: non-finite gradients zeroed (EDM2's force_finite; it costs compile time on a CPU,
  ~7 s for the digits U-Net) and gradients clipped by global norm (`grad_clip`, per network).

This module owns the `optimizer` section of every stage config: `default_config()` is its
schema, `validate()` its checks.
"""
import math

import jax.numpy as jnp
import ml_collections
import optax

from scm_jax.errors import ConfigError, check

OPTIMIZERS = ("adam", "radam")
SCHEDULES = ("constant", "inv_sqrt")


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The `<stage>.optimizer` section; `overrides` replace defaults (unknown keys are errors)."""
    cfg = ml_collections.ConfigDict(dict(
        name="adam",          # 'adam' | 'radam'
        lr=1e-3,              # the peak learning rate
        b1=0.9, b2=0.999,     # Adam's moment decays
        eps=1e-8,             # Adam's epsilon
        schedule="constant",  # 'constant' | 'inv_sqrt': lr / sqrt(max(step / t_ref, 1)) (EDM2)
        t_ref=1,              # the inverse-square-root decay's reference step
        warmup_steps=0,       # linear ramp-up of the learning rate over these steps
        grad_clip=0.0,        # clip gradients by global norm (0: off)
        force_finite=True,    # zero non-finite gradient entries (EDM2's force_finite)
    ))
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ConfigError(f"unknown optimizer keys {unknown}; expected some of {sorted(cfg.keys())}")
    cfg.update(overrides)
    return cfg


def _check(ok: bool, where: str, key: str, value, expected: str) -> None:
    check(ok, f"{where}.{key}", value, expected)


def validate(cfg, where: str) -> None:
    """Raises ConfigError naming `<where>.<key>`, its value and what was expected."""
    _check(cfg.name in OPTIMIZERS, where, "name", cfg.name, f"one of {OPTIMIZERS}")
    _check(cfg.schedule in SCHEDULES, where, "schedule", cfg.schedule, f"one of {SCHEDULES}")
    _check(math.isfinite(cfg.lr) and cfg.lr > 0, where, "lr", cfg.lr, "a finite value > 0")
    _check(cfg.eps > 0, where, "eps", cfg.eps, "> 0")
    for key in ("b1", "b2"):
        _check(0.0 <= cfg[key] < 1.0, where, key, cfg[key], "in [0, 1)")
    _check(cfg.t_ref > 0, where, "t_ref", cfg.t_ref, "> 0 steps")
    _check(cfg.warmup_steps >= 0, where, "warmup_steps", cfg.warmup_steps, ">= 0 steps")
    _check(cfg.grad_clip >= 0, where, "grad_clip", cfg.grad_clip, ">= 0 (0 = off)")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """lr(step) for cfg (lr, schedule, t_ref, warmup_steps); see the module docstring."""
    validate(cfg, "optimizer")
    lr, t_ref, warmup = float(cfg.lr), float(cfg.t_ref), float(cfg.warmup_steps)
    inv_sqrt = cfg.schedule == "inv_sqrt"

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        rate = jnp.asarray(lr, jnp.float32)
        if inv_sqrt:
            rate = rate * jnp.maximum(step / t_ref, 1.0) ** -0.5
        if warmup > 0:
            rate = rate * jnp.minimum(step / warmup, 1.0)
        return rate

    return schedule


def build_optimizer(cfg) -> optax.GradientTransformation:
    """The stage's optimizer: [zero_nans] -> [clip_by_global_norm] -> Adam | RAdam(schedule)."""
    validate(cfg, "optimizer")
    schedule = learning_rate_schedule(cfg)
    make = optax.adam if cfg.name == "adam" else optax.radam
    chain = [optax.zero_nans()] if cfg.force_finite else []
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(make(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    return optax.chain(*chain)
