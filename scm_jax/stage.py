"""A training stage as a program on a mesh: what `train.py` runs and `compile.py` compiles.

`build_stage(config, name, mesh)` builds, from the config alone (no data, no checkpoint),
the stage's objective, its TrainState's abstract arrays and their shardings (FSDP by the
logical rules), the teacher it distills with its parameters' abstract arrays and shardings,
the global batch's abstract arrays, and the one jitted step:

    step(state, batch, teacher_params, stop_flags) -> (state, metrics)

jitted with those shardings and the state donated; `stop_flags` carries each process's
preemption flag (`preemption.py`) and `metrics['stop_requested']` their maximum. The mesh may hold real devices (training)
or a TPU topology's devices on a CPU host (the compile check): the attention kernel follows the
platform of the mesh's devices, not the host's.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import objectives, preemption, sharding
from scm_jax.data import data_shape
from scm_jax.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    objective: Any                # objectives.Objective
    mesh: Any
    rules: tuple
    image_shape: tuple            # (H, W, C) of one example as the network sees it
    abstract_state: Any           # TrainState of ShapeDtypeStructs carrying their shardings
    state_sharding: Any
    batch_abstract: dict          # image [B, H, W, C] float32, label [B] int32, batch-sharded
    teacher: Any                  # objectives.Teacher, or None when the stage does not distill
    teacher_abstract: Any         # the teacher's EMA params as sharded ShapeDtypeStructs, or None
    signal_abstract: Any          # the stop flags' ShapeDtypeStruct [devices]
    step: Any                     # the jitted step

    def lower(self):
        """The step lowered for the abstract arguments (compile it for memory and cost)."""
        with sharding.activation_sharding(self.mesh, self.rules):
            return self.step.lower(self.abstract_state, self.batch_abstract,
                                   self.teacher_abstract, self.signal_abstract)

    @property
    def platform(self) -> str:
        return mesh_platform(self.mesh)


def mesh_platform(mesh) -> str:
    """'tpu' | 'gpu' | 'cpu': the platform of the mesh's devices."""
    return mesh.devices.flat[0].platform


def teacher_abstract_params(config, teacher_stage: str, mesh, rules, platform: str):
    """The abstract EMA params of `teacher_stage`, sharded on `mesh` the way a restore puts them."""
    teacher = objectives.build(config, teacher_stage, platform=platform)
    abstract, _ = teacher.abstract_state(data_shape(config.data), mesh, rules)
    return teacher, abstract.nets["net"].ema


def build_teacher(config, objective, mesh, rules, platform: str):
    """(objectives.Teacher, its parameters as sharded ShapeDtypeStructs) of the distilling
    `objective`: the teacher stage's EMA, with the guiding stage's beside it when the stage's
    guidance names one (`Teacher.pack`)."""
    teacher_objective, net = teacher_abstract_params(config, objective.teacher_stage, mesh,
                                                     rules, platform)
    guide_name = getattr(objective, "guide_stage", None)
    if guide_name is None:
        return objectives.Teacher(teacher_objective), net
    guide_objective, guide = teacher_abstract_params(config, guide_name, mesh, rules, platform)
    teacher = objectives.Teacher(teacher_objective, guide_objective)
    return teacher, teacher.pack(net, guide)


def build_stage(config, name: str, mesh=None) -> Stage:
    """The stage `name` of `config` on `mesh` (default: `config.mesh` over the visible devices)."""
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding.logical_rules(config.mesh)
    platform = mesh_platform(mesh)
    cfg = config[name]
    objective = objectives.build(config, name, platform=platform)
    shape = tuple(data_shape(config.data))
    sharding.check_batch_size(cfg.batch_size, mesh, f"{name}.batch_size")
    try:
        abstract, state_sharding = objective.abstract_state(shape, mesh, rules)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise ConfigError(f"config.model does not build a network for {config.data.name} "
                          f"inputs of shape {shape}: {err}") from err
    teacher, teacher_abstract = None, None
    if objective.distills:
        teacher, teacher_abstract = build_teacher(config, objective, mesh, rules, platform)
    batch_sharding = sharding.batch_sharded(mesh)
    batch_abstract = dict(
        image=jax.ShapeDtypeStruct((cfg.batch_size,) + shape, jnp.float32, sharding=batch_sharding),
        label=jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=batch_sharding))
    teacher_sharding = jax.tree.map(lambda a: a.sharding, teacher_abstract)
    signal = preemption.signal_abstract(mesh)
    step = jax.jit(preemption.with_stop_signal(objective.make_step(teacher)),
                   in_shardings=(state_sharding, batch_sharding, teacher_sharding,
                                 signal.sharding),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=(0,))
    return Stage(name=name, objective=objective, mesh=mesh, rules=rules, image_shape=shape,
                 abstract_state=abstract, state_sharding=state_sharding,
                 batch_abstract=batch_abstract, teacher=teacher,
                 teacher_abstract=teacher_abstract, signal_abstract=signal, step=step)
