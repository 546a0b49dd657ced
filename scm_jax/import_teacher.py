"""A teacher stage from EDM2's published networks: distill them without training a teacher.

    python -m scm_jax.import_teacher --pkl=edm2-img512-xxl-0939524-0.015.pkl \
        --config=experiments/imagenet512.py:variant=xxl,teacher=edm2 --workdir=DIR \
        [--guide_pkl=edm2-img512-xs-uncond-2147483-0.015.pkl   # with guide=xs in --config]

reads an EDM2 network pickle (`scm_jax.edm2_pickle`: no torch, no code from the file runs),
checks that its network is the one the config builds, and writes DIR/teacher (or the teacher's
`checkpoint_dir`) as training would: a checkpoint at step `teacher.steps` whose params and EMA
are the pickle's weights (optimizer state fresh) and `config.json` with the stage's identity and
where the weights came from. Every student stage then loads it as it loads a trained teacher
(`stage=scd`, `stage=all`: the teacher stage is already complete), and re-running
`stage=teacher` resumes it as a finished stage.

With `--guide_pkl`, EDM2's guiding network (its `-guid-` presets pair each network with a small
unconditional one, D_w = D_g + w (D - D_g)) is written the same way as the stage the students'
`guidance.network` names (the presets' `guide=xs` adds that stage, `guide`: EDM2's XS width,
unconditional), and guided sCD queries both networks in each step.

The config must build EDM2's own network (`model.edm2_native`, set by the presets' `teacher=edm2`
argument): EDM2's time input ln(sigma) / 4 through its MPFourier, its modulation and balances,
negated, which is exactly the TrigFlow F of EDM2's denoiser (`networks.edm2`). The pickle's
constructor arguments (model_channels, channel_mult, num_blocks, attention resolutions, label
and noise/embedding widths, image shape, sigma_data) must equal the config's; each difference is
named with the override that would match it. EDM2's ImageNet 512 pickles are at
https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/ (docs/paper-scale.md names
them); they are downloaded by you, never by this command.

Exit status 0, or 2 with one line `error: ...` (a missing or foreign pickle, a mismatched config,
a teacher stage that already holds a checkpoint).
"""
import hashlib
import os
import sys

from scm_jax import cli, files



def _edm2_widths(kwargs: dict) -> dict:
    """EDM2's noise and embedding widths from its UNet arguments (EDM2's rules)."""
    mc, mult = int(kwargs["model_channels"]), list(kwargs["channel_mult"])
    noise = kwargs.get("channel_mult_noise")
    emb = kwargs.get("channel_mult_emb")
    return dict(noise=mc * (noise if noise is not None else mult[0]),
                emb=mc * (emb if emb is not None else max(mult)))


def mismatches(config, kwargs: dict, stage: str = "teacher", model=None) -> list:
    """'config.<key> = <ours> where the pickle has <theirs> (--config.<key>=<theirs>)' for every
    constructor argument of the EDM2 network that stage `stage`'s network (`model`: its
    config.model as the stage builds it; default config.model) or the data differ in."""
    from scm_jax.data import data_shape
    from scm_jax.networks import edm2

    model = config.model if model is None else model
    own = config[stage].get("model")   # a diffusion stage's own width and classes, where set
    unset = dict(channels=0, num_classes=-1)
    # The teacher's width is config.model's (its students share it); a guide's is its own.
    where = {key: (f"{stage}.model.{key}" if own is not None and (
        own[key] != unset[key] or stage != "teacher") else f"model.{key}") for key in unset}
    resolution, _, channels = data_shape(config.data)
    widths = _edm2_widths(kwargs)
    preset_noise = model.noise_channels or model.channels * model.channel_mult[0]
    preset_emb = model.get("emb_channels") or model.channels * max(model.channel_mult)
    pairs = [
        (where["channels"], model.channels, int(kwargs["model_channels"])),
        ("model.channel_mult", tuple(model.channel_mult), tuple(kwargs["channel_mult"])),
        ("model.num_blocks", model.num_blocks, int(kwargs["num_blocks"])),
        ("model.attn_resolutions", tuple(model.attn_resolutions),
         tuple(kwargs["attn_resolutions"])),
        ("model.channels_per_head", model.channels_per_head, int(kwargs["channels_per_head"])),
        (where["num_classes"], model.num_classes, int(kwargs["label_dim"])),
        ("model.noise_channels", preset_noise, widths["noise"]),
        ("model.emb_channels", preset_emb, widths["emb"]),
        ("data.sigma_d", float(config.data.sigma_d), float(kwargs["sigma_data"])),
    ]
    out = [f"config.{key} = {ours!r} where the pickle has {theirs!r} "
           f"(--config.{key}={theirs!r})" for key, ours, theirs in pairs if ours != theirs]
    if (resolution, channels) != (int(kwargs["img_resolution"]), int(kwargs["img_channels"])):
        out.append(f"config.data gives {resolution}x{resolution}x{channels} inputs where the "
                   f"pickle's network takes {kwargs['img_resolution']}x{kwargs['img_resolution']}"
                   f"x{kwargs['img_channels']}")
    for key in ("label_balance", "concat_balance", "res_balance", "attn_balance", "clip_act"):
        if float(kwargs[key]) != float(edm2.NATIVE[key]):
            out.append(f"the pickle's {key} = {kwargs[key]!r} is not EDM2's published "
                       f"{edm2.NATIVE[key]!r}, the only one the EDM2-native network builds")
    return out


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with files.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def guide_stage_of(config) -> str:
    """The diffusion stage the config's guided students name as their guiding network; a
    ConfigError when none does or they name different ones."""
    from scm_jax import configs
    from scm_jax.errors import ConfigError

    named = {config[name].guidance.network for name in configs.training_stages(config)
             if "guidance" in config[name] and config[name].guidance.get("network")}
    if len(named) != 1:
        raise ConfigError(
            f"--guide_pkl needs exactly one guiding stage named by the students' "
            f"guidance.network; the config names {sorted(named) or 'none'} (e.g. the presets' "
            f"guide=xs: --config=experiments/imagenet512.py:variant=xxl,teacher=edm2,guide=xs)")
    return named.pop()


def prepare(config, pkl: str, workdir, stage: str = "teacher"):
    """(objective of `stage`, the pickle's network, the stage directory), every check done and
    nothing written: ConfigError for a config that does not build the pickle's network,
    CheckpointMismatchError for a stage directory that already holds a checkpoint."""
    from scm_jax import checkpoint as ckpt
    from scm_jax import config_checks, configs, edm2_pickle, objectives, sampling, stage_identity
    from scm_jax.errors import CheckpointMismatchError, ConfigError

    config_checks.validate(config)
    if stage not in configs.training_stages(config):
        raise ConfigError(f"the config has no {stage!r} stage to import into")
    if config.model.name != "edm2" or not config.model.get("edm2_native", False):
        raise ConfigError(
            f"config.model must build EDM2's own network to take EDM2's weights: backbone "
            f"{config.model.name!r}, edm2_native {config.model.get('edm2_native', False)!r}; "
            f"expected 'edm2' and True (the presets' teacher=edm2, e.g. "
            f"--config=experiments/imagenet512.py:variant=xxl,teacher=edm2)")
    objective = objectives.build(config, stage)
    if not sampling.solves_ode(objective):
        raise ConfigError(f"config.{stage}.objective = {config[stage].objective!r}: an EDM2 "
                          f"network is a diffusion model; expected 'diffusion'")
    net = edm2_pickle.load(pkl)
    problems = mismatches(config, net.kwargs, stage, objective.model_cfg)
    if problems:
        raise ConfigError(f"{pkl} holds another network than the config builds for stage "
                          f"{stage}: " + "; ".join(problems))
    directory = stage_identity.stage_dir(config, stage, workdir)
    if ckpt.has_checkpoint(directory):
        raise CheckpointMismatchError(f"{directory} already holds a {stage} checkpoint; import "
                                      f"into another --workdir (or delete it)")
    stage_identity.check_stage_config(directory, stage_identity.stage_record(config, objective))
    return objective, net, directory


def write_stage(config, objective, net, pkl: str, directory, *, log=print) -> str:
    """Writes the prepared network `net` (from `pkl`) as stage `objective.stage_name` in
    `directory`: a checkpoint at the stage's last step whose params and EMA are the weights,
    and `config.json` with the identity and the source. Returns the directory."""
    import jax

    from scm_jax import checkpoint as ckpt
    from scm_jax import objectives, sharding, stage_identity
    from scm_jax.data import data_shape
    from scm_jax.networks.edm2_names import params_from_edm2

    stage = objective.stage_name
    mesh = sharding.make_mesh(config.mesh)
    shape = tuple(data_shape(config.data))
    _, state_sharding = objective.abstract_state(shape, mesh, sharding.logical_rules(config.mesh))
    state = jax.jit(lambda k: objective.init_state(k, shape), out_shardings=state_sharding)(
        objectives.stage_key(config.seed, stage))
    params = params_from_edm2(net.params, objective.networks["net"].module)
    params = jax.device_put(params, state_sharding.nets["net"].params)
    state = objective.with_params(state, "net", params)
    steps = int(config[stage].steps)
    state = jax.device_put(state.replace(step=jax.numpy.asarray(steps, state.step.dtype)),
                           state_sharding)
    source = dict(pkl=str(pkl), sha256=_sha256(pkl), kwargs=net.kwargs,
                  classes=list(net.class_names))
    store = ckpt.CheckpointStore(directory, async_save=False)
    try:
        store.save(steps, state, {ckpt.IMPORTED: os.path.basename(str(pkl))}, force=True)
    finally:
        store.close()
    record = stage_identity.stage_record(config, objective)
    stage_identity.write_record(directory, dict(record, imported_from=source))
    count = sum(int(v.size) for v in net.params.values())
    log(f"[import] {pkl}: EDM2 network of {net.kwargs['model_channels']} channels ({count:,} "
        f"weights) -> {stage} checkpoint at step {steps} in {directory}")
    return str(directory)


def import_edm2_teacher(config, pkl: str, workdir, *, stage: str = "teacher", guide_pkl=None,
                        log=print) -> str:
    """Writes the diffusion stage `stage` of `config` (the teacher) in `workdir` from the EDM2
    pickle `pkl`, and with `guide_pkl` the guiding stage the students name from that pickle;
    both are checked before either is written. Returns the stage directory. ConfigError for a
    config that does not build a pickle's network, CheckpointMismatchError for a stage
    directory that already holds a checkpoint."""
    jobs = [(prepare(config, pkl, workdir, stage), pkl)]
    if guide_pkl:
        jobs.append((prepare(config, guide_pkl, workdir, guide_stage_of(config)), guide_pkl))
    written = [write_stage(config, objective, net, path, directory, log=log)
               for (objective, net, directory), path in jobs]
    return written[0]


def _define_flags(fv) -> None:
    from absl import flags

    cli.define_config_flags(fv)
    flags.DEFINE_string("pkl", None, "an EDM2 network pickle (.pkl), downloaded by you",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "the run's workdir; the teacher stage is written in "
                        "<workdir>/teacher (or config.teacher.checkpoint_dir)", flag_values=fv)
    flags.DEFINE_string("guide_pkl", None, "an EDM2 guiding network pickle (e.g. "
                        "edm2-img512-xs-uncond-2147483-0.015.pkl) for the stage the students' "
                        "guidance.network names (the presets' guide=xs)", flag_values=fv)
    flags.mark_flags_as_required(["pkl", "workdir"], flag_values=fv)


def _run(fv, overrides) -> None:
    config = cli.load_config(fv, overrides)
    say = (lambda m: print(m, flush=True)) if files.is_primary() else (lambda m: None)
    import_edm2_teacher(config, fv.pkl, fv.workdir, guide_pkl=fv.guide_pkl, log=say)


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    return cli.run_command(__doc__, _define_flags, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
