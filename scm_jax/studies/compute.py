"""Quality against training compute (sCM Sec. 5, Fig. 6): 1- and 2-step FD of sCD and sCT after
several training lengths, against their training compute as a fraction of the teacher's.

Compute = steps x seconds per step, both measured here: each run's median steps/s from its
metrics.jsonl, the teacher's from its own (so the fraction is a time ratio on this machine, the
step cost ratio of sCT / sCD to a diffusion step included; it moves with machine load). Each
method trains one run extended in order to the next length (the schedules here depend only on
the step, so a run extended to N steps is a run of N steps).

The paper: 2-step sCD reaches the teacher's quality with under 20% of the teacher's training
compute, and sCT is more compute-efficient than sCD at small resolutions.

    python -m scm_jax.studies.compute --workdir=/tmp/study_compute
"""
import numpy as np

from scm_jax.studies import runner

BUDGETS = {"scd": (200, 400, 800, 1600, 2500), "sct": (200, 400, 800, 1600)}
LABELS = {"scd": "sCD", "sct": "sCT"}


def runs(size, config):
    out = []
    for stage, budgets in BUDGETS.items():
        if size != "full":
            if stage != "scd":
                continue
            budgets = (int(config[stage].steps), 2 * int(config[stage].steps))
        out += [runner.Run(f"{stage}_{n}", stage, (f"{stage}.steps={n}",), group=stage, x=n,
                           label=f"{LABELS[stage]} {n} steps", directory=stage)
                for n in budgets]
    return out


def fractions(results) -> dict:
    """run id -> training compute / the teacher's (steps x seconds per step, both medians)."""
    teacher = results["teachers"].get("base", {})
    t_rate = runner.median_rate(teacher.get("curves", {}))
    t_steps = max(teacher.get("curves", {}).get("step", [0]) or [0])
    out = {}
    for rid, e in results["runs"].items():
        rate = runner.median_rate(e.get("curves", {}))
        out[rid] = (e["steps"] / rate) / (t_steps / t_rate) if t_steps and rate > 0 else np.nan
    return out


def plot(results, path):
    plt, fig, axes = runner.figure(2)
    frac = fractions(results)
    teacher = runner.teacher_row(results)
    for ax, nfe in zip(axes, (1, 2)):
        for i, stage in enumerate(BUDGETS):
            pts = sorted((frac[rid], runner.best_row(e, nfe)["fd"])
                         for rid, e in results["runs"].items()
                         if e["group"] == stage and runner.best_row(e, nfe)
                         and np.isfinite(frac[rid]))
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=LABELS[stage])
        if teacher:
            ax.axhline(teacher["fd"], color="gray", ls=":", label=f"teacher (NFE {teacher['nfe']})")
        ax.axvline(0.2, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set(xlabel="training compute / teacher's", ylabel="FD (digits classifier)",
               title=f"{nfe}-step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


STUDY = runner.Study("compute", __doc__.split("\n\n")[0], runs, plot)

if __name__ == "__main__":
    runner.main(STUDY)
