"""How often each computation of a compiled XLA program runs, and the matmul FLOPs its loops add.

The TPU compiler's cost analysis (`flops`, `optimal_seconds`) counts the body of a `while`
loop once, whatever its trip count: a backbone with scanned blocks (`model.scan_blocks`)
would look up to depth-times cheaper than it is. From the compiled program's text this module
finds every computation's executions per step (a loop body runs trip-count times per run of
its caller; the trip count is the bound its condition compares the counter with, as
`lax.scan` writes it) and the FLOPs of the dots and convolutions in them, so the compile check
can add what the cost analysis left out: `extra_flops = sum over ops (runs - counted) x flops`.
Elementwise work inside loop bodies is not added (small beside the matmuls of a block).
"""
import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\((?P<params>.*)\)\s*->.*)?\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")
_OP = re.compile(r"\s*(?P<op>[\w\-]+)\(")
_PARAM = re.compile(r"(?P<name>[\w.\-]+):\s*(?P<type>[a-z]+\d*\[[\d,]*\])")
_ARRAY = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_CONSTANT = re.compile(r"\bs(?:32|64)\[\][^=]*?constant\((\d+)\)")

# An HLO array type, e.g. bf16[8,1024,64]: (element type, dims), and bytes per element.
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
ARRAY_TYPE = re.compile(r"\b(pred|[sufb]f?\d+)\[([\d,]*)\]")



def _dims(type_text: str):
    match = _ARRAY.match(type_text.strip())
    if not match:
        return None
    return tuple(int(d) for d in match.group(1).split(",") if d)


def _closing(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _instruction(line: str):
    """dict(name, type, op, args, attrs) of an HLO instruction line, or None."""
    head = _NAME.match(line)
    if not head:
        return None
    rest = line[head.end():]
    if rest.startswith("("):                       # a tuple type
        end = _closing(rest, 0)
    else:
        end = rest.find(" ")
        end = len(rest) if end < 0 else end
    type_text, rest = rest[:end], rest[end:]
    op = _OP.match(rest)
    if not op:
        return None
    close = _closing(rest, op.end() - 1)
    return dict(name=head["name"], type=type_text, op=op["op"],
                args=rest[op.end():close - 1], attrs=rest[close:], line=line)


def parse(hlo_text: str) -> tuple:
    """(computations: name -> list of instruction dicts, entry name, shapes: name -> dims)."""
    computations, shapes, entry, current = {}, {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line.strip())
        if header and line.rstrip().endswith("{"):
            current = header["name"]
            computations[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
            for p in _PARAM.finditer(header["params"] or ""):
                shapes[(current, p["name"])] = _dims(p["type"])
            continue
        if current is None:
            continue
        instr = _instruction(line)
        if instr:
            computations[current].append(instr)
            shapes[(current, instr["name"])] = _dims(instr["type"])
    return computations, entry, shapes


def trip_count(condition: list, attrs: str = "", computations: dict | None = None) -> int:
    """A while loop's trip count: the compiler's `known_trip_count` in the while's `attrs`
    (the GPU compiler writes it), else the bound in its condition (`counter < N`: the integer
    constant there or in a fusion the condition calls), else 1."""
    known = re.search(r'"known_trip_count":\s*\{\s*"n":\s*"(\d+)"', attrs)
    if known:
        return max(1, int(known.group(1)))
    for instr in condition:
        found = _CONSTANT.search(instr["line"])
        if found:
            return max(1, int(found.group(1)))
    for instr in condition:
        for callee in _CALLS.findall(instr["attrs"]):
            for inner in (computations or {}).get(callee, ()):
                found = _CONSTANT.search(inner["line"])
                if found:
                    return max(1, int(found.group(1)))
    return 1


def executions(computations: dict, entry: str) -> tuple:
    """(runs, counted): per computation, its executions per step, and how many times a
    cost analysis that counts loop bodies once sees it."""
    runs, counted = {}, {}

    def visit(name, times, once):
        runs[name] = runs.get(name, 0) + times
        counted[name] = counted.get(name, 0) + once
        for instr in computations.get(name, ()):
            callees = _CALLS.findall(instr["attrs"])
            if instr["op"] == "while":
                body = re.search(r"\bbody=%?([\w.\-]+)", instr["attrs"]).group(1)
                cond = re.search(r"\bcondition=%?([\w.\-]+)", instr["attrs"]).group(1)
                trips = trip_count(computations.get(cond, ()), instr["attrs"], computations)
                visit(body, times * trips, once)
                visit(cond, times * (trips + 1), once)
                continue
            for callee in callees:
                if callee in computations:
                    visit(callee, times, once)

    visit(entry, 1, 1)
    return runs, counted


def matmul_flops(instr: dict, computation: str, shapes: dict) -> float:
    """2 x output elements x contraction size of a dot or convolution (0 for other ops)."""
    out = _dims(instr["type"])
    if out is None or instr["op"] not in ("dot", "convolution"):
        return 0.0
    operands = [a.strip().lstrip("%") for a in instr["args"].split(",")]
    lhs, rhs = (shapes.get((computation, o)) for o in operands[:2])
    attrs = instr["attrs"]
    if instr["op"] == "dot":
        found = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        if lhs is None or not found:
            return 0.0
        contraction = math.prod(lhs[int(d)] for d in found.group(1).split(",") if d)
    else:
        return _conv_flops(out, lhs, rhs, attrs)
    return 2.0 * math.prod(out) * contraction


def _conv_flops(out, lhs, rhs, attrs) -> float:
    """A convolution's multiply-adds x 2, counting only the taps that land inside the input
    (padding excluded, as XLA's cost analysis counts)."""
    labels = re.search(r"dim_labels=([^_]+)_([^-]+)->(\S+?)(?:,|$)", attrs)
    if lhs is None or rhs is None or not labels:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    if len(lhs_l) != len(lhs) or len(rhs_l) != len(rhs) or len(out_l) != len(out):
        return 0.0
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
    spatial = sorted(c for c in rhs_l if c.isdigit())
    sizes = [int(v) for v in fields.get("size", "").split("x") if v] or [1] * len(spatial)
    strides = [int(v) for v in fields.get("stride", "").split("x") if v] or [1] * len(spatial)
    pads = [tuple(int(p) for p in v.split("_")) for v in fields.get("pad", "").split("x") if v]
    pads = pads or [(0, 0)] * len(spatial)
    taps = 1
    for d, k, stride, (low, _) in zip(spatial, sizes, strides, pads):
        size_in, size_out = lhs[lhs_l.index(d)], out[out_l.index(d)]
        taps *= sum(sum(1 for j in range(k) if 0 <= o * stride - low + j < size_in)
                    for o in range(size_out))
    return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps


def loop_extra_flops(hlo_text: str) -> dict:
    """The dot/convolution FLOPs a loop-once cost analysis leaves out of one step, with the
    loops found: dict(extra_flops, loops=[(body, trip count)], matmul_flops)."""
    computations, entry, shapes = parse(hlo_text)
    if entry is None:
        return dict(extra_flops=0.0, loops=[], matmul_flops=0.0)
    runs, counted = executions(computations, entry)
    extra = total = 0.0
    for name, instrs in computations.items():
        if name not in runs:
            continue
        flops = sum(matmul_flops(i, name, shapes) for i in instrs)
        extra += (runs[name] - counted[name]) * flops
        total += runs[name] * flops
    loops = []
    for name, instrs in computations.items():
        for instr in instrs:
            if instr["op"] == "while" and name in runs:
                body = re.search(r"\bbody=%?([\w.\-]+)", instr["attrs"]).group(1)
                cond = re.search(r"\bcondition=%?([\w.\-]+)", instr["attrs"]).group(1)
                loops.append((body, trip_count(computations.get(cond, ()), instr["attrs"],
                                               computations)))
    return dict(extra_flops=extra, loops=loops, matmul_flops=total)
