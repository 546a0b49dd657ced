"""train_stage(config, name, workdir): one training stage, the one place that knows the mesh, the
data, the checkpoints and the metrics at once.

Sections: config check -> the stage on its mesh (`stage.build_stage`: objective, shapes and
shardings from jax.eval_shape, the jitted step; the compile check builds the same) -> data ->
teacher -> restore, or initialize (CMs from the teacher's EMA) -> the step loop with logging,
checkpoints and sample grids -> final checkpoint.

On a multi-process run every process runs this function; the primary one alone prints and
writes the side files (config.json, metrics, TensorBoard, grids), orbax writes the checkpoint.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from scm_jax import checkpoint as ckpt
from scm_jax import ema as ema_lib
from scm_jax import (config_checks, configs, files, objectives, posthoc_store, preemption,
                     processes, sampling, sharding, stage_identity, stage_restore, tree_checks)
from scm_jax.data import build_train_batches
from scm_jax.errors import ConfigError, UserError
from scm_jax.evaluate import in_loop
from scm_jax.metrics_log import MetricLogger, save_image_grid
from scm_jax.run_lock import StageLock
from scm_jax.stage import build_stage


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: the run stops at its last finite state."""

GRID_PER_CLASS = 10        # a progress grid: 10 samples of each of the first 10 classes
GRID_TEACHER_STEPS = 18    # a diffusion model's grid: DPM-Solver-2S, 35 NFE (sCM App. G.1)


def merge_teacher_params(fresh, teacher, where: str):
    """Teacher EMA into a freshly initialized student of the same architecture (sCM App. G.2).

    Entries only the student has (the guidance-scale input) keep their fresh (zero) init; any
    other difference is an error naming the entry.
    """
    flatten = lambda tree: {jax.tree_util.keystr(p): v  # noqa: E731
                            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    fresh_flat, teach_flat = flatten(fresh), flatten(teacher)
    for key, value in teach_flat.items():
        if key not in fresh_flat:
            raise ConfigError(f"teacher at {where} has parameter {key} that the student lacks")
        if value.shape != fresh_flat[key].shape:
            raise ConfigError(f"teacher at {where}: {key} has shape {value.shape}, the student "
                              f"expects {fresh_flat[key].shape}")
    for key in fresh_flat:
        if key not in teach_flat and "guidance" not in key:
            raise ConfigError(f"teacher at {where} lacks parameter {key}")
    return jax.tree_util.tree_map_with_path(
        lambda p, v: teach_flat.get(jax.tree_util.keystr(p), v), fresh)


def grid_sampler(objective, shape, mesh):
    """(draw(params, step) -> images [N, H, W, C] on every process, rows): the stage's progress
    grid. A diffusion model is sampled with its ODE solver, a consistency model in 2 steps; a
    guided student at its lowest training scale."""
    model = objective.model_cfg
    classes = min(model.num_classes, 10)   # the first ten classes of a 1000-class model
    method = sampling.method_for(
        objective, GRID_TEACHER_STEPS if sampling.solves_ode(objective) else 2)
    scale = objective.cfg.guidance.scale_min if model.guidance_input else 1.0
    repl = sharding.replicated(mesh)
    draw = sampling.sampler(objective.net_eval, shape, objective.sigma_d, method,
                            num_classes=model.num_classes, guidance_input=model.guidance_input,
                            scale=scale, out_sharding=repl)
    labels = np.repeat(np.arange(max(classes, 1)), GRID_PER_CLASS).astype(np.int32)
    labels = jax.device_put(labels, repl)

    def images(params, step: int) -> np.ndarray:
        out = draw(params, jax.device_put(jax.random.PRNGKey(step), repl), labels)
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))

    return images, max(classes, 1)


def write_grid(images: np.ndarray, directory, step: int, rows: int, sigma_d: float) -> None:
    """<stage dir>/samples_<step>.png (primary process only)."""
    if not files.is_primary():
        return
    if images.shape[-1] not in (1, 3):
        # Latents: a preview of the first three channels, scaled from +-2 sigma_d (no VAE here).
        images = images[..., :3] / (2 * sigma_d)
    save_image_grid(images, files.join(directory, f"samples_{step:07d}.png"), rows=rows)


def train_stage(config, name: str, workdir, *, log=print):
    """Trains stage `name` (a section of the config with an `objective`) to config.<name>.steps.

    Resumes from the stage's latest checkpoint when there is one. Returns the final TrainState.
    """
    say = log if files.is_primary() else (lambda msg: None)

    # --- Config check: fail before anything is written --------------------------------------
    config_checks.validate(config)
    if name not in configs.training_stages(config):
        raise ConfigError(f"unknown training stage {name!r}; expected one of "
                          f"{configs.training_stages(config)}")
    cfg = config[name]

    # --- The stage on its mesh: objective, shapes, shardings, the jitted step ---------------
    stage = build_stage(config, name)
    objective = stage.objective
    directory = stage_identity.stage_dir(config, name, workdir)
    record = stage_identity.stage_record(config, objective)
    stage_identity.check_stage_config(directory, record)
    resuming = ckpt.has_checkpoint(directory)

    # --- Data -------------------------------------------------------------------------------
    batches = build_train_batches(config.data, batch_size=cfg.batch_size, seed=config.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())

    # --- Teacher: distilled at every step, or only the start of a fresh run -----------------
    teacher_params = None
    if objective.teacher_stage and (objective.distills or not resuming):
        # Restored straight into the shardings the step was jitted with.
        teacher_params = _restore_teacher(config, stage, workdir, say)
    step_teacher = teacher_params if objective.distills else None

    # --- One run per stage directory, from here on (nothing was written before) -------------
    with StageLock(directory, log=say):
        store = ckpt.CheckpointStore(directory, keep=cfg.keep_checkpoints)
        logger = snapshots = None
        try:
            state, logger = _restore_or_initialize(config, name, stage, store, batches, workdir,
                                                   teacher_params, resuming, record, say)
            del teacher_params   # the step holds its own reference when it distills
            rels = ema_lib.posthoc_sigma_rels(cfg.ema)
            if rels:
                snapshots = posthoc_store.SnapshotWriter(
                    directory, rels, cfg.ema.posthoc_every, cfg.steps, int(state.step), log=say)
            state = _loop(config, name, stage, store, batches, logger, state, step_teacher,
                          directory, workdir, say, snapshots)
        except BaseException:
            _close_quietly(say, store.close, logger.close if logger else None,
                           snapshots.close if snapshots else None)
            raise
        store.close()   # waits for the last save; raises if it failed
        if snapshots:
            snapshots.close()
        logger.close()
    return state


def _restore_teacher(config, stage, workdir, say):
    """The teacher's EMA (with the guiding network's when the stage has one: `Teacher.pack`),
    restored straight into the shardings the step was jitted with."""
    objective, teacher = stage.objective, stage.teacher
    abstract = stage.teacher_abstract
    # The teacher's post-hoc EMA of the stage's teacher_sigma_rel (0: its own EMA).
    sigma_rel = float(config[stage.name].get("teacher_sigma_rel", 0.0))
    if sigma_rel:
        say(f"[{stage.name}] teacher: the post-hoc EMA of sigma_rel {sigma_rel:g}")
    if teacher is None or not teacher.has_guide:
        params, _ = stage_restore.restore_stage_ema(
            config, objective.teacher_stage, workdir, stage.mesh, stage.rules,
            abstract_ema=abstract, log=say, sigma_rel=sigma_rel)
        return params
    net, _ = stage_restore.restore_stage_ema(
        config, objective.teacher_stage, workdir, stage.mesh, stage.rules,
        abstract_ema=abstract["net"], log=say, sigma_rel=sigma_rel)
    guide, _ = stage_restore.restore_stage_ema(
        config, objective.guide_stage, workdir, stage.mesh, stage.rules,
        abstract_ema=abstract["guide"], log=say)
    return teacher.pack(net, guide)


def _restore_or_initialize(config, name, stage, store, batches, workdir, teacher_params,
                           resuming, record, say):
    """(state, logger): the newest intact checkpoint's state (and data position), or a fresh
    one (a CM from its teacher's EMA); metrics.jsonl truncated to the restored step."""
    objective, directory = stage.objective, store.directory
    if resuming:
        state, data_state, step = store.restore_latest_intact(stage.abstract_state, log=say)
        if not tree_checks.all_finite(state):
            raise ckpt.CheckpointMismatchError(
                f"checkpoint {step} in {directory} holds non-finite values (NaN or inf); it "
                f"cannot be resumed: delete it (and any later one) or the stage directory")
        if isinstance(data_state, dict) and ckpt.IMPORTED in data_state:
            # Weights imported (`import_teacher`), no data read: the pipeline starts afresh.
            say(f"[{name}] imported from {data_state[ckpt.IMPORTED]}: the data pipeline starts at "
                f"its beginning")
        else:
            batches.set_state(data_state)
        say(f"[{name}] resumed from step {int(state.step)} in {directory}")
    else:
        state = jax.jit(lambda k: objective.init_state(k, stage.image_shape),
                        out_shardings=stage.state_sharding)(objectives.stage_key(config.seed, name))
        if teacher_params is not None and config[name].init_from_teacher:
            # sCM App. G.2: every CM starts from the teacher's EMA parameters (aVSD's fake
            # score network too).
            where = stage_identity.stage_dir(config, objective.teacher_stage, workdir)
            start = stage.teacher.net_params(teacher_params) if stage.teacher else teacher_params
            for network in objective.teacher_initialized:
                params = merge_teacher_params(state.nets[network].params, start, where)
                state = objective.with_params(state, network, params)
            state = jax.device_put(state, stage.state_sharding)
        stage_identity.write_record(directory, record)
    logger = MetricLogger(directory, name=name, total_steps=config[name].steps, log=say,
                          resume_step=int(state.step) if resuming else None)
    return state, logger


def _loop(config, name, stage, store, batches, logger, state, step_teacher, directory, workdir,
          say, snapshots=None):
    """The steps, with logging, checkpoints, post-hoc EMA snapshots (`snapshots`: a
    `posthoc_store.SnapshotWriter`), grids, the stop signal and the non-finite guard.

    The step's stop and non-finite flags are read one step late, so the host never waits for
    the step it has just dispatched.
    """
    cfg, objective, mesh = config[name], stage.objective, stage.mesh
    grid, rows = grid_sampler(objective, stage.image_shape, mesh) if cfg.sample_every >= 0 \
        else (None, 0)
    start = int(state.step)
    evaluate = in_loop(config, name, objective, mesh, workdir, log=say)
    # The executable the compile check measures, compiled before the first step on every
    # process alike (then a barrier: see processes.py).
    step_fn, seconds = processes.compile_together(stage.lower(), f"{name} step compiled")
    say(f"[{name}] step compiled in {seconds:.1f} s")
    previous = None
    consecutive = skipped = 0
    with preemption.SignalWatch(mesh) as watch:
        for step in range(start, cfg.steps):
            batch = sharding.shard_batch(next(batches), mesh)
            state, metrics = step_fn(state, batch, step_teacher, watch.flags())
            done = step + 1
            store.check()   # a failed background save stops the run here
            stop = False
            if previous is not None:
                flags = jax.device_get({k: previous[k] for k in ("stop_requested", "nonfinite")})
                stop = bool(flags["stop_requested"])
                consecutive = consecutive + 1 if flags["nonfinite"] else 0
                skipped += int(flags["nonfinite"])
                if flags["nonfinite"]:
                    say(f"[{name}] warning: step {done - 1} had a non-finite loss, gradient or "
                        f"parameter; its update was not applied ({consecutive} in a row)")
                if consecutive >= cfg.nonfinite.max_consecutive:
                    raise TrainingDiverged(
                        f"stage {name}: {consecutive} consecutive steps up to step {done - 1} "
                        f"had a non-finite loss, gradients or parameters (none was applied); "
                        f"the last finite checkpoint is step {store.latest_step()} in "
                        f"{directory}/checkpoints. Lower config.{name}.optimizer.lr or clip "
                        f"gradients (optimizer.grad_clip), then re-run to resume from it")
            previous = metrics
            if done % cfg.log_every == 0 or done == cfg.steps:
                logged = {k: v for k, v in jax.device_get(metrics).items()
                          if k not in ("stop_requested", "nonfinite")}
                logger.write(done, dict(logged, skipped_steps=skipped),
                             images=done * cfg.batch_size)
            if stop or done % cfg.checkpoint_every == 0 or done == cfg.steps:
                # With nonfinite.skip the state is finite by construction; without it, a
                # non-finite state is never written (the last finite checkpoint stays newest).
                if not cfg.nonfinite.skip and not tree_checks.all_finite(state):
                    raise TrainingDiverged(
                        f"stage {name}: the state at step {done} is not finite, so it was not "
                        f"saved; the last finite checkpoint is step {store.latest_step()} in "
                        f"{directory}/checkpoints (config.{name}.nonfinite.skip=True skips "
                        f"such updates instead)")
                store.save(done, state, batches.get_state(), force=stop or done == cfg.steps)
            if snapshots is not None:
                snapshots.after_step(done, state.nets["net"].posthoc)
            if stop:
                raise preemption.StageInterrupted(watch.reported_signal(), name, done, directory)
            if evaluate is not None and done % cfg.eval_every == 0:
                logger.write_eval(done, evaluate(state.nets["net"].ema, done))
            if cfg.sample_every > 0 and done % cfg.sample_every == 0:
                write_grid(grid(state.nets["net"].ema, done), directory, done, rows,
                           objective.sigma_d)
    if cfg.steps > start and grid is not None:
        step = int(state.step)
        write_grid(grid(state.nets["net"].ema, step), directory, step, rows, objective.sigma_d)
    return state


def _close_quietly(say, *closers) -> None:
    """Runs every closer while another error propagates: theirs are reported, not raised, so
    the first error (e.g. the storage layer's) is the one the run ends with."""
    for close in closers:
        if close is None:
            continue
        try:
            close()
        except Exception as err:  # noqa: BLE001 - reported; the original error wins
            say(f"warning: while stopping: {type(err).__name__}: {err}")
