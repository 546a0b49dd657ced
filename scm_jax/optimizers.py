"""Optimizers and learning-rate schedules from optax, configured per training stage.

- Adam / RAdam with the paper's (beta1, beta2, eps): teacher Adam; IN64/512 CMs Adam with eps 1e-11;
  CIFAR CMs RAdam (sCM App. G).
- Schedules: 'constant', or EDM2's inverse square root alpha_ref / sqrt(max(t / t_ref, 1))
  (sCM Tables 4/5); either with an optional linear warm-up.
- Optionally: non-finite gradients zeroed (EDM2's force_finite; `force_finite`, it costs compile
  time on CPU, ~7 s for the digits U-Net) and gradients clipped by global norm (`grad_clip`).
"""
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "radam")
SCHEDULES = ("constant", "inv_sqrt")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """cfg: lr, schedule, t_ref (steps), warmup_steps."""
    if cfg.lr <= 0:
        raise ValueError(f"optimizer.lr must be > 0, got {cfg.lr}")
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "inv_sqrt":
        if cfg.t_ref <= 0:
            raise ValueError(f"optimizer.t_ref must be > 0 for inv_sqrt, got {cfg.t_ref}")
        decay = lambda step: cfg.lr * jnp.maximum(step / cfg.t_ref, 1.0) ** -0.5  # noqa: E731
    else:
        raise ValueError(f"unknown optimizer.schedule {cfg.schedule!r}; expected one of {SCHEDULES}")
    if cfg.warmup_steps > 0:
        warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
        return optax.join_schedules([warm, decay], [cfg.warmup_steps])
    return decay


def build_optimizer(cfg) -> optax.GradientTransformation:
    """cfg: name, lr, b1, b2, eps, schedule, t_ref, warmup_steps, grad_clip (0 = off), force_finite."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer.name {cfg.name!r}; expected one of {OPTIMIZERS}")
    if cfg.eps <= 0:
        raise ValueError(f"optimizer.eps must be > 0, got {cfg.eps}")
    schedule = learning_rate_schedule(cfg)
    make = optax.adam if cfg.name == "adam" else optax.radam
    chain = [optax.zero_nans()] if cfg.force_finite else []
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(make(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    return optax.chain(*chain)
