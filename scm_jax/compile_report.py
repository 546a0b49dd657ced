"""What the compile check reads from the TPU compiler, and the report it prints.

From a compiled program's text: the bytes each kind of collective moves per chip, and the
largest buffers with the source operation they come from. From the compiler's out-of-memory
error (`RESOURCE_EXHAUSTED`): the bytes the program needs and the bytes the chip has. And the
human-readable report of `scm_jax.compile.check` (its JSON is the same dict).
"""
import math
import re

from scm_jax.hlo_loops import ARRAY_TYPE, DTYPE_BYTES
from scm_jax.tpu_slices import GIB

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+ = (?P<type>.*?) (?P<op>all-gather|reduce-scatter|all-reduce|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_BUFFER = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>\S+) = (?P<type>[^ (][^ ]*) (?P<op>[\w-]+)\(.*?"
                     r"op_name=\"(?P<where>[^\"]*)\"")
# Arguments (reported by the memory analysis) and views of other buffers.
_NOT_BUFFERS = ("parameter", "get-tuple-element", "bitcast", "tuple", "copy-start", "copy-done")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in ARRAY_TYPE.findall(text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * DTYPE_BYTES.get(dtype, 4)
    return total


def hlo_breakdown(hlo_text: str, top: int = 6) -> dict:
    """From the compiled program's text: the bytes each kind of collective moves per chip per
    step (their results, times the runs of the loop they sit in: an FSDP gather inside a
    scanned block runs once per block), and the largest buffers with the source operation they
    come from."""
    from scm_jax import hlo_loops

    computations, entry, _ = hlo_loops.parse(hlo_text)
    runs = hlo_loops.executions(computations, entry)[0] if entry else {}
    bodies = {b for b, _ in hlo_loops.loop_extra_flops(hlo_text)["loops"]} if entry else set()
    collectives, buffers = {}, []
    materialized, times = True, 1   # outside fused computations and reducers (values in VMEM)
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and " -> " in stripped:
            name = stripped.split(" ", 1)[0].lstrip("%")
            materialized = stripped.startswith("ENTRY") or name in bodies or not name.startswith(
                ("fused", "region", "wrapped", "bitcast", "horizontally_fused"))
            times = runs.get(name, 1)
            continue
        if not materialized:
            continue
        match = _COLLECTIVE.match(line)
        if match:
            op = match.group("op")
            collectives[op] = collectives.get(op, 0) + times * _shape_bytes(match.group("type"))
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


# --- The compiler's out-of-memory answer -------------------------------------------------------
# The messages libtpu gives when a program cannot fit the chip's HBM, each naming the bytes
# required and the bytes available (sizes like '25.50G', '1.5GiB', '812.00M' or '4096B').
_OOM_MESSAGES = (
    re.compile(r"total memory required for HLO temporaries \((?P<required>[^)]+)\) exceeds "
               r"available HBM \((?P<available>[^)]+)\)"),
    re.compile(r"Used (?P<required>\S+) of (?P<available>\S+) hbm"),
    re.compile(r"Requires (?P<required>\S+), has (?P<available>\S+) available"),
)
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGTPE]?)(?:i?B)?\s*$", re.I)
_UNITS = "KMGTPE"


def parse_bytes(text: str) -> int | None:
    """'25.50G' / '25.50GiB' -> bytes (binary multiples, as the compiler prints them); None if
    `text` is not a size."""
    match = _SIZE.match(text.rstrip(".,;"))
    if not match:
        return None
    unit = match.group("unit").upper()
    scale = 1024 ** (_UNITS.index(unit) + 1) if unit else 1
    return int(round(float(match.group("number")) * scale))


def out_of_memory(message: str) -> dict | None:
    """The compiler's out-of-memory error as {required_bytes, available_bytes, message} (the
    sizes None where the message names none); None if `message` is not an out-of-memory error."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    text = " ".join(message.split())
    required = available = None
    for pattern in _OOM_MESSAGES:
        match = pattern.search(text)
        if match:
            required = parse_bytes(match.group("required"))
            available = parse_bytes(match.group("available"))
            break
    # The message may go on with a full memory-usage report; its first sentence is the answer.
    cut = text.find("Memory usage report")
    return dict(required_bytes=required, available_bytes=available,
                message=(text[:cut] if cut > 0 else text)[:600].strip())


# --- The printed report ------------------------------------------------------------------------
def _gib(b) -> str:
    return "?" if b is None else f"{b / GIB:.2f} GiB"


def _memory_line(r: dict) -> str:
    usable = "HBM"
    if r.get("platform") == "gpu":
        usable = (f"usable (JAX's allocator: {_gib(r['hbm_bytes_per_chip'])} x "
                  f"XLA_PYTHON_CLIENT_MEM_FRACTION)")
    if r["fit_source"] == "compiled":
        return (f"  per chip: arguments {_gib(r['argument_bytes_per_chip'])}, outputs "
                f"{_gib(r['output_bytes_per_chip'])}, temporaries "
                f"{_gib(r['temp_bytes_per_chip'])}, donated {_gib(r['alias_bytes_per_chip'])}; total {_gib(r['peak_bytes_per_chip'])}"
                f" of {_gib(r['available_bytes_per_chip'])} {usable}: "
                f"{'fits' if r['fits'] else 'DOES NOT FIT'}")
    if r["fit_source"] == "arguments exceed HBM":
        return (f"  DOES NOT FIT: the arguments alone (parameters, optimizer state, EMAs, "
                f"teacher, batch) take {_gib(r['required_bytes_per_chip'])} per chip of "
                f"{_gib(r['available_bytes_per_chip'])} {usable} (not compiled)")
    return (f"  DOES NOT FIT: the compiler ran out of memory: requires "
            f"{_gib(r['required_bytes_per_chip'])} per chip, "
            f"{_gib(r['available_bytes_per_chip'])} available ({r['oom_message']})")


def format_report(r: dict) -> str:
    """The compile check's report (`scm_jax.compile.check`'s dict) as text."""
    compiled = f"compiled in {r['compile_seconds']:.1f} s"
    if r.get("compile_cache") == "hit":
        compiled = (f"the compiler's answer from the compile cache (it took "
                    f"{r['cached_compile_seconds']:.1f} s)")
    elif r["fit_source"] == "arguments exceed HBM":
        compiled = "not compiled"
    lines = [
        f"{r['stage']} ({r['objective']}) on {r['topology']} ({r['chips']} chips, "
        f"{r['topology_name']}, {r['num_slices']} slice(s)); mesh {r['mesh']} "
        f"({r['mesh_source']}), batch {r['batch_size']} in {r['microbatches']} microbatch(es), "
        f"remat {r['remat']}, attention {r['attention_impl']}",
        _memory_line(r),
        f"  lowered in {r['lower_seconds']:.1f} s, {compiled}"]
    if r["step_seconds"] is not None:
        gpu = r.get("platform") == "gpu"
        compute = ("a roofline of FLOPs and bytes accessed, our estimate: XLA gives no time for "
                   "GPUs" if gpu else "the compiler's lower bound")
        link = "NVLink / the network" if gpu else "the interconnect"
        lines.append(
            f"  step: {r['flops_per_step'] / 1e12:.2f} TFLOP per chip, estimated "
            f"{r['step_seconds'] * 1e3:.1f} ms = compute {r['compute_seconds'] * 1e3:.1f} ms "
            f"({compute}) + collectives {r['communication_seconds'] * 1e3:.1f} ms "
            f"(their bytes over {link}, no overlap) -> {r['images_per_second']:.0f} "
            f"images/s, MFU {100 * r['mfu']:.1f}% (an upper bound: forward+backward "
            f"{r['network_flops_per_image'] / 1e9:.1f} GFLOP/image, peak "
            f"{r['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip)")
        if gpu:
            from scm_jax.gpu_roofline import describe

            lines.append("  " + describe(dict(kernel_flops=r.get("kernel_flops_per_chip"),
                                              uncounted_kernels=r.get("uncounted_kernels"))))
    if r.get("largest_buffers"):
        lines.append("  largest buffers: " + "; ".join(
            f"{b['bytes'] / 2 ** 20:.0f} MiB {b['op']} ({b['source'][-70:]})"
            for b in r["largest_buffers"][:3]))
    if r.get("flops_vs_teacher") is not None:
        lines.append(
            f"  FLOPs / teacher step ({r['teacher_stage']}, same network, batch, mesh): "
            f"{r['flops_vs_teacher']:.2f}x (lowered programs, before XLA's optimizations)")
    if r.get("step_seconds_vs_teacher") is not None:
        lines.append(
            f"  teacher step compiled: estimated {r['teacher_step_seconds'] * 1e3:.1f} ms, "
            f"{_gib(r['teacher_peak_bytes_per_chip'])} per chip; this step / teacher: time "
            f"{r['step_seconds_vs_teacher']:.2f}x, compiled FLOPs "
            f"{r['compiled_flops_vs_teacher']:.2f}x")
    elif r.get("teacher_fits") is False:
        lines.append("  the teacher step does not fit this slice: no time ratio")
    if r.get("compute_seconds_ambiguous"):
        lines.append("  warning: the compiler left more operations unestimated than the check "
                     "recognises: the estimated time is its fraction of a second only")
    if r.get("estimate_above_peak"):
        lines.append("  warning: the compiler's compute estimate implies more than the chip's "
                     "peak FLOP/s for this step's FLOPs: its time (and MFU) is not credible")
    return "\n".join(lines)
