"""The digits teacher's quality against its training length: is the default teacher (2000
steps) at its plateau, the reference the compute study's fractions need?

sCM Sec. 5 (Fig. 6) states the CMs' training compute as a fraction of the teacher's; that
fraction means something only if the teacher was trained to convergence. This study trains
the teacher of the experiment config (its own run, not a shared teacher) extended in order to
2000, 4000, 8000 and 16000 steps (the schedule depends only on the step, so a run extended to N
steps is a run of N steps), and scores its EMA after each length at every solver length of
the evaluation (35, 15, 7, 3 NFE). With `--seeds=N` each length is trained N times with
teacher seeds config.seed + 0..N-1.

    python -m scm_jax.studies.teacher_length --workdir=/tmp/study_teacher_length
"""
import sys

from scm_jax.studies import runner

LENGTHS = (2000, 4000, 8000, 16000)


def runs(size, config):
    steps = int(config.teacher.steps)
    lengths = LENGTHS if size == "full" else (steps, 2 * steps)
    # teacher="": the run is the teacher itself (no study teacher behind it).
    return [runner.Run(f"teacher_{n}", "teacher", (f"teacher.steps={n}",), teacher="",
                       label=f"teacher {n} steps", group="teacher", x=n, directory="teacher")
            for n in lengths]


def curve(results, nfe: int) -> list:
    """[(steps, row)] of the teacher at `nfe` evaluations, by length (rows as
    `runner.best_row`: mean and spread over seeds)."""
    pts = []
    for entry in results["runs"].values():
        row = runner.best_row(entry, nfe)
        if row is not None:
            pts.append((entry["steps"], row))
    return sorted(pts, key=lambda p: p[0])


def solver_lengths(results) -> list:
    """The NFEs the runs were scored at, longest first."""
    return sorted({r["nfe"] for e in results["runs"].values() for r in e.get("rows", [])},
                  reverse=True)


def plot(results, path):
    plt, fig, axes = runner.figure(1, width=5.0)
    ax = axes[0]
    for i, nfe in enumerate(solver_lengths(results)):
        pts = curve(results, nfe)
        if pts:
            xs = [p[0] for p in pts]
            ax.errorbar(xs, [p[1]["fd"] for p in pts],
                        yerr=[p[1].get("fd_std", 0.0) for p in pts], fmt="o-", capsize=3,
                        color=f"C{i}", label=f"{nfe} NFE")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lengths = sorted({e["steps"] for e in results["runs"].values()})
    ax.set_xticks(lengths)   # every measured length labelled, nothing between
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set(xlabel="teacher training steps", ylabel="FD (digits classifier)",
           title="teacher quality against training length")
    ax.legend(fontsize=8)
    runner.save_figure(plt, fig, path)


STUDY = runner.Study("teacher_length", __doc__.split("\n\n")[0], runs, plot, teachers={})

if __name__ == "__main__":
    sys.exit(runner.main(STUDY))
