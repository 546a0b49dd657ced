"""Fit and speed of every paper preset and stage on TPU slices, from compiles on this CPU host.

    python benchmarks/pod_fit.py --json=PATH [--only=edm2-in512-xxl:scd,...] [--platforms=v5p,v6e]
        [--attention]   # also the tangent pass with attention_impl 'auto' vs 'xla'

For every preset (cifar10 paper, imagenet64 s..xl, imagenet512 s..xxl, DiT s..xl) and stage
(teacher, sct, scd) at the paper's global batch, it looks for the smallest v5p and the smallest
v6e slice (powers of two) on which the step fits, trying FSDP over every chip first without and
then with rematerialization (`model.remat=block`), and records for that slice what
`python -m scm_jax.compile` reports (per-chip memory, estimated step time, MFU, the step's time
and FLOPs relative to the teacher step of the same network, batch and mesh). The search starts
from the slice the parameters, their Adam moments and their EMA need at least. Every figure is
the TPU compiler's; MFU from its time estimate (a lower bound on time) is an upper bound.

Results are written to --json after every entry, and entries already there are skipped, so an
interrupted run resumes. On a 2-core host one compile of a DDPM++ CIFAR-10 step takes 9-18
minutes, a DiT-S step 1-2 minutes, and an EDM2-XXL sCD step did not finish in 50 minutes.
"""
import argparse
import json
import math
import os
import sys
import time

import jax

from scm_jax import compile as cc
from scm_jax import configs, objectives, sharding
from scm_jax.data import data_shape

PRESETS = {
    "ddpmpp-cifar10": "experiments/cifar10.py:variant=paper",
    **{f"edm2-in64-{s}": f"experiments/imagenet64.py:variant={s}" for s in ("s", "m", "l", "xl")},
    **{f"edm2-in512-{s}": f"experiments/imagenet512.py:variant={s}"
       for s in ("s", "m", "l", "xl", "xxl")},
    **{f"dit-in512-{s}": f"experiments/imagenet512.py:variant={s},backbone=dit"
       for s in ("s", "b", "l", "xl")},
}
STAGES = ("teacher", "sct", "scd")
SIZES = {"v5p": [f"v5p-{2 * c}" for c in (4, 8, 16, 32, 64, 128, 256, 512)],
         "v6e": [f"v6e-{c}" for c in (4, 8, 16, 32, 64, 128, 256)]}
SETTINGS = ("none", "block")   # remat, with FSDP over every chip
# params + Adam's two moments + EMA, float32, per parameter (gradients and activations extra)
STATE_BYTES_PER_PARAM = 16


def parameter_count(config, stage: str) -> int:
    abstract, _ = objectives.build(config, stage, platform="cpu").abstract_state(
        data_shape(config.data))
    return sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.nets["net"].params))


def with_settings(spec: str, stage: str, chips: int, remat: str):
    config = configs.load(spec, [f"stage={stage}", "mesh.data=1", f"mesh.fsdp={chips}",
                                 f"model.remat={remat}"])
    return config


# Teacher-step compiles shared by the stages of one preset on one slice (compile.check's cache).
TEACHER_CACHE = {}


def fit(spec: str, stage: str, platform: str, log, teacher_entry=None) -> dict:
    """The smallest slice of `platform` where `stage` fits, with the compile check's report.
    `teacher_entry`: this preset's teacher result on `platform`, whose compile is reused where
    the slice, remat and batch are the same."""
    base = configs.load(spec, [f"stage={stage}"])
    state_bytes = STATE_BYTES_PER_PARAM * parameter_count(base, stage)
    tried = []
    for product in SIZES[platform]:
        topology = cc.parse_topology(product)
        if state_bytes / topology.chips > topology.chip.hbm_bytes:
            tried.append(dict(topology=product, skipped="parameter state alone exceeds HBM"))
            continue
        if base[stage].batch_size % topology.chips:
            tried.append(dict(topology=product, skipped="batch does not divide over the chips"))
            continue
        for remat in SETTINGS:
            start = time.time()
            config = with_settings(spec, stage, topology.chips, remat)
            t = teacher_entry or {}
            if (t.get("topology") == product and t.get("remat") == remat
                    and t.get("batch_size") == config[stage].batch_size
                    and t.get("microbatches") == config[stage].microbatches):
                TEACHER_CACHE[cc.teacher_cache_key(config, stage, topology)] = dict(
                    seconds=t["step_seconds"], peak_bytes=t["peak_bytes_per_chip"],
                    flops=t["flops_per_step"])
            report = cc.check(config, stage, topology, log=lambda m: None,
                              teacher_cache=TEACHER_CACHE)
            report["compile_seconds"] = time.time() - start
            tried.append(dict(topology=product, remat=remat, fits=report["fits"],
                              peak_bytes_per_chip=report["peak_bytes_per_chip"]))
            log(f"  {product} remat={remat}: {report['peak_bytes_per_chip'] / cc.GIB:.1f} GiB "
                f"per chip -> {'fits' if report['fits'] else 'does not fit'} "
                f"({report['compile_seconds']:.0f} s)")
            if report["fits"]:
                return dict(report, tried=tried)
    return dict(fits=False, tried=tried)


def tangent_pass(spec: str, impl: str, product: str) -> dict:
    """Per-chip memory and estimated time of the sCD tangent pass alone (targets, no gradient)."""
    from scm_jax.objectives.randomness import Randomness
    from scm_jax.stage import build_stage

    topology = cc.parse_topology(product)
    config = configs.load(spec, ["stage=scd", "mesh.data=1", f"mesh.fsdp={topology.chips}",
                                 f"model.attention_impl={impl}"])
    mesh = sharding.make_mesh(config.mesh, cc.topology_devices(topology))
    stage = build_stage(config, "scd", mesh)
    objective = stage.objective

    def targets(state, batch, teacher_params):
        rng = Randomness.for_batch(jax.random.PRNGKey(0), batch["image"].shape[0])
        params = {name: net.params for name, net in state.nets.items()}
        return objective.targets(rng, batch, params, state.step, stage.teacher, teacher_params)

    with sharding.activation_sharding(mesh, stage.rules):
        compiled = jax.jit(targets).lower(stage.abstract_state, stage.batch_abstract,
                                          stage.teacher_abstract).compile()
    figures = cc.compiled_figures(compiled, mesh)
    return dict(spec=spec, attention_impl=objective.model_cfg.attention_impl, topology=product,
                peak_bytes_per_chip=figures["peak_bytes"],
                temp_bytes_per_chip=figures["temp_bytes"], seconds=figures["seconds"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--only", default="", help="preset:stage,... (default: all)")
    parser.add_argument("--platforms", default="v5p,v6e")
    parser.add_argument("--attention", action="store_true",
                        help="also the tangent pass of DiT-XL and EDM2-XXL, 'auto' vs 'xla'")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)

    def save():
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, args.json)

    wanted = [tuple(item.split(":")) for item in args.only.split(",") if item] or [
        (preset, stage) for preset in PRESETS for stage in STAGES]
    for preset, stage in wanted:
        for platform in args.platforms.split(","):
            key = f"{preset}:{stage}:{platform}"
            if key in results:
                continue
            print(f"{key}", file=sys.stderr, flush=True)
            report = fit(PRESETS[preset], stage, platform,
                         log=lambda m: print(m, file=sys.stderr, flush=True),
                         teacher_entry=results.get(f"{preset}:teacher:{platform}"))
            report.pop("compiled", None)
            results[key] = report
            save()
    if args.attention:
        for name in ("dit-in512-xl", "edm2-in512-xxl"):
            for impl in ("auto", "xla"):
                key = f"tangent:{name}:{impl}"
                if key not in results:
                    results[key] = tangent_pass(PRESETS[name], impl, "v5p-128")
                    save()
    print(format_table(results))


def format_table(results: dict) -> str:
    gib = cc.GIB
    lines = ["| preset | stage | smallest v5p | smallest v6e | per-chip memory (v5p / v6e) | "
             "est. step (v5p) | MFU (v5p) | time / teacher (v5p) |", "|---|---|---|---|---|---|---|---|"]
    for preset in PRESETS:
        for stage in STAGES:
            v5p, v6e = (results.get(f"{preset}:{stage}:{p}") for p in ("v5p", "v6e"))
            if v5p is None and v6e is None:
                continue

            def where(r):
                if r is None:
                    return "not run"
                if not r.get("fits"):
                    return "none tried fits"
                return f"{r['topology']} (fsdp {r['mesh']['fsdp']}, remat {r['remat']})"

            mem = " / ".join(f"{r['peak_bytes_per_chip'] / gib:.1f} GiB" if r and r.get("fits")
                             else "-" for r in (v5p, v6e))
            ok = v5p is not None and v5p.get("fits")
            lines.append(
                f"| {preset} | {stage} | {where(v5p)} | {where(v6e)} | {mem} | "
                f"{v5p['step_seconds'] * 1e3:.0f} ms | {100 * v5p['mfu']:.0f}% | "
                f"{v5p['step_seconds_vs_teacher']:.2f}x |" if ok else
                f"| {preset} | {stage} | {where(v5p)} | {where(v6e)} | {mem} | - | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
