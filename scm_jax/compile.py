r"""The real train step compiled for a TPU slice (or GPU nodes) on this (CPU) host: does it
fit, how fast.

    python -m scm_jax.compile --config=experiments/imagenet512.py:variant=xxl,stage=scd \
        --topology=v5p-128 [--num_slices=1] [--with_teacher] [--json=PATH] \
        [--config.mesh.fsdp=8 ...] [--nocompile_cache]

The stage is built exactly as `train.py` builds it (`stage.build_stage`: objective, optimizer,
EMA, teacher, mesh, logical rules, shardings, the one jitted step), with abstract arrays placed
on the devices of the TPU topology (`jax.experimental.topologies`, through libtpu), lowered,
and compiled by the TPU compiler: one compile per question. It prints, per chip, the memory of
the compiled program (arguments, outputs, temporaries, total) against the chip's HBM; the FLOPs
of one step; an estimated step time: the compiler's estimate of the computation
(`optimal_seconds`, a lower bound) plus the collectives' bytes (read from the compiled program)
over the chip's interconnect bandwidth, which the compiler does not estimate, assuming no
overlap; images/s and MFU from it; the largest buffers and where they come from; and the step's
FLOPs relative to the diffusion (teacher) step of the same network, batch and mesh, from the
two lowered programs (no second compile). `--with_teacher` also compiles that teacher step, for
the ratio of the estimated times. Nothing runs on a TPU: every figure is an estimate.

A step that cannot fit is an answer, not an error: `fits: false` with the bytes required and
the bytes available per chip, found without compiling when the arguments alone (parameters,
optimizer state, EMAs, teacher, batch: from their shapes and shardings, a lower bound since
the TPU's tiled layouts pad small arrays) exceed HBM, or else from the compiler's
out-of-memory error (`RESOURCE_EXHAUSTED`, which libtpu raises within seconds).

Unless the command line sets `--config.mesh.data` or `--config.mesh.fsdp`, the mesh is FSDP
over all the chips of a slice (`data = slices, fsdp = chips per slice`): the paper configs'
`data=-1, fsdp=1` would replicate the whole training state on every chip.

The compiler's answers are kept on disk (`scm_jax.compile_cache`), so asking the same question
again skips the compile.

MFU = (forward + backward FLOPs of the network per image) x images/s / (chips x peak bf16 FLOP/s).

Topologies: `v5p-N` (N TensorCores, 2 per chip, as Cloud TPU names them), `v5litepod-N` or
`v5e-N` and `v6e-N` (N chips), each a power of two in the slice sizes Cloud TPU offers.

GPU nodes (`h100-8`, `h200-8`, `h100-8x4`: `scm_jax.gpu_nodes`) are compiled the same way by
JAX's CUDA plugin for sm_90, deviceless; the fit is against the memory JAX's allocator may take
(`XLA_PYTHON_CLIENT_MEM_FRACTION` of the GPU's), and since XLA gives no time for GPU programs
the estimate is a roofline of our own (`scm_jax.gpu_roofline`), labelled so in the report.
"""
import math
import sys
import time

from scm_jax import gpu_nodes, tpu_slices
from scm_jax.compile_report import format_report, hlo_breakdown, out_of_memory
from scm_jax.tpu_slices import CHIPS, GIB, ICI_BYTES_PER_S, Chip, Topology  # noqa: F401

AUTO_MESH = "auto: fsdp over all chips"


def parse_topology(product: str, num_slices: int = 1):
    """A TPU slice (`tpu_slices.Topology`: v5p-8, v6e-16, ...) or GPU nodes
    (`gpu_nodes.GpuTopology`: h100-8, h200-8x4, ...) by name (ConfigError if unknown)."""
    from scm_jax.errors import ConfigError

    if gpu_nodes.is_gpu_product(product):
        if num_slices != 1:
            raise ConfigError(f"--num_slices = {num_slices} applies to TPU slices; GPU nodes are "
                              f"counted in the topology (e.g. h100-8x4: 4 nodes of 8 GPUs)")
        return gpu_nodes.parse_gpu_topology(product)
    return tpu_slices.parse_topology(product, num_slices)


def topology_devices(topology):
    """The devices of `topology`, described by libtpu or JAX's CUDA plugin (none attached)."""
    if topology.platform == "gpu":
        return gpu_nodes.gpu_devices(topology)
    return tpu_slices.topology_devices(topology)


def auto_mesh(topology: Topology) -> list:
    """The overrides of FSDP over all the chips of each slice, data parallel across slices."""
    return [f"mesh.data={topology.num_slices}", f"mesh.fsdp={topology.chips}"]


def mesh_overrides(overrides, topology: Topology) -> tuple:
    """(the config overrides the compile check loads, where its mesh comes from): the user's
    mesh when the overrides set mesh.data or mesh.fsdp, otherwise FSDP over all the chips."""
    overrides = list(overrides)
    if any(item.split("=", 1)[0].strip() in ("mesh.data", "mesh.fsdp") for item in overrides):
        return overrides, "config"
    source = AUTO_MESH if topology.num_slices == 1 else (
        "auto: fsdp over each slice's chips, data over the slices")
    return overrides + auto_mesh(topology), source


def argument_bytes(stage) -> int:
    """Per-chip bytes of the step's arguments from their shapes and shardings: the train state
    (parameters, optimizer state, EMAs), the teacher's parameters, the batch, the stop flags.
    A lower bound on the compiled program's: TPU layouts pad arrays to tiles."""
    import jax
    import numpy as np

    total = 0
    for a in jax.tree.leaves((stage.abstract_state, stage.batch_abstract,
                              stage.teacher_abstract, stage.signal_abstract)):
        shape = a.shape if a.sharding is None else a.sharding.shard_shape(a.shape)
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return int(total)


def lower_stage(config, name: str, mesh) -> dict:
    """Stage `name` built on `mesh` and lowered: the program, its FLOPs (whole step, all chips,
    before XLA's optimizations) and its arguments' bytes per chip."""
    from scm_jax import step_cost
    from scm_jax.stage import build_stage

    start = time.perf_counter()
    stage = build_stage(config, name, mesh)
    lowered = stage.lower()
    return dict(
        stage=name, objective=config[name].objective, batch_size=int(config[name].batch_size),
        microbatches=int(config[name].microbatches),
        attention_impl=stage.objective.model_cfg.attention_impl, lowered=lowered,
        lower_seconds=time.perf_counter() - start, lowered_flops=step_cost.flops_of(lowered),
        argument_bytes_from_shapes=argument_bytes(stage))


def compile_stage(config, name: str, mesh, topology=None) -> dict:
    """Compiles stage `name`'s step on `mesh`; per-chip memory, FLOPs, estimated seconds."""
    from scm_jax import compile_cache

    report = lower_stage(config, name, mesh)
    with compile_cache.without_jax_cache():
        compiled = report["lowered"].compile()
    return dict(report, **compiled_figures(compiled, mesh, topology))


def _memory(compiled) -> dict:
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return dict(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
        peak_bytes=int(peak))


# Custom calls whose time the TPU compiler's cost model does not estimate: `optimal_seconds`
# counts each as -1 s (libtpu 0.0.42.1). ZeroCrop crops a padded layout to its logical size,
# e.g. each leaf's boolean flag of the train step's non-finite guard (`tree_checks.finite`).
UNESTIMATED_CUSTOM_CALLS = ("ZeroCrop",)


def unestimated_ops(hlo_text: str) -> int:
    """How many operations of a compiled TPU program the compiler's `optimal_seconds` counts
    as -1 s: its custom calls to `UNESTIMATED_CUSTOM_CALLS`, each instruction once (a loop
    body's too, as the cost analysis counts it)."""
    return sum(hlo_text.count(f'custom_call_target="{target}"')
               for target in UNESTIMATED_CUSTOM_CALLS)


def compiled_figures(compiled, mesh, topology=None) -> dict:
    """Per-chip memory, FLOPs and estimated seconds of a program compiled for `mesh` (GPU
    nodes: `topology`, a `gpu_nodes.GpuTopology`, and the roofline of `gpu_roofline`)."""
    from scm_jax import gpu_roofline, hlo_loops, step_cost

    text = compiled.as_text()
    if topology is not None and topology.platform == "gpu":
        figures = gpu_roofline.figures(compiled, topology)
        return dict(_memory(compiled), **figures, compiled=compiled,
                    largest_buffers=hlo_breakdown(text)["largest_buffers"])
    cost = step_cost.cost_analysis(compiled)
    breakdown = hlo_breakdown(text)
    # optimal_seconds counts each operation it cannot estimate as -1 s: count those in the
    # program and take them out (a ceiling of -raw would lose whole seconds of a step longer
    # than 1 s); the collectives' bytes over the interconnect are added below.
    raw = float(cost.get("optimal_seconds", float("nan")))
    unknown = unestimated_ops(text)
    ambiguous = raw + unknown < -1e-3          # more -1 s than the ops known to give them
    if ambiguous:
        unknown = math.ceil(-raw - 1e-6)      # the fraction only: whole seconds may be missing
    compute = raw + unknown
    # The cost analysis counts a loop body (scanned blocks) once: add the matmul FLOPs of the
    # other trips, and scale the compute time by the same factor (an approximation).
    compiler_flops = flops = float(cost.get("flops", float("nan")))
    loops = hlo_loops.loop_extra_flops(text)
    if loops["extra_flops"] and flops > 0:
        compute *= (flops + loops["extra_flops"]) / flops
        flops += loops["extra_flops"]
    chip = mesh.devices.flat[0].device_kind.lower()
    bandwidth = next((bw for name, bw in ICI_BYTES_PER_S.items() if name in chip.replace(" ", "")),
                     ICI_BYTES_PER_S["v5p"])
    communication = sum(breakdown["collective_bytes"].values()) / bandwidth
    return dict(
        _memory(compiled), flops=flops, loop_flops_added=loops["extra_flops"],
        compiler_flops=compiler_flops, compiler_seconds=raw,
        loop_trips=[trips for _, trips in loops["loops"]], seconds=compute + communication,
        compute_seconds=compute, communication_seconds=communication, unestimated_ops=unknown,
        compute_seconds_ambiguous=ambiguous, compiled=compiled,
        time_source="the TPU compiler's estimate (a lower bound) + collectives over ICI",
        **breakdown)


def compile_lowered(lowered, mesh, topology: Topology, cache_dir=None) -> dict:
    """The compiler's answer for `lowered`: its figures and whether they fit the chip's HBM, or
    its out-of-memory error as required and available bytes (`fit_source` says which). With
    `cache_dir`, an answer already given for the same program is read back, not recompiled."""
    from jax.errors import JaxRuntimeError

    from scm_jax import compile_cache

    digest = compile_cache.key(lowered, topology) if cache_dir else None
    stored = compile_cache.load(cache_dir, digest) if digest else None
    if stored is not None:
        return dict(stored, compile_cache="hit", compile_seconds=0.0,
                    cached_compile_seconds=stored["compile_seconds"])
    hbm = topology.available_bytes
    start = time.perf_counter()
    try:
        with compile_cache.without_jax_cache():
            compiled = lowered.compile()
    except JaxRuntimeError as err:
        oom = out_of_memory(str(err))
        if oom is None:
            raise
        answer = dict(fits=False, fit_source="compiler out of memory",
                      required_bytes=oom["required_bytes"], available_bytes=oom["available_bytes"],
                      oom_message=oom["message"], compile_seconds=time.perf_counter() - start)
    else:
        answer = dict(compile_seconds=time.perf_counter() - start,
                      **compiled_figures(compiled, mesh, topology))
        answer.update(fits=answer["peak_bytes"] <= hbm, fit_source="compiled",
                      required_bytes=answer["peak_bytes"], available_bytes=hbm)
    compile_cache.store(cache_dir, digest, {k: v for k, v in answer.items() if k != "compiled"})
    return dict(answer, compile_cache="miss" if cache_dir else "off")


def examine(config, name: str, mesh, topology: Topology, *, compile=True, cache_dir=None) -> dict:
    """Stage `name` lowered on `mesh` and, with `compile`, whether it fits: without a compile
    when its arguments alone exceed the chip's HBM, otherwise by the compiler."""
    report = lower_stage(config, name, mesh)
    hbm = topology.available_bytes
    if not compile:
        return report
    if report["argument_bytes_from_shapes"] > hbm:
        return dict(report, fits=False, fit_source="arguments exceed HBM",
                    required_bytes=report["argument_bytes_from_shapes"], available_bytes=hbm,
                    compile_seconds=0.0, compile_cache=None)
    return dict(report, **compile_lowered(report["lowered"], mesh, topology, cache_dir))


def network_flops_per_image(config, name: str) -> float:
    """XLA's FLOPs of one forward + backward of stage `name`'s network on one image (lowered
    on this host, not compiled): the useful work MFU counts."""
    import jax
    import jax.numpy as jnp

    from scm_jax import objectives, step_cost
    from scm_jax.data import data_shape

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.remat = "none"   # useful work: what rematerialization recomputes is not
        config.model.scan_blocks = False   # a cost analysis counts a scanned body once
    objective = objectives.build(config, name, platform="cpu")
    abstract, _ = objective.abstract_state(data_shape(config.data))
    x, t, cond = objective.example_inputs(data_shape(config.data))
    params = abstract.nets["net"].params

    def loss(p):
        return jnp.sum(objective.net_train(p, x, t, cond, jax.random.PRNGKey(0)).astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss)).lower(params)
    return step_cost.flops_of(lowered)


def teacher_cache_key(config, name: str, topology: Topology) -> tuple:
    """What the teacher step compiled beside stage `name` depends on."""
    return (topology.product, topology.num_slices, config[name].batch_size,
            config[name].microbatches, repr(sorted(config.mesh.items())),
            repr(sorted(config.model.items())))


_TIMED = ("seconds", "peak_bytes", "flops")


def teacher_figures(config, name: str, topology: Topology, mesh, report: dict, *, compile: bool,
                    teacher_cache=None, cache_dir=None) -> dict | None:
    """The diffusion (teacher) step of stage `name`'s network, batch and mesh: its lowered FLOPs
    and, with `compile`, its fit, estimated seconds, per-chip peak bytes and compiled FLOPs
    (None if the config has no diffusion stage). `report` is stage `name`'s `examine`.
    `teacher_cache` (a dict kept by the caller) reuses these across stages with the same batch,
    mesh and model (one compile of a large step on a CPU host takes many minutes)."""
    from scm_jax import configs, objectives, sampling

    teacher_name = next((s for s in configs.training_stages(config)
                         if sampling.solves_ode(objectives.get(config[s].objective))), None)
    if teacher_name is None:
        return None
    cache = {} if teacher_cache is None else teacher_cache
    key = teacher_cache_key(config, name, topology)
    entry = dict(cache.get(key, {}))
    if teacher_name == name:
        entry["lowered_flops"] = report["lowered_flops"]
        if report.get("fit_source") == "compiled":
            entry.update({k: report[k] for k in _TIMED}, fits=report["fits"],
                         compile_seconds=report["compile_seconds"])
    compiled_known = "seconds" in entry or "fits" in entry
    if "lowered_flops" not in entry or (compile and not compiled_known):
        same = config.copy_and_resolve_references()
        with same.unlocked():
            same[teacher_name].batch_size = config[name].batch_size
            same[teacher_name].microbatches = config[name].microbatches
        teacher = examine(same, teacher_name, mesh, topology, cache_dir=cache_dir,
                          compile=compile and not compiled_known)
        entry["lowered_flops"] = teacher["lowered_flops"]
        if "fits" in teacher:
            entry.update(fits=teacher["fits"], compile_seconds=teacher["compile_seconds"])
            if teacher["fit_source"] == "compiled":
                entry.update({k: teacher[k] for k in _TIMED})
    cache[key] = entry
    if teacher_name == name and not compile:   # its own time: only what was asked for
        entry = dict(lowered_flops=entry["lowered_flops"])
    return dict(entry, stage=teacher_name)


def _teacher_fields(report: dict, teacher: dict | None) -> dict:
    t = teacher or {}
    timed = t.get("seconds") is not None and report.get("seconds") is not None
    return dict(
        teacher_stage=t.get("stage"),
        teacher_lowered_flops_per_step=t.get("lowered_flops"),
        # The lowered programs, before XLA's optimizations: an sCM step's JVP primal and its
        # gradient pass's forward count twice, and a Pallas kernel's FLOPs not at all.
        flops_vs_teacher=(report["lowered_flops"] / t["lowered_flops"]
                          if t.get("lowered_flops") else None),
        teacher_fits=t.get("fits"), teacher_compile_seconds=t.get("compile_seconds"),
        teacher_step_seconds=t.get("seconds"), teacher_peak_bytes_per_chip=t.get("peak_bytes"),
        teacher_flops_per_step=t.get("flops"),
        step_seconds_vs_teacher=report["seconds"] / t["seconds"] if timed else None,
        compiled_flops_vs_teacher=report["flops"] / t["flops"] if timed else None)


def check(config, name: str, topology: Topology, *, log=print, teacher_cache=None,
          with_teacher=False, mesh_source="config", cache_dir=None) -> dict:
    """Whether stage `name` fits `topology`, and how fast it runs, from one compile of its step
    (none when its arguments alone exceed HBM); its FLOPs relative to the teacher (diffusion)
    step of the same network, batch and mesh from the two lowered programs; with
    `with_teacher`, and when the stage fits, the teacher step compiled too, for the ratio of
    their estimated times. Returns the report (what --json writes). `mesh_source` says in the
    report where config.mesh came from; `teacher_cache` see `teacher_figures`; `cache_dir` keeps
    the compiler's answers (`scm_jax.compile_cache`)."""
    from scm_jax import config_checks, configs, sharding
    from scm_jax.errors import ConfigError

    config_checks.validate(config)
    if name not in configs.training_stages(config):
        raise ConfigError(f"config.stage = {name!r} is not a training stage; pass one of "
                          f"{configs.training_stages(config)} (e.g. :stage=scd)")
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices)
    chips = len(devices)
    report = examine(config, name, mesh, topology, cache_dir=cache_dir)
    teacher = teacher_figures(config, name, topology, mesh, report,
                              compile=with_teacher and report["fits"],
                              teacher_cache=teacher_cache, cache_dir=cache_dir)
    compiled = report["fit_source"] == "compiled"
    peak_flops = topology.chip.peak_bf16_flops
    flops_image = images_per_s = mfu = None
    if compiled:
        flops_image = network_flops_per_image(config, name)
        images_per_s = report["batch_size"] / report["seconds"]
        mfu = flops_image * images_per_s / (chips * peak_flops)
    out = dict(
        topology=topology.product, topology_name=topology.name, num_slices=topology.num_slices,
        platform=topology.platform, chips=chips, hbm_bytes_per_chip=topology.chip.hbm_bytes,
        peak_bf16_flops_per_chip=peak_flops,
        stage=name, objective=report["objective"], batch_size=report["batch_size"],
        microbatches=report["microbatches"], mesh=dict(mesh.shape), mesh_source=mesh_source,
        remat=config.model.get("remat", "none"), attention_impl=report["attention_impl"],
        fits=bool(report["fits"]), fit_source=report["fit_source"],
        required_bytes_per_chip=report["required_bytes"],
        available_bytes_per_chip=report["available_bytes"], oom_message=report.get("oom_message"),
        argument_bytes_from_shapes_per_chip=report["argument_bytes_from_shapes"],
        argument_bytes_per_chip=report.get("argument_bytes"),
        output_bytes_per_chip=report.get("output_bytes"),
        temp_bytes_per_chip=report.get("temp_bytes"),
        alias_bytes_per_chip=report.get("alias_bytes"),
        peak_bytes_per_chip=report.get("peak_bytes"),
        lower_seconds=report["lower_seconds"], compile_seconds=report["compile_seconds"],
        compile_cache=report.get("compile_cache"),
        cached_compile_seconds=report.get("cached_compile_seconds"),
        lowered_flops_per_step=report["lowered_flops"],
        flops_per_step=report.get("flops"), step_seconds=report.get("seconds"),
        compute_seconds=report.get("compute_seconds"),
        compiler_flops_per_step=report.get("compiler_flops"),
        compiler_seconds=report.get("compiler_seconds"),
        loop_flops_added_per_step=report.get("loop_flops_added"),
        loop_trips=report.get("loop_trips"), unestimated_ops=report.get("unestimated_ops"),
        compute_seconds_ambiguous=report.get("compute_seconds_ambiguous"),
        communication_seconds=report.get("communication_seconds"),
        time_source=report.get("time_source"),
        collective_bytes_per_chip=report.get("collective_bytes"),
        nvlink_bytes_per_chip=report.get("nvlink_bytes"),
        network_bytes_per_chip=report.get("network_bytes"),
        collectives_with_unread_groups=report.get("collectives_with_unread_groups"),
        bytes_accessed_per_chip=report.get("bytes_accessed"),
        kernel_flops_per_chip=report.get("kernel_flops"),
        uncounted_kernels=report.get("uncounted_kernels"),
        largest_buffers=report.get("largest_buffers"),
        images_per_second=images_per_s, network_flops_per_image=flops_image, mfu=mfu,
        **_teacher_fields(report, teacher),
        # XLA's cost analysis of the partitioned program counts one chip's FLOPs; a compute
        # estimate faster than the chip's peak at those FLOPs is not a credible time.
        # (with a relative 1e-9 of slack: a roofline's compute time is FLOPs / peak exactly)
        estimate_above_peak=bool(compiled and report["flops"] > report["compute_seconds"]
                                 * peak_flops * (1 + 1e-9)),
    )
    log(format_report(out))
    return out


def _define_flags(fv) -> None:
    from absl import flags

    from scm_jax import cli

    cli.define_config_flags(fv, distributed=False, config_help=(
        "experiments/<name>.py[:arg]; entries overridden with --config.<key>=<value>. Without "
        "--config.mesh.data / --config.mesh.fsdp the mesh is FSDP over all chips."))
    flags.DEFINE_string("topology", None, "TPU slice: v5p-N (TensorCores), v5litepod-N / v5e-N "
                        "or v6e-N (chips); or GPU nodes: h100-8, h200-8, h100-8x4 (4 nodes of "
                        "8), compiled for sm_90 with JAX's CUDA plugin (pip install -e '.[gpu]').",
                        flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice over DCN).", flag_values=fv)
    flags.DEFINE_bool("with_teacher", False, "Also compile the teacher (diffusion) step of the "
                      "same network, batch and mesh, for the ratio of the estimated step times "
                      "(the FLOP ratio needs no compile and is always reported).", flag_values=fv)
    flags.DEFINE_bool("compile_cache", True, "Keep the compiler's answers and reuse them for the "
                      "same program (in $SCM_JAX_COMPILE_CACHE_DIR, default "
                      "~/.cache/scm_jax/compile_check); --nocompile_cache compiles anew.",
                      flag_values=fv)
    flags.DEFINE_string("json", "", "Write the report as JSON here.", flag_values=fv)
    flags.mark_flag_as_required("topology", flag_values=fv)


def _run(fv, overrides) -> None:
    from scm_jax import compile_cache, configs, files

    topology = parse_topology(fv.topology, fv.num_slices)
    overrides, mesh_source = mesh_overrides(overrides, topology)
    config = configs.load(fv.config, overrides)
    report = check(config, config.stage, topology, log=lambda m: print(m, flush=True),
                   with_teacher=fv.with_teacher, mesh_source=mesh_source,
                   cache_dir=compile_cache.directory(fv.compile_cache))
    if fv.json:
        files.write_json(fv.json, report)


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    from scm_jax import cli

    return cli.run_command(__doc__, _define_flags, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
