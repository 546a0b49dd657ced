"""The pure pieces of a training stage: its state, its models and its jittable step.

Nothing here knows meshes, data loading, checkpoints or logging (that is `train.py`). A step is

    key   = fold_in(state.rng, state.step)
    tgt   = <objective>_targets(key, batch, stopgrad(params), ...)     # no gradient: sampling,
                                                                      # teacher, tangent JVP
    loss, grads = value_and_grad(weighted_regression)(params, tgt)    # the one differentiated pass
    params, opt_state = optimizer update;  ema = beta ema + (1 - beta) params

which is Algorithm 1 (sCT/sCD), Algorithm 2 (dsCD) or EDM2-style diffusion training (teacher).
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from scm_jax import ema as ema_lib
from scm_jax import losses
from scm_jax.networks import AdaptiveWeight, BACKBONES, bind_apply, build_network
from scm_jax.networks.attention import check_attention_impl
from scm_jax.optimizers import build_optimizer


@struct.dataclass
class TrainState:
    step: jax.Array          # int32 [], optimizer steps taken
    params: Any              # {'net': backbone params, 'weight': w_phi params}
    opt_state: Any
    ema: Any                 # EMA of params['net']
    rng: jax.Array           # uint32 [2], the stage's base key


@dataclasses.dataclass(frozen=True)
class Stage:
    """A training stage's static pieces, built from the config."""

    name: str
    cfg: Any                          # the stage's ConfigDict (config.teacher / .scd / ...)
    model_cfg: Any
    sigma_d: float
    module: Any                       # backbone with the stage's dropout
    net_train: Callable               # F(params, x, t, cond, key), train mode
    net_tangent: Callable             # same, possibly in config.<stage>.jvp_dtype
    net_eval: Callable                # F(params, x, t, cond), eval mode
    weight_module: Any
    optimizer: optax.GradientTransformation
    project: Callable                 # backbone params -> params after every optimizer step


def stage_model_config(config, name: str):
    """config.model as stage `name` uses it: the teacher never takes a guidance-scale input
    (only the guided student does, sCM Sec. 6), everything else is shared."""
    model = config.model.copy_and_resolve_references()
    if name == "teacher":
        with model.unlocked():
            model.guidance_input = False
    return model


def build_stage(config, name: str) -> Stage:
    """The stage's networks. `model.attention_impl` applies to the tangent pass only: the
    differentiated pass, the teacher and the samplers use XLA attention, because the fused
    forward+JVP kernel has no transpose rule and `jax.grad` must never reach it (DESIGN.md §3)."""
    cfg = config[name]
    model_cfg = stage_model_config(config, name)
    check_attention_impl(model_cfg.attention_impl)
    plain_cfg = model_cfg.copy_and_resolve_references()
    with plain_cfg.unlocked():
        plain_cfg.attention_impl = "xla"
    module = build_network(plain_cfg, dropout=cfg.dropout)
    tangent_module = module
    jvp_dtype = cfg.jvp_dtype or model_cfg.dtype
    if cfg.kind != "diffusion" and (jvp_dtype != model_cfg.dtype
                                    or model_cfg.attention_impl != "xla"):
        tangent_module = build_network(model_cfg, dropout=cfg.dropout, dtype=jvp_dtype)
    eval_fn = bind_apply(module, train=False)
    return Stage(
        name=name, cfg=cfg, model_cfg=model_cfg, sigma_d=float(config.data.sigma_d),
        module=module, net_train=bind_apply(module, train=True),
        net_tangent=bind_apply(tangent_module, train=True),
        net_eval=lambda p, x, t, cond, key=None: eval_fn(p, x, t, cond),
        weight_module=AdaptiveWeight(config.model.weight_channels),
        optimizer=build_optimizer(cfg.optimizer),
        # EDM2's forced weight normalization, as a projection outside every forward pass.
        project=getattr(BACKBONES[model_cfg.name], "project_params", lambda p: p))


def example_inputs(stage: Stage, image_shape, batch_size: int = 1):
    """Dummy (x, t, cond) for initialization; shapes only matter."""
    x = jnp.zeros((batch_size,) + tuple(image_shape), jnp.float32)
    t = jnp.ones((batch_size,), jnp.float32)
    cond = {}
    if stage.model_cfg.num_classes:
        cond["y"] = jnp.zeros((batch_size,), jnp.int32)
    if stage.model_cfg.guidance_input:
        cond["guidance"] = jnp.ones((batch_size,), jnp.float32)
    return x, t, cond


def init_state(stage: Stage, key, image_shape, *, boxed: bool = False) -> TrainState:
    """Fresh parameters, optimizer state and EMA (EMA starts at the parameters).

    boxed=True keeps the backbones' `nn.LogicallyPartitioned` boxes (on params, EMA and the
    optimizer's per-parameter state alike): `jax.eval_shape` of it is what the shardings are
    derived from. The state a step takes is the unboxed one.
    """
    k_net, k_weight, k_rng = jax.random.split(key, 3)
    x, t, cond = example_inputs(stage, image_shape)
    net = stage.module.init({"params": k_net}, x, t, cond.get("y"), cond.get("guidance"),
                            train=False)["params"]
    weight = stage.weight_module.init(k_weight, t)["params"]
    params = {"net": net, "weight": weight}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=stage.optimizer.init(params), ema=net, rng=k_rng)
    return state if boxed else nn.meta.unbox(state)


def with_net_params(stage: Stage, state: TrainState, net_params) -> TrainState:
    """Replaces the backbone parameters (e.g. by the teacher's EMA: the paper's CM init)."""
    # Own buffers for params and EMA: the train step donates the state, and the teacher's
    # parameters (passed to the same step) must not alias either.
    params = dict(state.params, net=jax.tree.map(jnp.copy, net_params))
    ema = jax.tree.map(jnp.copy, net_params)
    return state.replace(params=params, opt_state=stage.optimizer.init(params), ema=ema)


def merge_teacher_params(fresh, teacher, where: str):
    """Teacher EMA into a freshly initialized student of the same architecture (sCM §4.2).

    Entries only the student has (the guidance-scale input) keep their fresh (zero) init; any
    other difference is an error naming the entry.
    """
    fresh_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(fresh)[0]}
    teach_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(teacher)[0]}
    for key, value in teach_flat.items():
        if key not in fresh_flat:
            raise ValueError(f"teacher at {where} has parameter {key} that the student lacks")
        if value.shape != fresh_flat[key].shape:
            raise ValueError(f"teacher at {where}: {key} has shape {value.shape}, the student "
                             f"expects {fresh_flat[key].shape}")
    for key in fresh_flat:
        if key not in teach_flat and "guidance" not in key:
            raise ValueError(f"teacher at {where} lacks parameter {key}")
    return jax.tree_util.tree_map_with_path(
        lambda p, v: teach_flat.get(jax.tree_util.keystr(p), v), fresh)


def _conditioning(stage: Stage, key, batch):
    """cond for the student: labels (with label dropout for the teacher) and guidance scales."""
    cond = {}
    b = batch["image"].shape[0]
    k_drop, k_guid = jax.random.split(key)
    if stage.model_cfg.num_classes:
        y = batch["label"].astype(jnp.int32)
        if stage.cfg.kind == "diffusion" and stage.cfg.label_dropout > 0:
            null = jax.random.bernoulli(k_drop, stage.cfg.label_dropout, (b,))
            y = jnp.where(null, stage.model_cfg.num_classes, y)
        cond["y"] = y
    if stage.model_cfg.guidance_input:
        g = stage.cfg.guidance
        cond["guidance"] = jax.random.uniform(k_guid, (b,), jnp.float32, g.scale_min, g.scale_max)
    return cond


def teacher_velocity_fn(stage: Stage, teacher_net_eval, teacher_params):
    """dx/dt = sigma_d F_teacher, guided when the stage's guidance scale is not 1 (Alg. 1)."""
    g = stage.cfg.guidance
    fixed_unguided = g.scale_min == g.scale_max == 1.0

    def velocity(x_t, t, cond):
        if fixed_unguided:
            scale = None
        elif "guidance" in cond:
            scale = cond["guidance"]
        else:
            scale = jnp.full(t.shape, g.scale_min, jnp.float32)
        return losses.teacher_velocity(teacher_net_eval, teacher_params, x_t, t, cond,
                                       sigma_d=stage.sigma_d, guidance_scale=scale,
                                       null_label=stage.model_cfg.num_classes)

    return velocity


def make_train_step(stage: Stage, teacher_net_eval=None):
    """Returns step(state, batch, teacher_params) -> (state, metrics); pure, jittable."""
    cfg, lcfg = stage.cfg, stage.cfg.loss
    needs_teacher = cfg.kind == "discrete" or (cfg.kind == "scm" and cfg.tangent == "teacher")
    if needs_teacher and teacher_net_eval is None:
        raise ValueError(f"stage {stage.name} distills a teacher but none was given")

    def targets(key, batch, net_params, step, teacher_params):
        k_cond, k_loss = jax.random.split(key)
        cond = _conditioning(stage, k_cond, batch)
        x0 = batch["image"]
        common = dict(sigma_d=stage.sigma_d, p_mean=lcfg.p_mean, p_std=lcfg.p_std)
        if cfg.kind == "diffusion":
            return losses.diffusion_targets(k_loss, x0, cond, **common)
        teacher = (teacher_velocity_fn(stage, teacher_net_eval, teacher_params)
                   if needs_teacher else None)
        cm = dict(net_fn=stage.net_tangent, params=net_params, step=step,
                  tangent_c=lcfg.tangent_c, warmup_steps=lcfg.warmup_steps,
                  tangent_norm=lcfg.tangent_norm, **common)
        if cfg.kind == "scm":
            return losses.scm_targets(k_loss, x0, cond, teacher=teacher,
                                      prior_weighting=lcfg.prior_weighting, **cm)
        return losses.discrete_cm_targets(k_loss, x0, cond, teacher=teacher,
                                          num_points=lcfg.num_points, **cm)

    objective = functools.partial(losses.weighted_regression, net_fn=stage.net_train,
                                  weight_fn=lambda p, t: stage.weight_module.apply({"params": p}, t))

    def train_step(state: TrainState, batch, teacher_params):
        key = jax.random.fold_in(state.rng, state.step)
        tgt = targets(key, batch, jax.lax.stop_gradient(state.params["net"]), state.step,
                      teacher_params)
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, tgt)
        updates, opt_state = stage.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = dict(params, net=stage.project(params["net"]))
        beta = ema_lib.ema_decay(cfg.ema.kind, cfg.ema.value, state.step, cfg.batch_size)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema=ema_lib.update_ema(state.ema, params["net"], beta))
        metrics["grad_norm"] = optax.tree.norm(grads)
        return new_state, metrics

    return train_step
