"""train_stage(config, name, workdir): one training stage, the one place that knows the mesh, the
data, the checkpoints and the metrics at once.

Sections: config check -> mesh -> data -> models and shapes (jax.eval_shape) -> shardings ->
jit(init) -> restore or initialize (CMs from the teacher's EMA) -> jitted step loop with logging,
checkpoints and sample grids -> final checkpoint.
"""
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import checkpoint as ckpt
from scm_jax import configs, sampling, sharding
from scm_jax import train_step as ts
from scm_jax.data import build_train_batches, data_shape
from scm_jax.metrics_log import MetricLogger, save_image_grid


def stage_dir(config, name: str, workdir: str) -> str:
    """<workdir>/<name>; the teacher may live elsewhere (config.teacher.checkpoint_dir)."""
    if name == "teacher" and config.teacher.checkpoint_dir:
        return config.teacher.checkpoint_dir
    return os.path.join(workdir, name)


def stage_record(config, name: str) -> dict:
    """What config.json stores for a stage: what its checkpoints' meaning depends on."""
    st = config[name]
    return json.loads(json.dumps(dict(
        model=ts.stage_model_config(config, name).to_dict(), data=config.data.to_dict(), kind=st.kind,
        optimizer=st.optimizer.to_dict(), ema=st.ema.to_dict(), tangent=st.tangent,
        full=config.to_dict()), default=str))


def abstract_train_state(stage: ts.Stage, image_shape, *, boxed: bool = False):
    """ShapeDtypeStructs of the stage's TrainState (boxed: with the logical axis names)."""
    return jax.eval_shape(
        lambda: ts.init_state(stage, jax.random.PRNGKey(0), image_shape, boxed=boxed))


def sharded_abstract_state(stage: ts.Stage, image_shape, mesh, rules):
    """(abstract TrainState carrying its shardings, the NamedShardings) from one trace of the
    init: weights split by the logical rules (FSDP), scalars and unnamed leaves replicated."""
    boxed = abstract_train_state(stage, image_shape, boxed=True)
    shardings = sharding.tree_shardings(boxed, mesh, rules)
    return sharding.with_shardings(nn.meta.unbox(boxed), shardings), shardings


def restore_stage_ema(config, name: str, workdir: str, mesh=None):
    """EMA backbone params of a finished (or latest) checkpoint of stage `name`, sharded over
    `mesh` by the config's logical rules when one is given.

    Raises FileNotFoundError naming the directory when the stage has no checkpoint.
    """
    directory = stage_dir(config, name, workdir)
    if not ckpt.has_checkpoint(directory):
        hint = ("run stage=teacher first or set --config.teacher.checkpoint_dir"
                if name == "teacher" else f"run stage={name} first")
        raise FileNotFoundError(f"no {name} checkpoint found in {directory}: {hint}")
    ckpt.check_stage_config(directory, stage_record(config, name))
    store = ckpt.CheckpointStore(directory, async_save=False)
    try:
        stage = ts.build_stage(config, name)
        if mesh is None:
            abstract = abstract_train_state(stage, image_shape(config))
        else:
            abstract, _ = sharded_abstract_state(stage, image_shape(config), mesh,
                                                 sharding.logical_rules(config.mesh))
        state, _ = store.restore(abstract)
    finally:
        store.close()
    return state.ema, int(state.step)


def image_shape(config):
    """(H, W, C) of the network's input for this config's dataset."""
    return data_shape(config.data)


def sample_grid(stage: ts.Stage, net_params, key, shape, num_classes: int, per_class: int = 10):
    """[N, H, W, C] samples for a progress grid: 2-step CM, or the teacher's 35-NFE solver."""
    classes = min(num_classes, 10)   # the first ten classes of a 1000-class model
    n = max(classes, 1) * per_class
    cond = {"y": jnp.repeat(jnp.arange(classes), per_class)} if num_classes else {}
    if stage.model_cfg.guidance_input:
        cond["guidance"] = jnp.full((n,), stage.cfg.guidance.scale_min, jnp.float32)
    F_fn = lambda x, t: stage.net_eval(net_params, x, t, cond)  # noqa: E731
    shape = (n,) + tuple(shape)
    if stage.cfg.kind == "diffusion":
        return sampling.teacher_sample(F_fn, key, shape, stage.sigma_d, num_steps=18)
    return sampling.cm_sample(F_fn, key, shape, stage.sigma_d,
                              sampling.two_step_times(stage.sigma_d))


def train_stage(config, name: str, workdir: str, *, log=print):
    """Trains stage `name` ('teacher' | 'scd' | 'sct' | 'dscd') to config.<name>.steps.

    Resumes from the stage's latest checkpoint when there is one. Returns the final TrainState.
    """
    # --- Config check: fail before anything is written --------------------------------------
    configs.validate(config)
    if name not in configs.TRAIN_STAGES:
        raise ValueError(f"unknown training stage {name!r}; expected one of {configs.TRAIN_STAGES}")
    cfg = config[name]
    directory = stage_dir(config, name, workdir)
    record = stage_record(config, name)
    ckpt.check_stage_config(directory, record)
    stage = ts.build_stage(config, name)
    shape = image_shape(config)

    # --- Mesh and data ----------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, f"{name}.batch_size")
    batches = build_train_batches(config.data, batch_size=cfg.batch_size, seed=config.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())

    # --- Teacher (distillation stages and CM initialization) --------------------------------
    teacher_params = None
    teacher_stage = None
    if name != "teacher":
        teacher_params, _ = restore_stage_ema(config, "teacher", workdir, mesh)
        teacher_stage = ts.build_stage(config, "teacher")

    # --- Shapes and shardings ---------------------------------------------------------------
    abstract, state_sharding = sharded_abstract_state(stage, shape, mesh, rules)
    repl = sharding.replicated(mesh)
    # The teacher was restored straight into its shardings.
    teacher_sharding = jax.tree.map(lambda a: a.sharding, teacher_params)
    step_fn = jax.jit(
        ts.make_train_step(stage, teacher_stage.net_eval if teacher_stage else None),
        in_shardings=(state_sharding, sharding.batch_sharded(mesh), teacher_sharding),
        out_shardings=(state_sharding, repl), donate_argnums=(0,))

    # --- Restore or initialize --------------------------------------------------------------
    os.makedirs(directory, exist_ok=True)
    store = ckpt.CheckpointStore(directory, keep=cfg.keep_checkpoints)
    stage_key = jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                   configs.TRAIN_STAGES.index(name))
    if store.latest_step() is not None:
        state, data_state = store.restore(abstract)
        batches.set_state(data_state)
        log(f"[{name}] resumed from step {int(state.step)} in {directory}")
    else:
        state = jax.jit(lambda k: ts.init_state(stage, k, shape), out_shardings=state_sharding)(
            stage_key)
        if teacher_params is not None:
            # sCM App. G.2: every CM starts from the teacher's EMA parameters.
            net = ts.merge_teacher_params(state.params["net"], teacher_params,
                                          stage_dir(config, "teacher", workdir))
            state = jax.device_put(ts.with_net_params(stage, state, net), state_sharding)
        ckpt.write_json_atomic(os.path.join(directory, "config.json"), record)

    # --- Loop -------------------------------------------------------------------------------
    logger = MetricLogger(directory, name=name, total_steps=cfg.steps, log=log)
    start = int(state.step)
    try:
        for step in range(start, cfg.steps):
            batch = sharding.shard_batch(next(batches), mesh)
            with sharding.activation_sharding(mesh, rules):
                state, metrics = step_fn(state, batch, teacher_params)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                logger.write(done, jax.device_get(metrics), images=done * cfg.batch_size)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                store.save(done, state, batches.get_state(), force=done == cfg.steps)
            if cfg.sample_every > 0 and done % cfg.sample_every == 0:
                _write_grid(stage, state, directory, done, shape, config.model.num_classes)
        if cfg.steps > start and cfg.sample_every >= 0:
            _write_grid(stage, state, directory, int(state.step), shape, config.model.num_classes)
    finally:
        store.close()
        logger.close()
    return state


def _write_grid(stage, state, directory, step, shape, num_classes):
    images = np.asarray(sample_grid(stage, state.ema, jax.random.PRNGKey(step), shape, num_classes))
    if images.shape[-1] not in (1, 3):
        # Latents: a preview of the first three channels, scaled from +-2 sigma_d (no VAE here).
        images = images[..., :3] / (2 * stage.sigma_d)
    save_image_grid(images, os.path.join(directory, f"samples_{step:07d}.png"),
                    rows=max(min(num_classes, 10), 1))
