"""Continuous vs discrete time (sCM Sec. 3-4, Fig. 5(c)): sCD and dsCD with N in
{16, 64, 256, 1024, 4096} discretization steps, at equal training steps from the same teacher.

The paper: dsCD improves with N up to ~1024 and then degrades (numerical error of the finite
difference), and continuous time beats every N. The plot shows 1-step and 2-step FD against N
with sCD (and the teacher) as horizontal lines.

    python -m scm_jax.studies.continuous_vs_discrete --workdir=/tmp/study_cvd
"""
import sys

import numpy as np

from scm_jax.studies import runner

NS = (16, 64, 256, 1024, 4096)
STEPS = 1000          # every run's length at full size (the digits sCD default is 2500)


def runs(size, config):
    ns, steps = (NS, STEPS) if size == "full" else ((16,), int(config.scd.steps))
    out = [runner.Run("scd", "scd", (f"scd.steps={steps}",), label="sCD (continuous)",
                      group="scd")]
    out += [runner.Run(f"dscd_N{n}", "dscd", (f"dscd.steps={steps}", f"dscd.loss.num_points={n}"),
                       label=f"dsCD N={n}", group="dscd", x=n) for n in ns]
    return out


def plot(results, path):
    plt, fig, axes = runner.figure(2)
    teacher = runner.teacher_row(results)
    for ax, nfe in zip(axes, (1, 2)):
        pts = sorted((e["x"], runner.best_row(e, nfe)) for e in results["runs"].values()
                     if e["group"] == "dscd")
        xs = [x for x, r in pts if r]
        ax.errorbar(xs, [r["fd"] for _, r in pts if r], capsize=3, fmt="o-", label="dsCD",
                    yerr=[r.get("fd_std", 0.0) for _, r in pts if r])   # spread over seeds
        diverged = [e["x"] for e in results["runs"].values()
                    if e["group"] == "dscd" and e.get("status") == "diverged"]
        if diverged:
            ax.plot(diverged, [np.nan] * len(diverged), "rx", label="diverged")
        scd = results["runs"].get("scd")
        if scd and runner.best_row(scd, nfe):
            row = runner.best_row(scd, nfe)
            ax.axhline(row["fd"], color="C1", ls="--", label="sCD")
            if row.get("fd_std"):
                ax.axhspan(row["fd"] - row["fd_std"], row["fd"] + row["fd_std"], color="C1",
                           alpha=0.15)
        runner.teacher_line(ax, teacher)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="N (discretization steps)", ylabel="FD (digits classifier)",
               title=f"{nfe}-step")
        ax.legend(fontsize=8)
    runner.save_figure(plt, fig, path)


STUDY = runner.Study("continuous_vs_discrete", __doc__.split("\n\n")[0], runs, plot)

if __name__ == "__main__":
    sys.exit(runner.main(STUDY))
