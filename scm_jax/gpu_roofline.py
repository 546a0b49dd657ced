"""FLOPs, bytes and an estimated time of a program compiled for GPUs that this host only
describes (`scm_jax.gpu_nodes`): XLA gives no time for GPU programs, so the compile check
estimates one itself, as a roofline.

What XLA's HLO cost analysis of the compiled module gives (run by the host's CPU client: the GPU
executable has no cost analysis of its own) counts every custom call as -1 FLOP and -1 byte:
the cuDNN convolutions and fused attention, cuBLAS GEMMs, and Pallas Triton kernels are opaque
to it. This module adds them from their operand shapes:

- cuDNN convolutions (forward, fused bias+activation, backward input, backward filter): each
  computes one convolution with the forward's window and dimension labels, so its FLOPs are the
  forward convolution's (`hlo_loops._conv_flops`, padding taps excluded as XLA counts them);
- cuDNN flash attention (`__cudnn$fmha*`): forward 2 matmuls (4 B H N M D), backward 5 (10 B H N
  M D: S recomputed, dP, dV, dQ, dK);
- cuBLAS GEMMs: 2 x output elements x contraction;
- the package's Triton attention-JVP kernel (`attention_jvp_triton`): QK^T and PV plus one
  matmul per tangent input and one for (P o dS) V, 6 with all three tangents (sCM App. F);

each times the runs of the computation it sits in (a scanned block's body runs once per block:
`hlo_loops`), with its operands' and results' bytes. Any other kernel is listed as uncounted.

The estimate per GPU, a lower bound: compute = max(FLOPs / peak bf16 tensor-core FLOP/s, bytes
accessed / HBM bandwidth) over the whole step (a roofline of the totals, not per operation),
plus collectives = the bytes each GPU sends in a ring algorithm (all-gather (n-1)/n of the
result, reduce-scatter (n-1) x the result, all-reduce 2(n-1)/n, all-to-all (n-1)/n,
collective-permute all of it) over NVLink within a node and over the network between nodes
(a collective whose groups span nodes; one whose groups it cannot read is counted as over the
network and reported), with no overlap.
"""
import json
import math
import re

import numpy as np

from scm_jax import hlo_loops
from scm_jax.hlo_loops import ARRAY_TYPE, DTYPE_BYTES

_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_COLLECTIVE_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                   "collective-permute")
CONV_TARGETS = ("__cudnn$convForward", "__cudnn$convBiasActivationForward",
                "__cudnn$convBackwardInput", "__cudnn$convBackwardFilter")


def _arrays(type_text: str) -> list:
    """[(dtype, dims)] of the arrays in an HLO type (a tuple lists several)."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in ARRAY_TYPE.findall(type_text)]


def _bytes(arrays) -> int:
    return sum(math.prod(dims) * DTYPE_BYTES.get(dtype, 4) for dtype, dims in arrays)


def _operands(instr: dict) -> list:
    args = re.sub(r"/\*.*?\*/", "", instr["args"])
    return [a.strip().split(" ")[-1].lstrip("%") for a in args.split(",") if a.strip()]


def _types(hlo_text: str, computations: dict) -> dict:
    """(computation, name) -> HLO type text, for instructions and computation parameters."""
    types = {(c, i["name"]): i["type"] for c, instrs in computations.items() for i in instrs}
    for line in hlo_text.splitlines():
        header = hlo_loops._HEADER.match(line.strip())
        if header and line.rstrip().endswith("{"):
            for p in hlo_loops._PARAM.finditer(header["params"] or ""):
                types[(header["name"], p["name"])] = p["type"]
    return types


def kernel_cost(instr: dict, computation: str, types: dict) -> tuple:
    """(kind, FLOPs or None when unknown, bytes read and written) of one custom call."""
    target = (_TARGET.search(instr["attrs"]) or [None, ""])[1]
    results = [a for a in _arrays(instr["type"]) if a[0] != "u8"]   # u8: cuDNN's workspace
    operands = [(_arrays(types.get((computation, o), "")) or [None])[0] for o in _operands(instr)]
    if any(o is None for o in operands):
        constraints = re.search(r"operand_layout_constraints=\{(.*?)\}(?:,|$)", instr["attrs"])
        operands = _arrays(constraints.group(1)) if constraints else []
    moved = _bytes(results) + _bytes(operands)
    dims = [d for _, d in operands]
    if target in CONV_TARGETS and len(dims) >= 2 and results:
        x, w, y = dims[0], dims[1], results[0][1]
        if target == "__cudnn$convBackwardInput":
            x, y = y, dims[0]
        elif target == "__cudnn$convBackwardFilter":
            w, y = y, dims[1]
        return "cudnn convolution", hlo_loops._conv_flops(y, x, w, instr["attrs"]), moved
    if target.startswith("__cudnn$fmha") and dims:
        found = re.search(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":\s*\[([^\]]*)\]',
                          instr["attrs"])
        if not found:
            return f"cudnn attention ({target})", None, moved
        b, h, n, m = (int(v.strip().strip('"')) for v in found.group(1).split(","))
        backward = "Backward" in target
        return ("cudnn attention backward" if backward else "cudnn attention",
                (10 if backward else 4) * b * h * n * m * dims[0][-1], moved)
    if target.startswith("__cublas") and dims and results:
        config = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', instr["attrs"])
        if not config:
            return "cublas gemm", None, moved
        contracted = [int(v.strip().strip('"')) for v in config.group(1).split(",") if v.strip()]
        return "cublas gemm", 2.0 * math.prod(results[0][1]) * math.prod(
            dims[0][i] for i in contracted), moved
    tensors = [d for d in dims if len(d) == 4]
    if (target == "__gpu$xla.gpu.triton" and "attention_jvp_triton" in instr["line"]
            and len(tensors) >= 3):
        (b, n, h, d), m = tensors[0], tensors[-1][1]   # q first, a key/value-shaped one last
        tangents = len(tensors) - 3
        matmuls = 2 + tangents + (tangents > 0)        # 6 with all three tangents (App. F)
        return "triton attention jvp", 2.0 * b * h * n * m * d * matmuls, moved
    return target or "custom call", None, moved


def replica_groups(attrs: str, devices: int) -> list | None:
    """The device groups of a collective from its `replica_groups=` (explicit `{{0,1},..}`,
    iota `[G,S]<=[dims]T(perm)`, or `mesh['a'=2,'b'=8] {'b'}`, optionally with the mesh's
    devices `device_ids=([dims]T(perm))`), None if not understood."""
    explicit = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", attrs)
    if explicit:
        return [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([\d,]*)\}",
                                                                         explicit.group(1))]
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if iota:
        shape = [int(v) for v in iota.group(3).split(",")]
        ids = np.arange(math.prod(shape)).reshape(shape)
        if iota.group(4):
            ids = ids.transpose([int(v) for v in iota.group(4).split(",")])
        return ids.reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*(?:,\s*device_ids=\(\[([\d,]+)\]"
                     r"(?:T\(([\d,]+)\))?\)\s*)?\{([^}]*)\}", attrs)
    if mesh:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        names = [a for a, _ in axes]
        reduced = re.findall(r"'([^']+)'", mesh.group(4))
        if math.prod(int(s) for _, s in axes) != devices or not set(reduced) <= set(names):
            return None
        ids = np.arange(devices)
        if mesh.group(2):   # the mesh's devices: an iota reshaped and transposed
            ids = ids.reshape([int(v) for v in mesh.group(2).split(",")])
            if mesh.group(3):
                ids = ids.transpose([int(v) for v in mesh.group(3).split(",")])
        ids = ids.reshape([int(s) for _, s in axes])
        order = [i for i, a in enumerate(names) if a not in reduced] + [
            names.index(a) for a in reduced]
        size = math.prod(int(axes[names.index(a)][1]) for a in reduced)
        return ids.transpose(order).reshape(-1, size).tolist()
    return None


def _wire_bytes(op: str, result_bytes: int, group: int) -> float:
    """Bytes one GPU sends for a collective in a ring algorithm."""
    if group <= 1:
        return 0.0
    return {"all-gather": (group - 1) / group, "reduce-scatter": group - 1,
            "all-reduce": 2 * (group - 1) / group, "all-to-all": (group - 1) / group,
            "collective-permute": 1.0}[op] * result_bytes


def _collective(instr: dict) -> tuple | None:
    """(op, result arrays) of a collective instruction; an async start's type is (operands,
    results), its results the second half."""
    op = instr["op"]
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base not in _COLLECTIVE_OPS:
        return None
    arrays = _arrays(instr["type"])
    if op.endswith("-start") and base != "all-reduce":
        inner = instr["type"].strip()
        if inner.startswith("(("):                     # ((operands), (results))
            split = hlo_loops._closing(inner[1:], 0) + 1
            arrays = _arrays(inner[split:])
        elif len(arrays) == 2:                         # (operand, result)
            arrays = arrays[1:]
    return base, arrays


def collectives(computations: dict, runs: dict, devices: int, per_node: int) -> dict:
    """Bytes each GPU sends per step over NVLink and over the network, and per kind."""
    out = dict(nvlink_bytes=0.0, network_bytes=0.0, by_op={}, unparsed_groups=0)
    for name, instrs in computations.items():
        times = runs.get(name, 0)
        for instr in instrs:
            found = _collective(instr) if times else None
            if not found:
                continue
            op, arrays = found
            if op == "collective-permute":
                pairs = re.findall(r"\{(\d+),(\d+)\}", instr["attrs"])
                groups = [[int(a), int(b)] for a, b in pairs] or None
                size = 2
            else:
                groups = replica_groups(instr["attrs"], devices)
                size = len(groups[0]) if groups else devices
            sent = times * _wire_bytes(op, _bytes(arrays), size)
            if groups is None:
                out["unparsed_groups"] += 1
            crosses = groups is None or any(len({d // per_node for d in g}) > 1 for g in groups)
            out["network_bytes" if crosses and devices > per_node else "nvlink_bytes"] += sent
            out["by_op"][op] = out["by_op"].get(op, 0.0) + sent
    return out


def xla_cost(compiled) -> dict:
    """XLA's HLO cost analysis of a compiled GPU program, by the host's CPU client."""
    import jax
    from jax._src.lib import xla_client

    module = compiled.runtime_executable().hlo_modules()[0]
    cost = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return dict(cost or {})


def figures(compiled, topology) -> dict:
    """Per-GPU FLOPs, bytes and the estimated seconds of one run of `compiled` on `topology`
    (a `gpu_nodes.GpuTopology`), with what was counted by hand."""
    text = compiled.as_text()
    computations, entry, _ = hlo_loops.parse(text)
    runs, counted = hlo_loops.executions(computations, entry)
    types = _types(text, computations)
    cost = xla_cost(compiled)
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    kernels, uncounted, opaque = {}, {}, 0
    kernel_flops = kernel_bytes = 0.0
    for name, instrs in computations.items():
        if name not in runs:
            continue
        for instr in instrs:
            if instr["op"] != "custom-call":
                continue
            opaque += counted[name]              # the cost analysis counted -1 for each
            kind, k_flops, k_bytes = kernel_cost(instr, name, types)
            kernel_bytes += runs[name] * k_bytes
            if k_flops is None:
                uncounted[kind] = uncounted.get(kind, 0) + runs[name]
                continue
            kernels[kind] = kernels.get(kind, 0.0) + runs[name] * k_flops
            kernel_flops += runs[name] * k_flops
    flops += opaque
    accessed += opaque
    loops = hlo_loops.loop_extra_flops(text)
    if loops["extra_flops"] and flops > 0:   # the loop bodies' other trips: bytes scaled alike
        accessed *= (flops + loops["extra_flops"]) / flops
    flops += loops["extra_flops"] + kernel_flops
    accessed += kernel_bytes
    gpu = topology.chip
    compute = max(flops / gpu.peak_bf16_flops, accessed / gpu.hbm_bytes_per_s)
    comm = collectives(computations, runs, topology.chips * topology.num_slices, topology.chips)
    communication = (comm["nvlink_bytes"] / gpu.nvlink_bytes_per_s
                     + comm["network_bytes"] / gpu.network_bytes_per_s)
    return dict(
        flops=flops, bytes_accessed=accessed, loop_flops_added=loops["extra_flops"],
        kernel_flops=kernels, uncounted_kernels=uncounted, seconds=compute + communication,
        compute_seconds=compute, communication_seconds=communication,
        compute_bound=flops / gpu.peak_bf16_flops >= accessed / gpu.hbm_bytes_per_s,
        nvlink_bytes=comm["nvlink_bytes"], network_bytes=comm["network_bytes"],
        collective_bytes=comm["by_op"], collectives_with_unread_groups=comm["unparsed_groups"],
        unestimated_ops=sum(uncounted.values()),
        time_source="roofline: max(FLOPs / peak, bytes / HBM bandwidth) + collectives over "
                    "NVLink / network (our estimate; XLA gives none for GPUs)")


def describe(report: dict) -> str:
    """One line on what the roofline counted by hand (for the printed report)."""
    kernels = report.get("kernel_flops") or {}
    parts = [f"{k} {v / 1e12:.2f} TFLOP" for k, v in sorted(kernels.items())]
    line = "kernels counted by hand: " + (", ".join(parts) if parts else "none")
    if report.get("uncounted_kernels"):
        line += "; NOT counted: " + json.dumps(report["uncounted_kernels"])
    return line
