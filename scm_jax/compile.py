"""The real train step compiled for a TPU slice on this (CPU) host: does it fit, how fast.

    python -m scm_jax.compile --config=experiments/imagenet512.py:variant=xxl,stage=scd \
        --topology=v5p-128 [--num_slices=1] [--json=PATH] [--config.mesh.fsdp=8 ...]

The stage is built exactly as `train.py` builds it (`stage.build_stage`: objective, optimizer,
EMA, teacher, mesh, logical rules, shardings, the one jitted step), with abstract arrays placed
on the devices of the TPU topology (`jax.experimental.topologies`, through libtpu), and
compiled by the TPU compiler. It prints, per chip, the memory of the compiled program
(arguments, outputs, temporaries, total) against the chip's HBM; the FLOPs of one step; an
estimated step time: the compiler's estimate of the computation (`optimal_seconds`, a lower
bound) plus the collectives' bytes (read from the compiled program) over the chip's
interconnect bandwidth, which the compiler does not estimate, assuming no overlap; images/s and
MFU from it; the largest buffers and where they come from; and the same for the diffusion
(teacher) step of the same network, batch and mesh, so the sCT/sCD cost relative to diffusion
training is a ratio. Nothing runs on a TPU: every figure is an estimate.

MFU = (forward + backward FLOPs of the network per image) x images/s / (chips x peak bf16 FLOP/s).

Topologies: `v5p-N` (N TensorCores, 2 per chip, as Cloud TPU names them), `v5litepod-N` or
`v5e-N` and `v6e-N` (N chips), each a power of two in the slice sizes Cloud TPU offers.
"""
import dataclasses
import json
import math
import os
import re
import sys

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                  # the topology_name prefix libtpu takes
    hbm_bytes: int
    peak_bf16_flops: float     # per chip
    counts_cores: bool         # the product name counts TensorCores (2 per chip), not chips
    three_d: bool              # a 3-D torus (v5p) or a 2-D one (v5e, v6e)


CHIPS = {
    "v5p": Chip("v5p", 95 * GIB, 459e12, True, True),
    "v5e": Chip("v5e", 16 * GIB, 197e12, False, False),
    "v5litepod": Chip("v5e", 16 * GIB, 197e12, False, False),
    "v6e": Chip("v6e", 32 * GIB, 918e12, False, False),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    product: str               # e.g. 'v5p-128'
    chip: Chip
    chips: int
    shape: tuple               # chips per torus dimension
    host_bounds: tuple         # chips per host
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def _torus(chips: int, dims: int) -> tuple:
    """The slice shape Cloud TPU uses for `chips` chips (v5p-8: 2x2x1, v5p-128: 4x4x4, v6e-32:
    4x8): from the smallest slice, double the smallest dimension, the last one among equals."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, n in enumerate(shape) if n == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(product: str, num_slices: int = 1) -> Topology:
    """'v5p-128' -> 64 chips on a 4x4x4 torus; 'v6e-16' -> 16 chips on 4x4 (ConfigError if unknown)."""
    from scm_jax.errors import ConfigError

    match = re.fullmatch(r"(v5p|v5e|v5litepod|v6e)-(\d+)", product.strip())
    expected = ("v5p-N (N TensorCores: 8, 16, ..., 2 per chip), v5litepod-N / v5e-N or v6e-N "
                "(N chips: 1, 4, 8, 16, ...), N a power of two")
    if not match:
        raise ConfigError(f"unknown --topology {product!r}; expected {expected}")
    chip = CHIPS[match.group(1)]
    count = int(match.group(2))
    chips = count // 2 if chip.counts_cores else count
    smallest = 4 if chip.three_d else 1
    if chips < smallest or chips & (chips - 1) or (chip.counts_cores and count % 2):
        raise ConfigError(f"--topology {product!r} is not a slice Cloud TPU offers; expected "
                          f"{expected}")
    if num_slices < 1:
        raise ConfigError(f"--num_slices = {num_slices} must be >= 1")
    if chip.three_d:
        shape = _torus(chips, 3)
        host = (2, 2, 1)
    else:
        shape = _torus(chips, 2)
        host = shape if chips <= 8 else (2, 2)   # single-host slices hold up to 8 chips
    return Topology(product, chip, chips, shape, host + (1,) * (3 - len(host)), num_slices)


def topology_devices(topology: Topology):
    """The TPU devices of `topology` (descriptions only: nothing is attached)."""
    from scm_jax.errors import MissingInputError

    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        raise MissingInputError("compiling for a TPU needs libtpu on this host: pip install -e "
                                "'.[tpu]' (or the [test] extra, which pins the version the "
                                "installed jax expects)") from err
    # Only a description is needed: quiet libtpu's host probing, and let it load beside other
    # processes that hold it.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.product)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.name, chip_config_name="default",
        chips_per_host_bounds=topology.host_bounds, num_slices=topology.num_slices)
    return list(desc.devices)


# Per-chip interconnect bandwidth (ICI, bytes/s, all links together): the compiler gives no
# time for collectives, so their time is estimated from the bytes they move.
ICI_BYTES_PER_S = {"v5p": 600e9, "v5e": 200e9, "v6e": 448e9}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+ = (?P<type>.*?) (?P<op>all-gather|reduce-scatter|all-reduce|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|[sufb]f?\d+)\[([\d,]*)\]")
_BUFFER = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>\S+) = (?P<type>[^ (][^ ]*) (?P<op>[\w-]+)\(.*?"
                     r"op_name=\"(?P<where>[^\"]*)\"")


# Arguments (reported by the memory analysis) and views of other buffers.
_NOT_BUFFERS = ("parameter", "get-tuple-element", "bitcast", "tuple", "copy-start", "copy-done")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _DTYPE_BYTES.get(dtype, 4)
    return total


def hlo_breakdown(hlo_text: str, top: int = 6) -> dict:
    """From the compiled program's text: the bytes each kind of collective moves per chip (their
    results), and the largest buffers with the source operation they come from."""
    collectives, buffers = {}, []
    materialized = True   # outside fused computations and reducers, whose values stay in VMEM
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and " -> " in stripped:
            name = stripped.split(" ", 1)[0].lstrip("%")
            materialized = stripped.startswith("ENTRY") or not name.startswith(
                ("fused", "region", "wrapped", "bitcast", "horizontally_fused"))
            continue
        if not materialized:
            continue
        match = _COLLECTIVE.match(line)
        if match:
            op = match.group("op")
            collectives[op] = collectives.get(op, 0) + _shape_bytes(match.group("type"))
            continue
        match = _BUFFER.match(line)
        if match and match.group("op") not in _NOT_BUFFERS:
            size = _shape_bytes(match.group("type"))
            if size:
                buffers.append((size, match.group("op"), match.group("where").split("/", 1)[-1]))
    buffers.sort(reverse=True)
    return dict(collective_bytes=collectives,
                largest_buffers=[dict(bytes=b, op=op, source=where[-160:])
                                 for b, op, where in buffers[:top]])


def compile_stage(config, name: str, mesh) -> dict:
    """Compiles stage `name`'s step on `mesh`; per-chip memory, FLOPs, estimated seconds."""
    from scm_jax.stage import build_stage

    stage = build_stage(config, name, mesh)
    lowered = stage.lower()
    compiled = lowered.compile()
    return dict(
        stage=name, objective=config[name].objective, batch_size=int(config[name].batch_size),
        microbatches=int(config[name].microbatches),
        attention_impl=stage.objective.model_cfg.attention_impl, lowered=lowered,
        **compiled_figures(compiled, mesh))


def compiled_figures(compiled, mesh) -> dict:
    """Per-chip memory, FLOPs and estimated seconds of a program compiled for `mesh`."""
    from scm_jax import step_cost

    memory = compiled.memory_analysis()
    cost = step_cost.cost_analysis(compiled)
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    breakdown = hlo_breakdown(compiled.as_text())
    # optimal_seconds counts each operation it cannot estimate (the collectives) as -1 s: take
    # those out, and add the collectives' bytes over the chip's interconnect bandwidth instead.
    raw = float(cost.get("optimal_seconds", float("nan")))
    unknown = math.ceil(-raw - 1e-6) if raw < 0 else 0
    compute = raw + unknown
    chip = mesh.devices.flat[0].device_kind.lower()
    bandwidth = next((bw for name, bw in ICI_BYTES_PER_S.items() if name in chip.replace(" ", "")),
                     ICI_BYTES_PER_S["v5p"])
    communication = sum(breakdown["collective_bytes"].values()) / bandwidth
    return dict(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
        peak_bytes=int(peak), flops=float(cost.get("flops", float("nan"))),
        seconds=compute + communication, compute_seconds=compute,
        communication_seconds=communication, unestimated_ops=unknown, compiled=compiled,
        **breakdown)


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


def check(config, name: str, topology: Topology, *, log=print, teacher_cache=None) -> dict:
    """Compiles stage `name` and the teacher (diffusion) step of the same network, batch and
    mesh for `topology`; returns the report (what --json writes). `teacher_cache` (a dict kept
    by the caller) reuses a teacher compile across stages with the same batch, mesh and model
    (one compile of a large step on a CPU host takes many minutes)."""
    from scm_jax import configs, sharding
    from scm_jax.errors import ConfigError

    configs.validate(config)
    if name not in configs.training_stages(config):
        raise ConfigError(f"config.stage = {name!r} is not a training stage; pass one of "
                          f"{configs.training_stages(config)} (e.g. :stage=scd)")
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices)
    chips = len(devices)
    report = compile_stage(config, name, mesh)
    teacher_name = next((s for s in configs.training_stages(config)
                         if config[s].objective == "diffusion"), None)
    teacher = None
    if teacher_name is not None:
        same = config.copy_and_resolve_references()
        with same.unlocked():
            same[teacher_name].batch_size = config[name].batch_size
            same[teacher_name].microbatches = config[name].microbatches
        key = teacher_cache_key(config, name, topology)
        cache = {} if teacher_cache is None else teacher_cache
        if teacher_name == name:
            teacher = report
        elif key not in cache:
            teacher = compile_stage(same, teacher_name, mesh)
        else:
            teacher = cache[key]
        cache[key] = {k: teacher[k] for k in ("seconds", "peak_bytes", "flops")}
    flops_image = network_flops_per_image(config, name)
    images_per_s = report["batch_size"] / report["seconds"]
    mfu = flops_image * images_per_s / (chips * topology.chip.peak_bf16_flops)
    out = dict(
        topology=topology.product, topology_name=topology.name, num_slices=topology.num_slices,
        chips=chips, hbm_bytes_per_chip=topology.chip.hbm_bytes,
        peak_bf16_flops_per_chip=topology.chip.peak_bf16_flops,
        stage=name, objective=report["objective"], batch_size=report["batch_size"],
        microbatches=report["microbatches"], mesh=dict(mesh.shape),
        remat=config.model.get("remat", "none"), attention_impl=report["attention_impl"],
        argument_bytes_per_chip=report["argument_bytes"], output_bytes_per_chip=report["output_bytes"],
        temp_bytes_per_chip=report["temp_bytes"], alias_bytes_per_chip=report["alias_bytes"],
        peak_bytes_per_chip=report["peak_bytes"],
        fits=report["peak_bytes"] <= topology.chip.hbm_bytes,
        flops_per_step=report["flops"], step_seconds=report["seconds"],
        compute_seconds=report["compute_seconds"],
        communication_seconds=report["communication_seconds"],
        collective_bytes_per_chip=report["collective_bytes"],
        largest_buffers=report["largest_buffers"],
        images_per_second=images_per_s, network_flops_per_image=flops_image, mfu=mfu,
        teacher_stage=teacher_name,
        teacher_step_seconds=teacher["seconds"] if teacher else None,
        teacher_peak_bytes_per_chip=teacher["peak_bytes"] if teacher else None,
        teacher_flops_per_step=teacher["flops"] if teacher else None,
        step_seconds_vs_teacher=report["seconds"] / teacher["seconds"] if teacher else None,
        flops_vs_teacher=report["flops"] / teacher["flops"] if teacher else None,
        # XLA's cost analysis of the partitioned program counts one chip's FLOPs; a compute
        # estimate faster than the chip's peak at those FLOPs is not a credible time.
        estimate_above_peak=bool(report["flops"] > report["compute_seconds"]
                                 * topology.chip.peak_bf16_flops),
    )
    log(format_report(out))
    return out


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    lines = [
        f"{r['stage']} ({r['objective']}) on {r['topology']} ({r['chips']} chips, "
        f"{r['topology_name']}, {r['num_slices']} slice(s)); mesh {r['mesh']}, batch "
        f"{r['batch_size']} in {r['microbatches']} microbatch(es), remat {r['remat']}, "
        f"attention {r['attention_impl']}",
        f"  per chip: arguments {gib(r['argument_bytes_per_chip'])}, outputs "
        f"{gib(r['output_bytes_per_chip'])}, temporaries {gib(r['temp_bytes_per_chip'])}, "
        f"donated {gib(r['alias_bytes_per_chip'])}; total {gib(r['peak_bytes_per_chip'])} of "
        f"{gib(r['hbm_bytes_per_chip'])} HBM: {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"  step: {r['flops_per_step'] / 1e12:.2f} TFLOP per chip, estimated {r['step_seconds'] * 1e3:.1f} ms"
        f" = compute {r['compute_seconds'] * 1e3:.1f} ms (the compiler's lower bound) + "
        f"collectives {r['communication_seconds'] * 1e3:.1f} ms (their bytes over the "
        f"interconnect, no overlap) -> {r['images_per_second']:.0f} images/s, MFU "
        f"{100 * r['mfu']:.1f}% (an upper bound: forward+backward "
        f"{r['network_flops_per_image'] / 1e9:.1f} GFLOP/image, peak "
        f"{r['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip)"]
    if r.get("largest_buffers"):
        lines.append("  largest buffers: " + "; ".join(
            f"{b['bytes'] / 2 ** 20:.0f} MiB {b['op']} ({b['source'][-70:]})"
            for b in r["largest_buffers"][:3]))
    if r.get("teacher_step_seconds"):
        lines.append(
            f"  teacher step ({r['teacher_stage']}, same network, batch, mesh): estimated "
            f"{r['teacher_step_seconds'] * 1e3:.1f} ms, {gib(r['teacher_peak_bytes_per_chip'])} "
            f"per chip; this step / teacher: time {r['step_seconds_vs_teacher']:.2f}x, FLOPs "
            f"{r['flops_vs_teacher']:.2f}x")
    if r.get("estimate_above_peak"):
        lines.append("  warning: the compiler's compute estimate implies more than the chip's "
                     "peak FLOP/s for this step's FLOPs: its time (and MFU) is not credible")
    return "\n".join(lines)


def main(argv=None) -> int:
    from absl import flags

    from scm_jax import configs
    from scm_jax.errors import UserError
    from scm_jax.cli import EXIT_USER_ERROR, one_line, skip_absent_tpu

    flags.DEFINE_string("config", None, "Experiment config: experiments/<name>.py[:arg]; "
                        "entries overridden with --config.<key>=<value>.")
    flags.DEFINE_string("topology", None, "TPU slice: v5p-N (TensorCores), v5litepod-N / v5e-N "
                        "or v6e-N (chips).")
    flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN).")
    flags.DEFINE_string("json", "", "Write the report as JSON here.")
    flags.mark_flags_as_required(["config", "topology"])
    argv = sys.argv if argv is None else argv
    overrides, rest = configs.split_overrides(argv)
    try:
        flags.FLAGS(rest)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    skip_absent_tpu()
    try:
        config = configs.load(flags.FLAGS.config, overrides)
        topology = parse_topology(flags.FLAGS.topology, flags.FLAGS.num_slices)
        report = check(config, config.stage, topology, log=lambda m: print(m, flush=True))
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if flags.FLAGS.json:
        from scm_jax import files

        files.write_json(flags.FLAGS.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
