"""Another stage's EMA, restored: a teacher for distillation and for a student's start, or any
stage for sampling and evaluation (only the EMA's arrays are read)."""
from scm_jax import objectives, sharding
from scm_jax.checkpoint import CheckpointStore, CorruptCheckpointError, has_checkpoint
from scm_jax.errors import CheckpointMismatchError, MissingInputError
from scm_jax.stage_identity import check_stage_config, stage_dir, stage_record
from scm_jax.tree_checks import all_finite


def restore_stage_ema(config, name: str, workdir, mesh=None, rules=None, network: str = "net",
                      abstract_ema=None, log=print, sigma_rel: float = 0.0):
    """(EMA params of network `network` of stage `name`, step) from its latest checkpoint,
    sharded over `mesh` by the logical rules when one is given (or exactly as the sharded
    ShapeDtypeStructs `abstract_ema` say); only those arrays are read. With `sigma_rel` > 0,
    the stage's post-hoc EMA of that sigma_rel instead (`python -m scm_jax.posthoc_ema`), at
    the step it was reconstructed for.

    Raises MissingInputError naming the directory when the stage has no checkpoint (or no
    reconstruction of `sigma_rel`, with the command that makes it), and
    CheckpointMismatchError when its identity differs from the config's or its EMA is not
    finite. A corrupt latest checkpoint is reported and the newest intact one used.
    """
    stage_directory = stage_dir(config, name, workdir)
    objective = objectives.build(config, name)
    if not has_checkpoint(stage_directory):
        hint = (f"run stage={name} first or set --config.{name}.checkpoint_dir"
                if name == "teacher" else f"run stage={name} first")
        raise MissingInputError(f"no {name} checkpoint found in {stage_directory}: {hint}")
    check_stage_config(stage_directory, stage_record(config, objective))
    directory = stage_directory
    if sigma_rel:
        from scm_jax import posthoc_store

        if network != "net":
            raise MissingInputError(f"post-hoc EMA is kept for network 'net' only, not "
                                    f"{network!r}")
        directory = posthoc_store.reconstructed_dir(stage_directory, sigma_rel)
        if not has_checkpoint(directory):
            made = posthoc_store.reconstructed_sigma_rels(stage_directory)
            raise MissingInputError(
                f"no post-hoc EMA of sigma_rel {sigma_rel:g} for stage {name} in {directory} "
                f"(reconstructed: {', '.join(f'{s:g}' for s in made) or 'none'}): run python -m "
                f"scm_jax.posthoc_ema --config=... --workdir={workdir} --stage={name} "
                f"--sigma_rel={sigma_rel:g}")
    from scm_jax.data import data_shape

    if abstract_ema is None:
        if mesh is None:
            abstract, _ = objective.abstract_state(data_shape(config.data))
        else:
            abstract, _ = objective.abstract_state(data_shape(config.data), mesh,
                                                   rules or sharding.logical_rules(config.mesh))
        abstract_ema = abstract.nets[network].ema
    subtree = {"nets": {network: {"ema": abstract_ema}}}
    store = CheckpointStore(directory, async_save=False)
    try:
        problems = []
        store.manager.reload()
        for step in sorted(store.manager.all_steps(), reverse=True):
            try:
                ema = store.restore_subtree(subtree, step)["nets"][network]["ema"]
                break
            except CorruptCheckpointError as err:   # another stage's files: reported, not moved
                problems.append(str(err))
                log(f"warning: {err}; using the previous {name} checkpoint")
        else:
            raise CorruptCheckpointError(f"no intact {name} checkpoint in {directory}: "
                                         f"{'; '.join(problems)}")
    finally:
        store.close()
    if not all_finite(ema):
        raise CheckpointMismatchError(
            f"the {'post-hoc ' if sigma_rel else ''}EMA of stage {name} in {store._where(step)} "
            f"holds non-finite values (NaN or inf): it can neither start nor teach another stage; retrain {name} (lower its "
            f"learning rate) or pick another checkpoint")
    return ema, int(step)
