"""A teacher stage from EDM2's published networks: distill them without training a teacher.

    python -m scm_jax.import_teacher --pkl=edm2-img512-xxl-0939524-0.015.pkl \
        --config=experiments/imagenet512.py:variant=xxl,teacher=edm2 --workdir=DIR

reads an EDM2 network pickle (`scm_jax.edm2_pickle`: no torch, no code from the file runs),
checks that its network is the one the config builds, and writes DIR/teacher (or the teacher's
`checkpoint_dir`) as training would: a checkpoint at step `teacher.steps` whose params and EMA
are the pickle's weights (optimizer state fresh) and `config.json` with the stage's identity and
where the weights came from. Every student stage then loads it as it loads a trained teacher
(`stage=scd`, `stage=all`: the teacher stage is already complete), and re-running
`stage=teacher` resumes it as a finished stage.

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


def mismatches(config, kwargs: dict) -> list:
    """'config.<key> = <ours> where the pickle has <theirs> (--config.<key>=<theirs>)' for every
    constructor argument of the EDM2 network that the config's model or data differ in."""
    from scm_jax.data import data_shape
    from scm_jax.networks import edm2

    model = config.model
    resolution, _, channels = data_shape(config.data)
    widths = _edm2_widths(kwargs)
    preset_noise = model.noise_channels or model.channels * model.channel_mult[0]
    preset_emb = model.get("emb_channels") or model.channels * max(model.channel_mult)
    pairs = [
        ("model.channels", model.channels, int(kwargs["model_channels"])),
        ("model.channel_mult", tuple(model.channel_mult), tuple(kwargs["channel_mult"])),
        ("model.num_blocks", model.num_blocks, int(kwargs["num_blocks"])),
        ("model.attn_resolutions", tuple(model.attn_resolutions),
         tuple(kwargs["attn_resolutions"])),
        ("model.channels_per_head", model.channels_per_head, int(kwargs["channels_per_head"])),
        ("model.num_classes", model.num_classes, int(kwargs["label_dim"])),
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


def import_edm2_teacher(config, pkl: str, workdir, *, log=print) -> str:
    """Writes the teacher stage of `config` in `workdir` from the EDM2 pickle `pkl`; returns the
    stage directory. ConfigError for a config that does not build the pickle's network,
    CheckpointMismatchError for a stage directory that already holds a checkpoint."""
    import jax

    from scm_jax import checkpoint as ckpt
    from scm_jax import configs, edm2_pickle, objectives, sampling, sharding, stage_identity
    from scm_jax.data import data_shape
    from scm_jax.errors import CheckpointMismatchError, ConfigError
    from scm_jax.networks.edm2_names import params_from_edm2

    configs.validate(config)
    if "teacher" not in configs.training_stages(config):
        raise ConfigError("the config has no 'teacher' stage to import into")
    if config.model.name != "edm2" or not config.model.get("edm2_native", False):
        raise ConfigError(
            f"config.model must build EDM2's own network to take EDM2's weights: backbone "
            f"{config.model.name!r}, edm2_native {config.model.get('edm2_native', False)!r}; "
            f"expected 'edm2' and True (the presets' teacher=edm2, e.g. "
            f"--config=experiments/imagenet512.py:variant=xxl,teacher=edm2)")
    objective = objectives.build(config, "teacher")
    if not sampling.solves_ode(objective):
        raise ConfigError(f"config.teacher.objective = {config.teacher.objective!r}: an EDM2 "
                          f"network is a diffusion model; expected 'diffusion'")
    net = edm2_pickle.load(pkl)
    problems = mismatches(config, net.kwargs)
    if problems:
        raise ConfigError(f"{pkl} holds another network than the config builds: "
                          + "; ".join(problems))
    directory = stage_identity.stage_dir(config, "teacher", workdir)
    if ckpt.has_checkpoint(directory):
        raise CheckpointMismatchError(f"{directory} already holds a teacher checkpoint; import "
                                      f"into another --workdir (or delete it)")
    record = stage_identity.stage_record(config, objective)
    stage_identity.check_stage_config(directory, record)

    mesh = sharding.make_mesh(config.mesh)
    shape = tuple(data_shape(config.data))
    _, state_sharding = objective.abstract_state(shape, mesh, sharding.logical_rules(config.mesh))
    state = jax.jit(lambda k: objective.init_state(k, shape), out_shardings=state_sharding)(
        objectives.stage_key(config.seed, "teacher"))
    params = params_from_edm2(net.params, objective.networks["net"].module)
    params = jax.device_put(params, state_sharding.nets["net"].params)
    state = objective.with_params(state, "net", params)
    steps = int(config.teacher.steps)
    state = jax.device_put(state.replace(step=jax.numpy.asarray(steps, state.step.dtype)),
                           state_sharding)
    source = dict(pkl=str(pkl), sha256=_sha256(pkl), kwargs=net.kwargs,
                  classes=list(net.class_names))
    store = ckpt.CheckpointStore(directory, async_save=False)
    try:
        store.save(steps, state, {ckpt.IMPORTED: os.path.basename(str(pkl))}, force=True)
    finally:
        store.close()
    stage_identity.write_record(directory, dict(record, imported_from=source))
    count = sum(int(v.size) for v in net.params.values())
    log(f"[import] {pkl}: EDM2 network of {net.kwargs['model_channels']} channels ({count:,} "
        f"weights) -> teacher checkpoint at step {steps} in {directory}")
    return str(directory)


def _define_flags(fv) -> None:
    from absl import flags

    cli.define_config_flags(fv)
    flags.DEFINE_string("pkl", None, "an EDM2 network pickle (.pkl), downloaded by you",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "the run's workdir; the teacher stage is written in "
                        "<workdir>/teacher (or config.teacher.checkpoint_dir)", flag_values=fv)
    flags.mark_flags_as_required(["pkl", "workdir"], flag_values=fv)


def _run(fv, overrides) -> None:
    config = cli.load_config(fv, overrides)
    say = (lambda m: print(m, flush=True)) if files.is_primary() else (lambda m: None)
    import_edm2_teacher(config, fv.pkl, fv.workdir, log=say)


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    return cli.run_command(__doc__, _define_flags, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
