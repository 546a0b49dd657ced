"""Every check of an experiment config, each section checked by the module that owns it.

    config_checks.validate(config)   # ConfigError naming the key, the bad value, what was expected

`configs.py` gives a config its shape and loads it; this module runs, before anything touches a
workdir, the checks of every stage the run will reach and of every section: `data` (the
datasets of `scm_jax.data`), `model` (`networks.validate_model_config`), `mesh`, each training
stage (its objective's `validate_section`, which also checks what spans sections, e.g. that a
student's teacher stage exists) and `eval` (`evaluation.settings`).
"""
from scm_jax import data as data_lib
from scm_jax import objectives
from scm_jax.configs import ALL, EVAL, training_stages
from scm_jax.errors import ConfigError, check
from scm_jax.evaluation import settings as eval_settings
from scm_jax.networks import validate_model_config


def validate(config) -> None:
    """Checks every value the run depends on; raises ConfigError naming the first bad one."""
    stages = training_stages(config)
    check(config.stage in stages + (EVAL, ALL), "stage", config.stage,
          f"one of {stages + (EVAL, ALL)}")
    check(all(name in stages + (EVAL,) for name in config.pipeline), "pipeline",
          tuple(config.pipeline), f"stages among {stages + (EVAL,)}")
    workers = config.get("pipeline_workers", 1)
    check(isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1,
          "pipeline_workers", workers, "an integer >= 1 (training stages side by side)")
    if config.data.name not in data_lib.DATASETS:
        raise ConfigError(f"config.data.name = {config.data.name!r} is invalid: expected one "
                          f"of {data_lib.DATASETS}")
    check(config.data.sigma_d > 0, "data.sigma_d", config.data.sigma_d, "> 0")
    validate_model_config(config.model)
    check(config.mesh.data == -1 or config.mesh.data >= 1, "mesh.data", config.mesh.data,
          "-1 (all devices) or a positive device count")
    check(config.mesh.get("fsdp", 1) >= 1, "mesh.fsdp", config.mesh.get("fsdp", 1),
          "a positive device count")
    # Every stage, not only those this run reaches: a pipeline fails at start-up, not after
    # its first stage trained for an hour.
    for name in stages:
        objectives.get(config[name].objective).validate_section(config, name)
    if "eval" in config:
        eval_settings.validate(config.eval)
