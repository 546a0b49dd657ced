"""VSD vs sCD (sCM Sec. 6, Fig. 7, Table 7): the teacher, sCD (1- and 2-step), aVSD and
sCD + aVSD (1-step), each distilled at guidance scales 1.0, 1.5 and 2.0 from the same teacher
(trained with label dropout, so classifier-free guided): precision, recall and FD per method and
scale.

The paper: VSD raises precision and lowers recall, as a large guidance scale does (mode-seeking),
while 2-step sCD's precision and recall match the teacher's. Each student is distilled at one
fixed scale (the guided teacher's velocity in its tangent and in aVSD's F_pre) and sampled
without further guidance; the teacher is sampled with classifier-free guidance at each scale.

    python -m scm_jax.studies.vsd_vs_scd --workdir=/tmp/study_vsd
"""
import sys

from scm_jax.studies import runner

SCALES = (1.0, 1.5, 2.0)
METHODS = (("scd", "sCD"), ("vsd", "aVSD"), ("scd_vsd", "sCD + aVSD"))
STEPS = 600
# Table 5's aVSD settings (lambda 1, F_phi at the CM's lr), not the digits defaults (tuned by
# scm_jax.studies.avsd_sweep): this study compares the paper's methods as the paper sets them.
TABLE5 = {"vsd": ("vsd.vsd.weight=1.0", "vsd.vsd.fake_lr=0.0"),
          "scd_vsd": ("scd_vsd.vsd.weight=1.0", "scd_vsd.vsd.fake_lr=0.0")}


def runs(size, config):
    scales, steps = (SCALES, STEPS) if size == "full" else ((1.5,), None)
    out = []
    for stage, label in METHODS:
        n = steps or int(config[stage].steps)
        for s in scales:
            out.append(runner.Run(
                f"{stage}_g{s:g}", stage,
                (f"{stage}.steps={n}", f"{stage}.guidance.scale_min={s}",
                 f"{stage}.guidance.scale_max={s}") + TABLE5.get(stage, ()),
                label=f"{label} g={s:g}", group=stage, x=s))
    return out


def teacher_eval(size):
    scales = SCALES if size == "full" else (1.5,)
    return (f"eval.guidance_scales={','.join(f'{s:g}' for s in scales)}",)


def plot(results, path):
    plt, fig, axes = runner.figure(3)
    teacher_rows = results["teachers"].get("base", {}).get("rows", [])
    longest = max((r["nfe"] for r in teacher_rows), default=None)
    series = [("teacher", [(r["guidance"], r) for r in teacher_rows if r["nfe"] == longest],
               "k", f"teacher (NFE {longest})")]
    for stage, label in METHODS:
        for nfe, style in ((1, "-"), (2, "--")):
            if stage != "scd" and nfe == 2:
                continue
            pts = [(e["x"], runner.best_row(e, nfe, e["x"])) for e in results["runs"].values()
                   if e["group"] == stage]   # a student's rows carry its distilled scale
            series.append((stage, [(x, r) for x, r in pts if r], style, f"{label} {nfe}-step"))
    for ax, metric in zip(axes, ("precision", "recall", "fd")):
        for _, pts, style, label in series:
            pts = sorted((x, r[metric]) for x, r in pts if metric in r)
            if pts:
                ax.plot(*zip(*pts), style if style != "k" else "k-", marker="o", label=label)
        ax.set(xlabel="guidance scale", ylabel=metric, title=metric)
    axes[0].legend(fontsize=7)
    runner.save_figure(plt, fig, path)


STUDY = runner.Study("vsd_vs_scd", __doc__.split("\n\n")[0], runs, plot,
                     teacher_eval_overrides=teacher_eval)

if __name__ == "__main__":
    sys.exit(runner.main(STUDY))
