"""Where the TPU compiler spends a compile check's time: the compile check run under libtpu's
own logging, its log summarized.

    python benchmarks/compile_profile.py --profile_json=PATH [--log=PATH] -- \
        --config=experiments/imagenet512.py:variant=xxl,stage=scd --topology=v5p-32 \
        [--config.model.scan_blocks=False ...]

Everything after `--` goes to `python -m scm_jax.compile` (always with `--nocompile_cache`: a
cached answer has no compile to profile), run in a subprocess with libtpu's logging on for the
compiler's pass pipeline, its backend and its HLO deduplication (`TPU_VMODULE`; the variables
must be set before libtpu loads, hence the subprocess). The summary, per compiled module (the
stage, then the teacher step with `--with_teacher`), and written to --profile_json:

- the compiler's stage durations (HLO passes, backend passes, code generation, end to end) and
  its phase timers (memory space and buffer assignment, lowering and optimization, code
  generator);
- the HLO passes that took longest, summed over their calls;
- HLO deduplication: how many of the instructions the backend lowers are duplicates of another
  (the backend lowers each distinct fusion once, so repeated identical blocks of an unrolled
  network cost no more code generation than one scanned body);
- the backend's lowering units ("LLO optimizing N instructions" per HLO instruction or fusion):
  their count, total size and the largest.

The compile check's own report is kept under `report`. On the 2-core host the compiler lowers
its units on a thread pool over the cores it may use (`taskset` limits them).
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

VMODULE = "hlo_pass_pipeline=1,deepsea_compiler_base=1,deepsea_compiler_backend=1,hlo_deduplication=1"

_LINE = re.compile(r"^[IWEF](\d{4}) (\d+):(\d+):([\d.]+)\s+(\d+) (\S+?):\d+\] (.*)$")
_MODULE = re.compile(r"XLA::TPU running hlo passes for ([\d,]+) instructions, module: (\S+)")
_STAGE = re.compile(r"^(\w+) stage duration: (?:(\d+)h)?(?:(\d+)m(?!s))?([\d.]+)(us|ms|s)$")
_TIMER = re.compile(r"^XLA::TPU (.+?) time: [\d.]+ \w+ \((\d+) us\)")
_PASS = re.compile(r"^HLO pass: (\S+) time: [\d.]+ \w+ \((\d+) us\)")
_DEDUP = re.compile(r"^(total|# of duplicate|# of unique) (?:# of )?HLOs = (\d+)")
_UNIT = re.compile(r"^\[(.+?)\] LLO optimizing ([\d,]+) instructions")
_OPTIMIZED = re.compile(r"LLO optimized ([\d,]+) instructions \(deduplicated from total ([\d,]+)")
_SCALE = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _module(name: str, instructions: int) -> dict:
    return dict(module=name, hlo_instructions=instructions, stage_seconds={}, timers_seconds={},
                hlo_pass_seconds=collections.Counter(), hlo_pass_calls=collections.Counter(),
                dedup=[], llo_units=[], llo_optimized=None, open_units={})


def parse(text: str) -> list[dict]:
    """The summaries of every module compiled in a libtpu log (run with VMODULE), in order."""
    modules = []
    current = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        when = int(m[1]) * 86400.0 + int(m[2]) * 3600 + int(m[3]) * 60 + float(m[4])
        thread, msg = m[5], m[7].strip()
        mm = _MODULE.search(msg)
        if mm:
            current = _module(mm[2], int(mm[1].replace(",", "")))
            modules.append(current)
            continue
        if current is None:
            continue
        if (s := _STAGE.match(msg)):
            current["stage_seconds"][s[1]] = (int(s[2] or 0) * 3600 + int(s[3] or 0) * 60
                                              + float(s[4]) * _SCALE[s[5]])
        elif (s := _PASS.match(msg)):
            current["hlo_pass_seconds"][s[1]] += int(s[2]) * 1e-6
            current["hlo_pass_calls"][s[1]] += 1
        elif (s := _TIMER.match(msg)):
            if s[1].startswith("emitting for "):   # one per unit: the units below time them
                continue
            current["timers_seconds"][s[1]] = current["timers_seconds"].get(s[1], 0.0) + int(s[2]) * 1e-6
        elif (s := _DEDUP.match(msg)):
            key = {"total": "total", "# of duplicate": "duplicate", "# of unique": "unique"}[s[1]]
            if key == "total" or not current["dedup"]:
                current["dedup"].append({})
            current["dedup"][-1][key] = int(s[2])
        elif (s := _UNIT.match(msg)):
            _close_unit(current, thread, when)
            unit = [s[1], int(s[2].replace(",", "")), None]
            current["llo_units"].append(unit)
            current["open_units"][thread] = (unit, when)
        elif (s := _OPTIMIZED.search(msg)):
            for t in list(current["open_units"]):
                _close_unit(current, t, when)
            current["llo_optimized"] = dict(instructions=int(s[1].replace(",", "")),
                                            before_deduplication=int(s[2].replace(",", "")))
    return [_summary(m) for m in modules]


def _close_unit(current: dict, thread: str, when: float) -> None:
    """A lowering unit's seconds: from its "LLO optimizing" line to the next line of its thread
    that starts another unit, or to the end of lowering (each thread lowers one unit at a time)."""
    if thread in current["open_units"]:
        unit, start = current["open_units"].pop(thread)
        # The program-level unit's thread waits on the others: its span is not its own work.
        unit[2] = None if unit[0] == "<no-hlo-instruction>" else when - start


def _kind(name: str) -> str:
    """A lowering unit's kind: its HLO instruction's name without the numeric suffix."""
    return re.sub(r"[.]\d+$", "", name)


def _summary(m: dict, top: int = 12) -> dict:
    units = m.pop("llo_units")
    m.pop("open_units")
    # The backend logs its deduplication once per thread that reads it: keep one of each.
    m["dedup"] = [d for i, d in enumerate(m["dedup"]) if d not in m["dedup"][:i]]
    passes, calls = m.pop("hlo_pass_seconds"), m.pop("hlo_pass_calls")
    kinds = collections.defaultdict(lambda: [0, 0, 0.0])
    for name, n, sec in units:
        if sec is None:
            continue
        k = kinds[_kind(name)]
        k[0] += 1
        k[1] += n
        k[2] += sec or 0.0
    return dict(
        m,
        hlo_passes_total_seconds=sum(passes.values()),
        top_hlo_passes=[dict(name=k, seconds=v, calls=calls[k]) for k, v in passes.most_common(top)],
        llo_unit_count=len(units),
        llo_unit_instructions=sum(n for _, n, _ in units),
        llo_unit_seconds=sum(sec or 0.0 for *_, sec in units),
        largest_llo_units=[dict(name=k, instructions=n, seconds=sec)
                           for k, n, sec in sorted(units, key=lambda u: -u[1])[:top]],
        slowest_llo_kinds=[dict(kind=k, units=c, instructions=n, seconds=sec) for k, (c, n, sec)
                           in sorted(kinds.items(), key=lambda kv: -kv[1][2])[:top]])


def format_summary(s: dict) -> str:
    out = [f"module {s['module']}: {s['hlo_instructions']} HLO instructions in"]
    out += [f"  {k}: {v:.1f} s" for k, v in s["stage_seconds"].items()]
    out += [f"  timer {k}: {v:.1f} s" for k, v in s["timers_seconds"].items()]
    out.append(f"  HLO passes summed: {s['hlo_passes_total_seconds']:.1f} s; longest: " + ", ".join(
        f"{p['name']} {p['seconds']:.1f} s" for p in s["top_hlo_passes"][:5]))
    for d in s["dedup"]:
        out.append(f"  HLO deduplication: {d.get('total')} lowered, {d.get('duplicate')} "
                   f"duplicates, {d.get('unique')} unique")
    out.append(f"  backend lowering units: {s['llo_unit_count']} "
               f"({s['llo_unit_instructions']:,} LLO instructions, {s['llo_unit_seconds']:.1f} s "
               "summed over the compiler's threads); slowest kinds: " + ", ".join(
                   f"{k['kind']} x{k['units']} {k['seconds']:.1f} s"
                   for k in s["slowest_llo_kinds"][:5]))
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile_json", required=True)
    ap.add_argument("--log", default="", help="keep libtpu's log here")
    args = ap.parse_args(own)
    if not rest:
        ap.error("give the compile check's flags after `--` (--config=... --topology=...)")
    env = dict(os.environ, TPU_STDERR_LOG_LEVEL="0", TPU_MIN_LOG_LEVEL="0", TPU_VMODULE=VMODULE)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        log_path = args.log or os.path.join(tmp, "libtpu.log")
        with open(log_path, "w") as log:
            rc = subprocess.call([sys.executable, "-m", "scm_jax.compile", *rest,
                                  "--nocompile_cache", f"--json={report_path}"],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        with open(log_path, errors="replace") as f:
            text = f.read()
        if rc:
            tail = "\n".join(text.splitlines()[-15:])
            print(f"the compile check failed (exit {rc}); its log ends:\n{tail}", file=sys.stderr)
            return rc
        with open(report_path) as f:
            report = json.load(f)
    modules = parse(text)
    if not modules:
        print("libtpu's log holds no compile (is this a TPU topology?)", file=sys.stderr)
        return 1
    for s in modules:
        print(format_summary(s))
    os.makedirs(os.path.dirname(os.path.abspath(args.profile_json)), exist_ok=True)
    with open(args.profile_json, "w") as f:
        json.dump(dict(command=["python", "-m", "scm_jax.compile", *rest], modules=modules,
                       report=report), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
