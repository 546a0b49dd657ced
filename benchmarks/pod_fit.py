"""Fit and speed of every paper preset and stage on TPU slices and GPU nodes, from compiles on
this CPU host.

    python benchmarks/pod_fit.py --json=PATH [--only=edm2-in512-xxl:scd,...]
        [--platforms=v5p,v6e,h100,h200]
        [--attention]   # also the tangent pass with attention_impl 'auto' vs 'xla'

For every preset (cifar10 paper, imagenet64 s..xl, imagenet512 s..xxl, DiT s..xl) and stage
(teacher, sct, scd) at the paper's global batch, it looks for the smallest slice of each
platform (TPU: v5p, v6e, powers of two; GPU: h100, h200, nodes of 8 GPUs, powers of two) on
which the step fits, trying FSDP over every chip (GPU: over a node's GPUs, data parallel across
nodes) first without and then with rematerialization (`model.remat=block`), and records for that
slice what `python -m scm_jax.compile --with_teacher` reports (per-chip memory, estimated step
time, MFU, the step's time and FLOPs relative to the teacher step of the same network, batch
and mesh). Each try is one compile of the stage alone; a step that does not fit (its arguments
alone exceed the memory, or the compiler runs out of it) moves the search on, and the teacher
step is compiled only beside the setting that fits (once per preset, slice and setting: shared
by the stages). The search starts from the slice the parameters, their Adam moments and their
EMA need at least. Every figure is the compiler's: on TPU its time estimate (a lower bound on
time, so MFU is an upper bound); on GPU memory from XLA's GPU compiler without a device and
time from the compile check's roofline (`scm_jax.gpu_roofline`, an estimate of our own). The
compiler's answers are kept on disk (`scm_jax.compile_cache`; `--no_compile_cache` turns that
off), so a repeated question costs a lowering, not a compile.

A slice and setting where a smaller network of the same family (EDM2 S < M < ... < XXL at
one resolution, DiT S < B < L < XL) did not fit at the same stage is not compiled for the wider
one: it is recorded in `tried` as `fit_source: inferred` with the smaller preset's name and
bytes (a wider network at the same batch, slice and setting needs at least as much memory).
Likewise a consistency stage (sCT, sCD) is not compiled where the same preset's teacher step did
not fit at the same batch, slice and setting (`fit_source: inferred`, `inferred_from` naming the
teacher): the CM step holds the same parameter state, a frozen teacher or the data beside it,
and its tangent pass's activations besides the gradient pass's. The TPU compiler finishes a
program that exceeds HBM by less than about 1.5x and reports its size (an EDM2 step at v5p-8
without rematerialization: 15-18 minutes), so this saves the longest compiles of the search;
one that exceeds it by more can take longer still, and more host memory than a 24 GiB machine
spares beside another job (EDM2 ImageNet-512 S sCD for v6e-4 and v6e-8 with remat=block: each
killed by the host's out-of-memory at 18.8-18.9 GB resident, after 45-60 minutes).

Results are written to --json after every entry, and entries already there are skipped, so an
interrupted run resumes; `benchmarks/pod_fit_table.py` makes the tables of docs/paper-scale.md
from it. On a 2-core host one TPU compile of a DDPM++ CIFAR-10 step takes 9-18 minutes, a DiT-S
step 1-2 minutes, an EDM2-XXL sCD step 8 minutes; a GPU compile of an EDM2 step 1-2 minutes.
"""
import json
import math
import os
import sys
import time

import jax

from scm_jax import compile as cc
from scm_jax import cli, compile_cache, configs, objectives, sharding
from scm_jax.errors import ConfigError
from scm_jax.data import data_shape

import pod_fit_table
from pod_fit_table import PRESETS, STAGES

SIZES = {"v5p": [f"v5p-{2 * c}" for c in (4, 8, 16, 32, 64, 128, 256, 512)],
         "v6e": [f"v6e-{c}" for c in (4, 8, 16, 32, 64, 128, 256)],
         # GPU nodes of 8: FSDP over a node's GPUs, data parallel across nodes
         **{gpu: [f"{gpu}-8"] + [f"{gpu}-8x{n}" for n in (2, 4, 8, 16, 32)]
            for gpu in ("h100", "h200")}}
SETTINGS = ("none", "block")   # remat, with FSDP over every chip
# params + Adam's two moments + EMA, float32, per parameter (gradients and activations extra)
STATE_BYTES_PER_PARAM = 16


def parameter_count(config, stage: str) -> int:
    abstract, _ = objectives.build(config, stage, platform="cpu").abstract_state(
        data_shape(config.data))
    return sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.nets["net"].params))


def with_settings(spec: str, stage: str, topology, remat: str):
    """The preset with FSDP over every chip of `topology` and `remat`."""
    return configs.load(spec, [f"stage={stage}", f"model.remat={remat}", *cc.auto_mesh(topology)])


# Teacher-step compiles shared by the stages of one preset on one slice (compile.check's cache).
TEACHER_CACHE = {}


def family(preset: str) -> str:
    """'edm2-in512' of 'edm2-in512-xl': presets that differ only in width (PRESETS' order is
    smallest first)."""
    return preset.rsplit("-", 1)[0]


def smaller_failures(results: dict, preset: str, stage: str, platform: str) -> dict:
    """{(slice, remat): (smaller preset, required bytes)} where a smaller network of `preset`'s
    family did not fit at the same stage, platform, slice and setting, by the compiler's answer
    (the first such preset)."""
    out = {}
    for other in PRESETS:
        if other == preset:
            break
        if family(other) != family(preset):
            continue
        for t in results.get(f"{other}:{stage}:{platform}", {}).get("tried", []):
            if t.get("fits") is False and t.get("fit_source") != "inferred":
                out.setdefault((t["topology"], t["remat"]), (other, t.get("required_bytes_per_chip")))
    return out


def teacher_failures(results: dict, preset: str, stage: str, platform: str, config) -> dict:
    """{(slice, remat): ('<preset> teacher', required bytes)} where `preset`'s teacher step did
    not fit on `platform` (by the compiler or by inference), for a consistency `stage` whose
    batch and microbatches in `config` are the teacher's: the CM step needs at least the
    teacher step's memory there."""
    if stage == "teacher" or (config[stage].batch_size, config[stage].get("microbatches", 1)) != (
            config.teacher.batch_size, config.teacher.get("microbatches", 1)):
        return {}
    out = {}
    for t in results.get(f"{preset}:teacher:{platform}", {}).get("tried", []):
        if t.get("fits") is False:
            out.setdefault((t["topology"], t["remat"]),
                           (f"{preset} teacher", t.get("required_bytes_per_chip")))
    return out


def fit(spec: str, stage: str, platform: str, log, teacher_entry=None, cache_dir=None,
        smaller=None) -> dict:
    """The smallest slice of `platform` where `stage` fits, with the compile check's report.
    `teacher_entry`: this preset's teacher result on `platform`, whose compile is reused where
    the slice, remat and batch are the same. `smaller` (`smaller_failures`): slices and settings
    where a smaller network of the same family (or this preset's teacher step,
    `teacher_failures`) did not fit; they are not compiled (a wider network, or a CM step, at
    the same batch needs at least its memory) and are recorded as 'inferred'."""
    base = configs.load(spec, [f"stage={stage}"])
    state_bytes = STATE_BYTES_PER_PARAM * parameter_count(base, stage)
    smaller = smaller or {}
    tried = []
    for product in SIZES[platform]:
        topology = cc.parse_topology(product)
        if state_bytes / topology.chips > topology.available_bytes:
            tried.append(dict(topology=product, skipped="parameter state alone exceeds HBM"))
            continue
        if base[stage].batch_size % (topology.chips * topology.num_slices):
            tried.append(dict(topology=product, skipped="batch does not divide over the chips"))
            continue
        for remat in SETTINGS:
            if (product, remat) in smaller:
                other, required = smaller[product, remat]
                tried.append(dict(topology=product, remat=remat, fits=False,
                                  fit_source="inferred", inferred_from=other,
                                  required_bytes_per_chip=required))
                log(f"  {product} remat={remat}: does not fit (inferred: {other} does not)")
                continue
            start = time.time()
            config = with_settings(spec, stage, topology, remat)
            t = teacher_entry or {}
            if (t.get("fits") and t.get("topology") == product and t.get("remat") == remat
                    and t.get("batch_size") == config[stage].batch_size
                    and t.get("microbatches") == config[stage].microbatches):
                known = dict(seconds=t["step_seconds"], peak_bytes=t["peak_bytes_per_chip"],
                             flops=t["flops_per_step"], fits=True,
                             compile_seconds=t.get("compile_seconds"),
                             lowered_flops=t.get("lowered_flops_per_step"))
                TEACHER_CACHE[cc.teacher_cache_key(config, stage, topology)] = {
                    k: v for k, v in known.items() if v is not None}
            report = cc.check(config, stage, topology, log=lambda m: None, with_teacher=True,
                              teacher_cache=TEACHER_CACHE, mesh_source=cc.AUTO_MESH,
                              cache_dir=cache_dir)
            report["check_seconds"] = time.time() - start
            tried.append({k: report[k] for k in (
                "remat", "fits", "fit_source", "required_bytes_per_chip", "lower_seconds",
                "compile_seconds")} | dict(topology=product))
            required = report["required_bytes_per_chip"]
            log(f"  {product} remat={remat}: "
                f"{'?' if required is None else f'{required / cc.GIB:.1f}'} GiB per chip -> "
                f"{'fits' if report['fits'] else 'does not fit'} ({report['fit_source']}; "
                f"lowered in {report['lower_seconds']:.0f} s, compiled in "
                f"{report['compile_seconds']:.0f} s, check {report['check_seconds']:.0f} s)")
            if report["fits"]:
                return dict(report, tried=tried)
    return dict(fits=False, tried=tried)


def tangent_pass(spec: str, impl: str, product: str) -> dict:
    """Per-chip memory and estimated time of the sCD tangent pass alone (targets, no gradient)."""
    from scm_jax.objectives.randomness import Randomness
    from scm_jax.stage import build_stage

    topology = cc.parse_topology(product)
    config = configs.load(spec, ["stage=scd", f"model.attention_impl={impl}",
                                 *cc.auto_mesh(topology)])
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


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("json", None, "the results file (read first: entries already there are "
                        "skipped, so a run resumes)", flag_values=fv)
    flags.mark_flag_as_required("json", flag_values=fv)
    flags.DEFINE_string("only", "", "preset:stage,... (default: all)", flag_values=fv)
    flags.DEFINE_string("platforms", "v5p,v6e", "comma-separated: v5p, v6e, h100, h200",
                        flag_values=fv)
    flags.DEFINE_bool("attention", False, "also the tangent pass of DiT-XL and EDM2-XXL, 'auto' "
                      "vs 'xla'", flag_values=fv)
    flags.DEFINE_bool("no_compile_cache", False, "compile every step anew instead of reusing the "
                      "compiler's answers", flag_values=fv)


def main(argv=None):
    """The command; argv without the program name (sys.argv's by default). Returns the exit
    status."""
    return cli.run_command(__doc__, _define_flags, _fit_all, cli.program_argv(argv),
                           takes_overrides=False)


def _fit_all(args, overrides) -> int:
    unknown = [p for p in args.platforms.split(",") if p not in SIZES]
    if unknown:
        raise ConfigError(f"--platforms={args.platforms}: {unknown[0]!r} is not one of "
                          f"{', '.join(SIZES)}")
    wanted = [tuple(item.split(":")) for item in args.only.split(",") if item]
    for item in wanted:
        if len(item) != 2 or item[0] not in PRESETS or item[1] not in STAGES:
            raise ConfigError(f"--only: {':'.join(item)!r} is not <preset>:<stage> with a preset "
                              f"of {', '.join(PRESETS)} and a stage of {', '.join(STAGES)}")
    cache_dir = compile_cache.directory(not args.no_compile_cache)
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

    wanted = wanted or [(preset, stage) for preset in PRESETS for stage in STAGES]
    for preset, stage in wanted:
        for platform in args.platforms.split(","):
            key = f"{preset}:{stage}:{platform}"
            if key in results:
                continue
            print(f"{key}", file=sys.stderr, flush=True)
            report = fit(PRESETS[preset], stage, platform,
                         log=lambda m: print(m, file=sys.stderr, flush=True),
                         teacher_entry=results.get(f"{preset}:teacher:{platform}"),
                         cache_dir=cache_dir,
                         smaller=teacher_failures(
                             results, preset, stage, platform,
                             configs.load(PRESETS[preset], [f"stage={stage}"]))
                         | smaller_failures(results, preset, stage, platform))
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
    print(pod_fit_table.format_tables(results, PRESETS, STAGES)
          + pod_fit_table.format_tables(results, PRESETS, STAGES, pod_fit_table.GPU_PLATFORMS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
