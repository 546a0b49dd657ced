"""Quality against training compute (sCM Sec. 5, Fig. 6): 1- and 2-step FD of sCD and sCT after
several training lengths, against their training compute as a fraction of the teacher's.

Compute = steps x the step's cost relative to the teacher's step: the teacher, sCD and sCT steps
are compiled in one process after the runs (`measure_step_costs`) and their FLOPs per step
taken from XLA's cost analysis (deterministic), so the fraction is
steps x (step FLOPs / teacher step FLOPs) / teacher steps; their times, timed back to back, are
recorded beside (on a shared 2-core machine they are too noisy to be the measure). Each method trains one run extended
in order to the next length (the schedules here depend only on the step, so a run extended to
N steps is a run of N steps).

The paper: 2-step sCD reaches the teacher's quality with under 20% of the teacher's training
compute, and sCT is more compute-efficient than sCD at small resolutions.

    python -m scm_jax.studies.compute --workdir=/tmp/study_compute
"""
import sys

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


def measure_step_costs(results, config, log=print, calls: int = 10) -> None:
    """results['step_cost'] = {stage: {seconds, flops, time_ratio, flops_ratio}} for the teacher,
    sCD and sCT steps of `config` on one training batch (`scm_jax.step_cost.measure`: compiled
    and timed back to back in this process, FLOPs from XLA's cost analysis). Measured once per
    study."""
    import jax

    from scm_jax import step_cost
    from scm_jax.data import build_train_batches

    if "step_cost" in results:
        return
    batches = build_train_batches(config.data, batch_size=config.teacher.batch_size, seed=0)
    batch = {k: jax.numpy.asarray(v) for k, v in next(batches).items()}
    rows = step_cost.measure(config, ("teacher",) + tuple(BUDGETS), batch, calls=calls)
    results["step_cost"] = rows
    results["teacher_steps"] = teacher_steps(results, config)
    log("[study] step cost / teacher's: " + ", ".join(
        f"{n} {r['time_ratio']:.2f}x time, {r['flops_ratio']:.2f}x FLOPs" for n, r in rows.items()))


def teacher_steps(results, config) -> int:
    """The training steps of the teacher the runs distilled: the step of the checkpoint its
    scores were read from (a `--teacher_workdir` teacher trained longer or shorter than the
    config's `teacher.steps`, e.g. the teacher-length study's), else `teacher.steps`."""
    row = runner.teacher_row(results)
    return int(row.get("checkpoint_step", config.teacher.steps) if row else config.teacher.steps)


def fractions(results, measure: str = "flops_ratio") -> dict:
    """run id -> training compute / the teacher's: steps x the step's cost ratio to the
    teacher's step (`measure_step_costs`; 'flops_ratio' or 'time_ratio') / the teacher's
    steps."""
    cost, t_steps = results.get("step_cost", {}), results.get("teacher_steps")
    out = {}
    for rid, e in results["runs"].items():
        ratio = cost.get(e["stage"], {}).get(measure, np.nan)
        out[rid] = e["steps"] * ratio / t_steps if t_steps else np.nan
    return out


def plot(results, path):
    plt, fig, axes = runner.figure(2)
    frac = fractions(results)
    teacher = runner.teacher_row(results)
    for ax, nfe in zip(axes, (1, 2)):
        for i, stage in enumerate(BUDGETS):
            pts = sorted((frac[rid], runner.best_row(e, nfe)["fd"],
                          runner.best_row(e, nfe).get("fd_std", 0.0))
                         for rid, e in results["runs"].items()
                         if e["group"] == stage and runner.best_row(e, nfe)
                         and np.isfinite(frac[rid]))
            if pts:
                xs, fds, stds = zip(*pts)
                ax.errorbar(xs, fds, yerr=stds, fmt="o-", capsize=3, color=f"C{i}",
                            label=LABELS[stage])
        runner.teacher_line(ax, teacher)
        ax.axvline(0.2, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set(xlabel="training FLOPs / the teacher's", ylabel="FD (digits classifier)",
               title=f"{nfe}-step")
        ax.legend(fontsize=8)
    runner.save_figure(plt, fig, path)


STUDY = runner.Study("compute", __doc__.split("\n\n")[0], runs, plot,
                     finish=measure_step_costs)

if __name__ == "__main__":
    sys.exit(runner.main(STUDY))
