"""The fit-and-speed tables of docs/paper-scale.md, made from `benchmarks/pod_fit.py`'s JSON.

    python benchmarks/pod_fit_table.py --json=benchmarks/results/pod_fit.json [--write_readme]
        [--readme=docs/paper-scale.md]

prints one markdown table per TPU generation (v5p, v6e) and GPU (h100, h200): for every preset
and stage that was run, the smallest slice (GPU: nodes of 8) where its step fits (FSDP over
every chip, with or without rematerialization), the per-chip memory, FLOPs per step per chip,
the estimated step time (TPU: the compiler's; GPU: the compile check's roofline), MFU, the step's estimated time relative to the teacher step of the same network,
batch and mesh, and the seconds the compiler took; what was not run is listed under the
table. `--write_readme` puts the TPU tables between that page's `<!-- pod_fit_table:start -->`
and `<!-- pod_fit_table:end -->` lines and the GPU tables between its
`<!-- pod_fit_gpu_table:start -->` and `<!-- pod_fit_gpu_table:end -->` lines (where it has
them), replacing what was there: the tables are only ever written by this script.
"""
import json
import os
import sys

from scm_jax import cli
from scm_jax.errors import MissingInputError

START, END = "<!-- pod_fit_table:start -->", "<!-- pod_fit_table:end -->"
GPU_START, GPU_END = "<!-- pod_fit_gpu_table:start -->", "<!-- pod_fit_gpu_table:end -->"
TPU_PLATFORMS = ("v5p", "v6e")
GPU_PLATFORMS = ("h100", "h200")
GIB = 1024 ** 3
# Every paper preset by name (the tables' rows, in order) and its experiment spec.
PRESETS = {
    "ddpmpp-cifar10": "experiments/cifar10.py:variant=paper",
    **{f"edm2-in64-{s}": f"experiments/imagenet64.py:variant={s}" for s in ("s", "m", "l", "xl")},
    **{f"edm2-in512-{s}": f"experiments/imagenet512.py:variant={s}"
       for s in ("s", "m", "l", "xl", "xxl")},
    **{f"dit-in512-{s}": f"experiments/imagenet512.py:variant={s},backbone=dit"
       for s in ("s", "b", "l", "xl")},
}
STAGES = ("teacher", "sct", "scd")


def _compile_seconds(r: dict) -> str:
    if "lower_seconds" not in r:   # recorded before the stage was compiled alone
        return f"{r['compile_seconds']:.0f}*"
    seconds = r.get("cached_compile_seconds") or r["compile_seconds"]
    return f"{seconds:.0f}"


def above_peak(r: dict | None) -> bool:
    """Whether the compiler's compute estimate implies more than the chip's peak FLOP/s, or
    is its fraction of a second only (unestimated operations the check does not recognise)."""
    if not r or not r.get("fits"):
        return False
    if r.get("compute_seconds_ambiguous"):
        return True
    # Recomputed from the figures, with a relative 1e-9 of slack (a roofline's compute time is
    # FLOPs / peak exactly; entries written before the slack carry a rounding-error flag).
    return bool(r["flops_per_step"]
                > r["compute_seconds"] * r["peak_bf16_flops_per_chip"] * (1 + 1e-9))


def _row(preset: str, stage: str, r: dict, teacher: dict | None) -> str:
    if not r.get("fits"):
        tried = [t["topology"] for t in r.get("tried", []) if "skipped" not in t]
        where = (f"none fits (tried {tried[0]} to {tried[-1]})" if tried
                 else "none fits (the parameter state exceeds every slice tried)")
        return f"| {preset} | {stage} | {where} | - | - | - | - | - | - |"
    above = above_peak(r)
    ratio = r.get("step_seconds_vs_teacher")
    same = teacher and all(teacher.get(k) == r.get(k) for k in ("topology", "remat", "batch_size"))
    return " | ".join([
        f"| {preset}", stage,
        f"{r['topology']} (fsdp {r['mesh']['fsdp']}, remat {r['remat']})",
        f"{r['peak_bytes_per_chip'] / GIB:.1f} GiB",
        f"{r['flops_per_step'] / 1e12:.1f} TFLOP",
        f"{r['step_seconds'] * 1e3:.0f} ms" + ("!" if above else ""),
        f"{100 * r['mfu']:.0f}%" + ("!" if above else ""),
        "-" if ratio is None else f"{ratio:.2f}x" + ("!" if above or (same and above_peak(teacher))
                                                     else ""),
        _compile_seconds(r) + " |"])


def format_tables(results: dict, presets, stages, platforms=TPU_PLATFORMS) -> str:
    """Markdown: per platform, a table of the entries in `results` ('preset:stage:platform' ->
    pod_fit's entry), rows in the order of `presets` x `stages`, and the list of those not run
    (GPU platforms: a table only where some entry was run, and no list)."""
    out = []
    for platform in platforms:
        rows, missing = [], []
        for preset in presets:
            absent = [s for s in stages if f"{preset}:{s}:{platform}" not in results]
            missing += [preset] if len(absent) == len(stages) else [f"{preset} {s}" for s in absent]
            teacher = results.get(f"{preset}:teacher:{platform}")
            rows += [_row(preset, s, results[f"{preset}:{s}:{platform}"], teacher)
                     for s in stages if s not in absent]
        gpu = platform in GPU_PLATFORMS
        if gpu and not rows:
            continue   # GPU tables only where GPU nodes were run
        out.append(f"**{platform}**" + ("" if rows else ": not run."))
        if rows:
            where, chip, time = (("nodes of 8 GPUs (fsdp, remat)", "per-GPU", "roofline step time")
                                 if gpu else ("slice (fsdp, remat)", "per-chip", "est. step time"))
            out += ["", f"| preset | stage | smallest {platform} {where} | {chip} memory | "
                    f"FLOPs/step per {chip[4:]} | {time} | MFU | time / teacher | compile s |",
                    "|---|---|---|---|---|---|---|---|---|", *rows]
            if missing and not gpu:
                out += ["", f"Not run on {platform} (a preset alone: all its stages): "
                        + ", ".join(missing) + "."]
        out.append("")
    notes = []
    flat = [r for r in results.values() if isinstance(r, dict)]
    if any(above_peak(r) for r in flat):
        notes.append("! the compiler's compute estimate implies more than the chip's peak "
                     "FLOP/s for the step's FLOPs, or is its fraction of a second only (this "
                     "step's, or for the ratio the teacher step's): that time, MFU or ratio is "
                     "not credible.")
    if any(r.get("fits") and "lower_seconds" not in r for r in flat):
        notes.append("\\* seconds of the whole check (the stage's and the teacher's compiles), "
                     "recorded before each step was compiled alone.")
    return "\n".join(out + notes).rstrip() + "\n"


def replace_between_markers(text: str, tables: str, path: str, start: str = START,
                            end: str = END) -> str:
    """`text` with what lies between the `start` and `end` marker lines replaced by `tables`."""
    from_, to = text.find(start), text.find(end)
    if from_ < 0 or to < from_:
        raise ValueError(f"{path} has no '{start}' line followed by an '{end}' line; add them "
                         f"around the fit-and-speed table")
    return text[:from_ + len(start)] + "\n" + tables + text[to:]


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("json", None, "pod_fit.py's results", flag_values=fv)
    flags.mark_flag_as_required("json", flag_values=fv)
    flags.DEFINE_bool("write_readme", False, "replace the tables between the markers of "
                      "--readme", flag_values=fv)
    flags.DEFINE_string("readme", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "paper-scale.md"),
        "the page holding the table markers", flag_values=fv)


def main(argv=None) -> int:
    """The command; argv without the program name (sys.argv's by default). Returns the exit
    status."""
    return cli.run_command(__doc__, _define_flags, _write_tables, cli.program_argv(argv),
                           takes_overrides=False)


def _write_tables(args, overrides) -> int:
    try:
        with open(args.json) as f:
            results = json.load(f)
    except (OSError, ValueError) as err:
        raise MissingInputError(f"cannot read --json={args.json}: {err}") from err
    text = None
    if args.write_readme:
        try:
            with open(args.readme) as f:
                text = f.read()
            replace_between_markers(text, "", args.readme)
        except (OSError, ValueError) as err:
            raise MissingInputError(str(err)) from err
    tables = format_tables(results, PRESETS, STAGES)
    gpu_tables = format_tables(results, PRESETS, STAGES, GPU_PLATFORMS)
    print(tables + gpu_tables, end="")
    if text is not None:
        text = replace_between_markers(text, tables, args.readme)
        if GPU_START in text:   # the GPU tables, where the page has their markers
            text = replace_between_markers(text, gpu_tables, args.readme, GPU_START, GPU_END)
        with open(args.readme, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
