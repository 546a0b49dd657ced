"""Training objectives, one module each, registered by name.

A config section is a training stage when it has an `objective` key naming one of `OBJECTIVES`
(`config.teacher.objective = 'diffusion'`, `config.scd.objective = 'scm'`, ...). The class owns
the section's schema and checks, its networks, its targets and loss; `base.Objective` turns
them into the pure step. Adding an objective is a module here, a line below, and a section in
the experiment configs that use it.

    diffusion   TrigFlow diffusion teacher (sCM Eq. 4, EDM2 App. D)        diffusion.py
    scm         continuous-time sCT / sCD (sCM Eq. 6-8, Alg. 1)            scm.py
    discrete    discrete-time dsCD baseline (sCM App. E, Alg. 2)           discrete.py
    avsd        adaptive VSD, alone or added to sCD (sCM App. C)           vsd.py
"""
from scm_jax.errors import ConfigError
from scm_jax.objectives.base import NetState, Network, Objective, TrainState, stage_key
from scm_jax.objectives.diffusion import Diffusion
from scm_jax.objectives.discrete import DiscreteCM
from scm_jax.objectives.scm import SCM
from scm_jax.objectives.teacher import Teacher
from scm_jax.objectives.vsd import AdaptiveVSD

OBJECTIVES = {cls.name: cls for cls in (Diffusion, SCM, DiscreteCM, AdaptiveVSD)}


def get(name: str) -> type:
    """The objective class registered as `name`."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def section(name: str, **overrides):
    """A stage config section for objective `name` (its schema with `overrides` applied)."""
    return get(name).section(**overrides)


def build(config, stage_name: str, platform: str | None = None) -> Objective:
    """The objective of config.<stage_name>, built with its networks and optimizers for
    `platform` (where the networks run: it resolves attention_impl 'auto'; default: JAX's).
    The one place that picks an objective's sections out of a config: its stage section,
    `model` and `data.sigma_d`."""
    stage = config[stage_name]
    return get(stage.objective)(stage_name, stage, config.model, config.data.sigma_d, platform)


__all__ = ["OBJECTIVES", "NetState", "Network", "Objective", "Teacher", "TrainState", "build",
           "get", "section", "stage_key"]
