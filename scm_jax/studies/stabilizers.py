"""The stabilizer ablations (sCM Sec. 4, Fig. 4-5): sCT and sCD with each stabilizer switched
off in turn, their training curves (loss, tangent norm, gradient norm) and final FD; a run the
non-finite guard stops is reported as diverged, with its step, and the study goes on.

Switches (each a config key): the identity time transform c_noise(t) = t -> EDM's
ln(sigma_d tan t)/4 (`model.time_transform=edm`), the positional time embedding -> Fourier
features of scale 16 (`model.time_embedding=fourier`), adaptive double normalization -> AdaGN
(`model.modulation=adagn`), tangent normalization off (`loss.tangent_norm=none`), adaptive
weighting off (`loss.adaptive_weighting=False`), tangent warm-up off (`loss.warmup_steps=0`),
and the tangent pass in float16 with and without the JVP rearrangement (`jvp_dtype=float16`,
`loss.jvp_rearranged=False`). An architecture switch changes what the parameters mean, so each
has its own teacher trained with it (the same length as the experiment's); the CMs start from
the teacher of their architecture.

Every run trains its stage for the experiment's length (`sct.steps`, `scd.steps`: on digits
1600 and 2500 steps, past the dip both CMs go through around step 400, see the compute study);
`--config.sct.steps=400 --config.scd.steps=400` gives the shorter runs.

    python -m scm_jax.studies.stabilizers --workdir=/tmp/study_stabilizers [--seeds=3]
"""
import sys

import numpy as np

from scm_jax.studies import runner

# (id, label, overrides with {s} for the stage, teacher id)
VARIANTS = (
    ("baseline", "all stabilizers", (), "base"),
    ("time_edm", "EDM time transform", ("model.time_transform=edm",), "time_edm"),
    ("fourier", "Fourier embedding", ("model.time_embedding=fourier",), "fourier"),
    ("adagn", "AdaGN (no ADN)", ("model.modulation=adagn",), "adagn"),
    ("no_tangent_norm", "no tangent normalization", ("{s}.loss.tangent_norm=none",), "base"),
    ("no_adaptive_weight", "no adaptive weighting", ("{s}.loss.adaptive_weighting=False",), "base"),
    ("no_warmup", "no tangent warm-up", ("{s}.loss.warmup_steps=0",), "base"),
    ("fp16_jvp", "float16 JVP, rearranged", ("{s}.jvp_dtype=float16",), "base"),
    ("fp16_jvp_plain", "float16 JVP, not rearranged",
     ("{s}.jvp_dtype=float16", "{s}.loss.jvp_rearranged=False"), "base"),
)
TINY = ("adagn",)   # the test size: one switch with its own teacher
TEACHERS = {"base": (), **{tid: o for _, _, o, tid in VARIANTS if tid != "base"}}
STAGES = (("sct", "sCT"), ("scd", "sCD"))


def runs(size, config):
    out = []
    for stage, name in STAGES:
        if size != "full" and stage != "sct":
            continue
        steps = int(config[stage].steps)
        for vid, label, overrides, teacher in VARIANTS:
            if size != "full" and vid not in TINY:
                continue
            out.append(runner.Run(
                f"{stage}_{vid}", stage,
                (f"{stage}.steps={steps}",) + tuple(o.format(s=stage) for o in overrides),
                teacher=teacher, label=f"{name}: {label}", group=stage))
    return out


def table(results) -> str:
    """The study's markdown table: one row per switch that has run, the 1- and 2-step FD of sCT
    and sCD (mean +- spread over the seeds that finished), each marked 'better' / 'worse' where
    it differs from all stabilizers by more than the larger spread (`runner.compare`), and
    'diverged' where training stopped on a non-finite step."""
    def cell(stage, vid, nfe):
        entry = results["runs"].get(f"{stage}_{vid}")
        if entry is None:
            return "-"
        if entry.get("status") == "diverged":
            return "diverged"
        row = runner.best_row(entry, nfe)
        if row is None:
            return "-"
        text = (f"{row['fd']:.3f} ± {row['fd_std']:.3f}" if row.get("n", 1) > 1
                else f"{row['fd']:.3f}")
        base = results["runs"].get(f"{stage}_baseline")
        ref = runner.best_row(base, nfe) if base and vid != "baseline" else None
        verdict = runner.compare(row, ref) if ref else "inconclusive"
        return text + {"lower": " (better)", "higher": " (worse)"}.get(verdict, "")

    seeds = sorted({1 + len(e.get("seeds", {})) for e in results["runs"].values()}) or [1]
    head = (f"| variant ({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}) | "
            f"sCT 1-step | sCT 2-step | sCD 1-step | sCD 2-step |")
    lines = [head, "|---|---|---|---|---|"]
    for vid, label, _, _ in VARIANTS:
        if not any(f"{stage}_{vid}" in results["runs"] for stage, _ in STAGES):
            continue
        cells = [cell(stage, vid, nfe) for stage, _ in STAGES for nfe in (1, 2)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("loss", "tangent_norm", "grad_norm")
    fig, axes = plt.subplots(len(STAGES), len(panels) + 1, figsize=(18, 7), squeeze=False)
    for row, (stage, name) in enumerate(STAGES):
        entries = [(rid, e) for rid, e in results["runs"].items() if e["group"] == stage]
        for col, metric in enumerate(panels):
            ax = axes[row][col]
            for i, (rid, e) in enumerate(entries):
                c = e.get("curves", {})
                ax.plot(c.get("step", []), c.get(metric, []), color=f"C{i % 10}",
                        label=e["label"].split(": ", 1)[-1])
            ax.set(title=f"{name}: {metric}", xlabel="step")
            ax.set_yscale("symlog" if metric == "loss" else "log")
        ax = axes[row][len(panels)]
        labels, values, spreads, colors = [], [], [], []
        for i, (rid, e) in enumerate(entries):
            r = runner.best_row(e, 2)
            labels.append(e["label"].split(": ", 1)[-1])
            values.append(r["fd"] if r else np.nan)
            spreads.append(r.get("fd_std", 0.0) if r else 0.0)
            colors.append("red" if e.get("status") == "diverged" else f"C{i % 10}")
        ax.barh(range(len(values)), np.nan_to_num(values, nan=0.0), color=colors,
                xerr=spreads, capsize=2)
        for i, v in enumerate(values):
            ax.text(0, i, " diverged" if not np.isfinite(v) else f" {v:.2f}", va="center",
                    fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set(title=f"{name}: 2-step FD (red: diverged)")
        if entries:
            axes[row][0].legend(fontsize=6)
    runner.save_figure(plt, fig, path, dpi=90)


STUDY = runner.Study("stabilizers", __doc__.split("\n\n")[0], runs, plot, teachers=TEACHERS,
                     table=table)

if __name__ == "__main__":
    sys.exit(runner.main(STUDY))
