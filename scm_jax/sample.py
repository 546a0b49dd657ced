r"""Samples from any stage's checkpoint: a PNG grid or the arrays.

    python -m scm_jax.sample --config=experiments/imagenet512.py:variant=xxl --workdir=DIR \
        --stage=scd --steps=2 --num=64 [--labels=207,360] [--guidance=1.3] --out=grid.png

--stage names a training stage of the config; its latest checkpoint's EMA is sampled the way
its objective says: a consistency model in --steps steps (1: from t_max; 2: t_mid = --t_mid;
more: `sampling.multistep_times`), a diffusion model with its ODE solver in --steps solver steps
(2 steps - 1 evaluations, --solver). --labels are cycled over the samples (default: all classes
in turn); --guidance is the student's guidance input or the teacher's classifier-free guidance
scale. Samples are drawn --batch_size at a time over every device (and process, with
--distributed), the i-th batch from fold_in(PRNGKey(--seed), i), with a progress line.

--out ending in .png writes a grid (latent models: decoded by the SD-VAE of
`--config.eval.vae.weights`, or a preview of the first three latent channels without it);
ending in .npz writes `samples` (the model's space: pixels in [-1, 1] or normalized latents),
`labels`, and, when decoded, `images` (uint8). Exit status 0, or 2 with one line `error: ...`.
"""
import math
import sys
import time

import jax
import numpy as np


from scm_jax import cli, configs, files, objectives, sampling, sharding, stage_restore
from scm_jax.data import data_shape
from scm_jax.errors import ConfigError


def method_for(objective, steps: int, *, t_mid: float = sampling.T_MID, solver: str = "dpm2s"):
    """The sampler of `objective` with `steps` (network steps for a CM, solver steps for a
    diffusion model)."""
    if steps < 1:
        raise ConfigError(f"--steps={steps} is invalid: expected >= 1")
    return sampling.method_for(objective, steps, t_mid=t_mid, solver=solver)


def parse_labels(text: str, num: int, num_classes: int) -> np.ndarray:
    """[num] int32 labels: the comma list `text` cycled, or every class in turn."""
    if not text:
        return (np.arange(num) % max(num_classes, 1)).astype(np.int32)
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--labels={text!r} is invalid: expected comma-separated class "
                          f"indices") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if not num_classes or bad or not values:
        raise ConfigError(f"--labels={text!r} is invalid: expected indices in [0, "
                          f"{num_classes}) of this {num_classes}-class model")
    return np.resize(np.asarray(values, np.int32), num)


def generate(config, workdir, stage: str, *, steps: int, num: int, labels: str = "",
             guidance: float = 1.0, seed: int = 0, batch_size: int = 64, t_mid: float = 1.1,
             solver: str = "dpm2s", log=print):
    """(samples [num, *shape] in the model's space, labels [num] or None, the Method)."""
    if stage not in configs.training_stages(config):
        raise ConfigError(f"--stage={stage!r} is invalid: expected one of "
                          f"{configs.training_stages(config)}")
    if num < 1:
        raise ConfigError(f"--num={num} is invalid: expected >= 1")
    objective = objectives.build(config, stage)
    method = method_for(objective, steps, t_mid=t_mid, solver=solver)
    mesh = sharding.make_mesh(config.mesh)
    params, step = stage_restore.restore_stage_ema(config, stage, workdir, mesh, log=log)
    model = objective.model_cfg
    label_array = parse_labels(labels, num, model.num_classes)
    draw = sampling.sampler(objective.net_eval, data_shape(config.data), objective.sigma_d,
                            method, num_classes=model.num_classes,
                            guidance_input=model.guidance_input, scale=float(guidance),
                            out_sharding=sharding.replicated(mesh))
    devices = sharding.batch_devices(mesh)
    batch_size = -(-min(batch_size, num) // devices) * devices
    from scm_jax.evaluate import chunk_generator

    chunks = chunk_generator(draw, params, label_array, batch_size, jax.random.PRNGKey(seed), mesh)
    out, start, total = [], time.time(), math.ceil(num / batch_size)
    log(f"[sample] {stage} (step {step}): {num} samples, {method.nfe} evaluations each, "
        f"guidance {guidance:g}")
    for i in range(total):
        out.append(np.asarray(chunks(i)))
        rate = min((i + 1) * batch_size, num) / max(time.time() - start, 1e-9)
        log(f"[sample] {min((i + 1) * batch_size, num)}/{num} ({rate:.1f} samples/s, eta "
            f"{(num - min((i + 1) * batch_size, num)) / max(rate, 1e-9):.0f}s)")
    samples = np.concatenate(out)[:num]
    return samples, (label_array if model.num_classes else None), method


def decode_pixels(config, samples: np.ndarray):
    """uint8 images of the samples: pixels quantized, latents decoded by config.eval.vae (None
    when a latent model has no VAE weights configured)."""
    from scm_jax.evaluation.pixels import to_uint8

    if config.data.name != "imagenet512_latents":
        return np.asarray(to_uint8(np.clip(samples, -1.0, 1.0)))
    if not config.get("eval") or not config.eval.vae.weights:
        return None
    from scm_jax.evaluation.evaluators import latent_decoder

    decode, params = latent_decoder(config.eval, config.data)
    decoded = jax.jit(decode)(params, samples)
    return np.asarray(to_uint8(decoded))


def write(config, samples, labels, out: str) -> None:
    """The .png grid or .npz arrays (module docstring)."""
    from scm_jax.metrics_log import save_image_grid

    images = decode_pixels(config, samples)
    if out.endswith(".npz"):
        arrays = dict(samples=samples.astype(np.float32))
        if labels is not None:
            arrays["labels"] = labels
        if images is not None:
            arrays["images"] = images
        files.save_npz(out, **arrays)
        return
    rows = max(1, int(math.sqrt(len(samples))))
    if images is not None:
        scale = max(1, 64 // images.shape[1])
        save_image_grid(images.astype(np.float32), out, rows=rows, low=0.0, high=255.0,
                        scale=scale)
    else:   # latents without a VAE: the first three channels, as the training grids show them
        sigma_d = float(config.data.sigma_d)
        save_image_grid(np.clip(samples[..., :3] / (2 * sigma_d), -1, 1), out, rows=rows)


def _define_flags(fv) -> None:
    from absl import flags

    cli.define_config_flags(fv)
    flags.DEFINE_string("workdir", None, "the run's workdir (its <stage>/ checkpoints)",
                        flag_values=fv)
    flags.DEFINE_string("stage", None, "the training stage to sample", flag_values=fv)
    flags.DEFINE_integer("steps", 2, "CM steps, or a diffusion model's solver steps",
                         flag_values=fv)
    flags.DEFINE_integer("num", 64, "number of samples", flag_values=fv)
    flags.DEFINE_string("labels", "", "comma-separated class labels, cycled", flag_values=fv)
    flags.DEFINE_float("guidance", 1.0, "guidance scale", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "samples per call over all devices", flag_values=fv)
    flags.DEFINE_float("t_mid", sampling.T_MID, "2-step intermediate time", flag_values=fv)
    flags.DEFINE_enum("solver", "dpm2s", list(sampling.SOLVERS), "teacher ODE solver",
                      flag_values=fv)
    flags.DEFINE_string("out", None, "grid .png or arrays .npz", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "stage", "out"], flag_values=fv)


def _run(fv, overrides) -> None:
    if not fv.out.endswith((".png", ".npz")):
        raise ConfigError(f"--out={fv.out!r} is invalid: expected a .png or .npz path")
    config = cli.load_config(fv, overrides)
    say = (lambda m: print(m, flush=True)) if files.is_primary() else (lambda m: None)
    samples, labels, _ = generate(
        config, fv.workdir, fv.stage, steps=fv.steps, num=fv.num, labels=fv.labels,
        guidance=fv.guidance, seed=fv.seed, batch_size=fv.batch_size, t_mid=fv.t_mid,
        solver=fv.solver, log=say)
    if files.is_primary():
        write(config, samples, labels, fv.out)
    say(f"[sample] wrote {fv.out}")


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    return cli.run_command(__doc__, _define_flags, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
