"""train_stage(config, name, workdir): one training stage, the one place that knows the mesh, the
data, the checkpoints and the metrics at once.

Sections: config check -> objective -> mesh -> data -> teacher -> shapes and shardings
(jax.eval_shape) -> jit(step) -> restore, or initialize (CMs from the teacher's EMA) -> the step
loop with logging, checkpoints and sample grids -> final checkpoint.

On a multi-process run every process runs this function; the primary one alone prints and
writes the side files (config.json, metrics, TensorBoard, grids), orbax writes the checkpoint.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from scm_jax import checkpoint as ckpt
from scm_jax import configs, files, objectives, sampling, sharding
from scm_jax.data import build_train_batches, data_shape
from scm_jax.errors import ConfigError, UserError
from scm_jax.metrics_log import MetricLogger, save_image_grid

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
    method = (sampling.ode(GRID_TEACHER_STEPS) if objective.sampler == "ode"
              else sampling.two_step(objective.sigma_d))
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
    configs.validate(config)
    if name not in configs.training_stages(config):
        raise ConfigError(f"unknown training stage {name!r}; expected one of "
                          f"{configs.training_stages(config)}")
    cfg = config[name]
    objective = objectives.build(config, name)
    directory = ckpt.stage_dir(config, name, workdir)
    record = ckpt.stage_record(config, objective)
    ckpt.check_stage_config(directory, record)
    shape = data_shape(config.data)
    resuming = ckpt.has_checkpoint(directory)

    # --- Mesh and data ----------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, f"{name}.batch_size")
    batches = build_train_batches(config.data, batch_size=cfg.batch_size, seed=config.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())

    # --- Teacher: distilled at every step, or only the start of a fresh run -----------------
    teacher, teacher_params = None, None
    if objective.teacher_stage and (objective.distills or not resuming):
        teacher_params, _ = ckpt.restore_stage_ema(config, objective.teacher_stage, workdir,
                                                   mesh, rules)
    if objective.distills:
        teacher = objectives.Teacher(objectives.build(config, objective.teacher_stage))

    # --- Shapes and shardings ---------------------------------------------------------------
    try:
        abstract, state_sharding = objective.abstract_state(shape, mesh, rules)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise ConfigError(f"config.model does not build a network for {config.data.name} "
                          f"inputs of shape {shape}: {err}") from err
    step_teacher = teacher_params if objective.distills else None
    # The teacher was restored straight into its shardings.
    teacher_sharding = jax.tree.map(lambda a: a.sharding, step_teacher)
    step_fn = jax.jit(objective.make_step(teacher),
                      in_shardings=(state_sharding, sharding.batch_sharded(mesh), teacher_sharding),
                      out_shardings=(state_sharding, sharding.replicated(mesh)),
                      donate_argnums=(0,))

    # --- Restore or initialize --------------------------------------------------------------
    store = ckpt.CheckpointStore(directory, keep=cfg.keep_checkpoints)
    if resuming:
        state, data_state = store.restore(abstract)
        batches.set_state(data_state)
        say(f"[{name}] resumed from step {int(state.step)} in {directory}")
    else:
        state = jax.jit(lambda k: objective.init_state(k, shape), out_shardings=state_sharding)(
            objectives.stage_key(config.seed, name))
        if teacher_params is not None and cfg.init_from_teacher:
            # sCM App. G.2: every CM starts from the teacher's EMA parameters.
            where = ckpt.stage_dir(config, objective.teacher_stage, workdir)
            net = merge_teacher_params(state.nets["net"].params, teacher_params, where)
            state = jax.device_put(objective.with_params(state, "net", net), state_sharding)
        ckpt.write_record(directory, record)
    del teacher_params   # the step holds its own reference when it distills

    # --- Loop -------------------------------------------------------------------------------
    logger = MetricLogger(directory, name=name, total_steps=cfg.steps, log=say,
                          resume_step=int(state.step) if resuming else None)
    grid, rows = grid_sampler(objective, shape, mesh) if cfg.sample_every >= 0 else (None, 0)
    start = int(state.step)
    try:
        for step in range(start, cfg.steps):
            batch = sharding.shard_batch(next(batches), mesh)
            with sharding.activation_sharding(mesh, rules):
                state, metrics = step_fn(state, batch, step_teacher)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                logger.write(done, jax.device_get(metrics), images=done * cfg.batch_size)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                store.save(done, state, batches.get_state(), force=done == cfg.steps)
            if cfg.sample_every > 0 and done % cfg.sample_every == 0:
                write_grid(grid(state.nets["net"].ema, done), directory, done, rows,
                           objective.sigma_d)
        if cfg.steps > start and grid is not None:
            step = int(state.step)
            write_grid(grid(state.nets["net"].ema, step), directory, step, rows,
                       objective.sigma_d)
    finally:
        store.close()
        logger.close()
    return state
