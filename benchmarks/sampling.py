"""Sampling and feature-extraction throughput, and what a 50k-sample FID costs per preset.

    python benchmarks/sampling.py [--config=experiments/digits.py] [--batch=256] [--repeats=5]
        [--json=PATH]

1. Images/s of one network (the config's default: the digits U-Net, random weights) sampled by
   the package's one entry point (`sampling.sampler`): 1-step, 2-step, multistep M = 4, and
   the teacher's solver at 35 and 63 evaluations (DPM-Solver-2S, 18 and 32 steps), same
   batch, same process, best of --repeats after a compile. The overhead of the sampler beyond
   its network evaluations shows as 1-step images/s vs (teacher NFE-63 images/s x 63): equal
   when a step costs exactly one evaluation (goal: within 10%).
2. Images/s of the two feature networks (random weights, full size: Inception-v3 at 299x299,
   DINOv2 ViT-L/14 at 224x224) on 32x32 inputs (their resize included).
3. For every paper preset, the forward FLOPs per image (XLA's `cost_analysis()` of the lowered
   forward) and from them the compute of a 50k-sample evaluation row (1-step, 2-step, the
   teacher at 63 evaluations, x2 for classifier-free guidance on ImageNet 512) plus the
   feature networks, and its time on a v5p-64 slice (32 chips, 459 TFLOP/s bf16 each) at an
   assumed 40% of peak: an estimate, not a measurement.
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scm_jax import cli, configs, objectives, sampling  # noqa: E402
from scm_jax.data import data_shape  # noqa: E402
from scm_jax.evaluation import dinov2, inception  # noqa: E402

V5P_CHIP_FLOPS, V5P_64_CHIPS, ASSUMED_MFU = 459e12, 32, 0.4


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())   # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def sampler_throughput(spec: str, batch: int, repeats: int) -> list:
    config = configs.load(spec)
    objective = objectives.build(config, "teacher")
    shape = data_shape(config.data)
    state = objective.init_state(jax.random.PRNGKey(0), shape)
    params = state.nets["net"].params
    labels = jnp.arange(batch, dtype=jnp.int32) % max(config.model.num_classes, 1)
    sd = objective.sigma_d
    rows = []
    for name, method in (("1-step", sampling.one_step(sd)), ("2-step", sampling.two_step(sd)),
                         ("4-step", sampling.multistep(sd, 4)),
                         ("teacher NFE 35", sampling.ode(18)), ("teacher NFE 63", sampling.ode(32))):
        draw = sampling.sampler(objective.net_eval, shape, sd, method,
                                num_classes=config.model.num_classes)
        seconds = best_time(lambda: draw(params, jax.random.PRNGKey(1), labels), repeats)
        rows.append(dict(sampler=name, nfe=method.nfe, seconds=seconds,
                         images_per_second=batch / seconds))
    return rows


def feature_throughput(batch: int, repeats: int) -> list:
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), np.uint8))
    rows = []
    inc = inception.params_from_flat(inception.convert_state_dict(inception.random_state_dict()))
    dino, preset = dinov2.params_from_flat(dinov2.convert_state_dict(
        dinov2.random_state_dict("vitl14")))
    for name, fn, p in (("inception (FID)", lambda p, x: inception.feature_fn(p)(x), inc),
                        ("dinov2 ViT-L/14 (FD-DINOv2)",
                         lambda p, x: dinov2.feature_fn(p, preset)(x), dino)):
        f = jax.jit(fn)
        seconds = best_time(lambda: f(p, images), repeats)
        rows.append(dict(network=name, seconds=seconds, images_per_second=batch / seconds))
    return rows


def eval_cost_estimates() -> list:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from param_flops import PRESETS, measure

    inc_flops = 2 * 5.7e9     # Inception-v3 at 299: ~5.7 G multiply-adds
    dino_flops = 2 * 77.8e9   # ViT-L/14 at 224: ~78 G multiply-adds
    out = []
    for name, (spec, shape, _, _) in PRESETS.items():
        _, flops = measure(spec, shape, "sCM")
        gflops = flops / 1e9
        # The guided student takes the scale as an input; the teacher's CFG doubles its batch.
        cfg = 2 if "in512" in name else 1
        per_row = {k: 50_000 * (nfe * flops + inc_flops + dino_flops)
                   for k, nfe in (("1-step", 1), ("2-step", 2), ("teacher-63", 63 * cfg))}
        seconds = {k: v / (V5P_64_CHIPS * V5P_CHIP_FLOPS * ASSUMED_MFU) for k, v in per_row.items()}
        out.append(dict(preset=name, forward_gflops=gflops, teacher_cfg_factor=cfg, row_flops=per_row,
                        v5p64_seconds_at_40pct=seconds))
    return out


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("config", "experiments/digits.py", "the experiment whose samplers are "
                        "timed", flag_values=fv)
    flags.DEFINE_integer("batch", 256, "images per sampler call", flag_values=fv)
    flags.DEFINE_integer("feature_batch", 8, "images per feature-network call", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "timed repeats (the fastest counts)", flag_values=fv)
    flags.DEFINE_string("json", "", "also write the results to this JSON file", flag_values=fv)
    flags.DEFINE_bool("skip_presets", False, "skip the paper presets' evaluation cost estimates",
                      flag_values=fv)
    flags.DEFINE_bool("skip_features", False, "skip the feature networks' throughput",
                      flag_values=fv)


def main(argv=None):
    """The command; argv without the program name (sys.argv's by default). Returns the exit
    status."""
    return cli.run_command(__doc__, _define_flags, _measure_all, cli.program_argv(argv),
                           takes_overrides=False)


def _measure_all(args, overrides) -> int:
    result = dict(device=jax.devices()[0].device_kind, config=args.config, batch=args.batch)
    result["samplers"] = sampler_throughput(args.config, args.batch, args.repeats)
    by = {r["sampler"]: r for r in result["samplers"]}
    ideal = by["teacher NFE 63"]["images_per_second"] * 63
    result["one_step_vs_ideal"] = by["1-step"]["images_per_second"] / ideal
    print(f"| sampler | NFE | images/s ({result['device']}, batch {args.batch}) |\n|---|---|---|")
    for r in result["samplers"]:
        print(f"| {r['sampler']} | {r['nfe']} | {r['images_per_second']:.1f} |")
    print(f"1-step images/s / (teacher NFE-63 images/s x 63) = {result['one_step_vs_ideal']:.3f}")
    if not args.skip_features:
        result["features"] = feature_throughput(args.feature_batch, max(2, args.repeats // 2))
        print("\n| feature network | images/s |\n|---|---|")
        for r in result["features"]:
            print(f"| {r['network']} | {r['images_per_second']:.2f} |")
    if not args.skip_presets:
        result["presets"] = eval_cost_estimates()
        print("\n| preset | forward GFLOPs | 50k-sample row on v5p-64 at 40% MFU: 1-step / 2-step / "
              "teacher 63 NFE |\n|---|---|---|")
        for r in result["presets"]:
            s = r["v5p64_seconds_at_40pct"]
            print(f"| {r['preset']} | {r['forward_gflops']:.1f} | {s['1-step']:.0f} s / "
                  f"{s['2-step']:.0f} s / {s['teacher-63'] / 60:.1f} min |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
