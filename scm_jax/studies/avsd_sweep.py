"""aVSD tuned on digits (sCM App. C): sCD + lambda aVSD at lambda 0.1, 0.3 and 1 (Table 5's),
F_phi's learning rate at the CM's (Table 5's), 3x and 10x (the teacher's), aVSD alone at each
F_phi learning rate, and two settings trained longer (600, 1200 and 2500 steps, sCD's own
length): sCD + 0.1 aVSD and aVSD alone with F_phi at 10x; against sCD at the same 600 steps:
1- and 2-step FD, precision and recall.

The question: is there a setting where aVSD helps digits (the paper's small 1-step gain on
ImageNet 512 comes from sCD + aVSD at lambda 1), and does it beat sCD's 1-step FD? lambda is not
swept for aVSD alone: there the generator's and w_psi's gradients are lambda times those at
lambda 1, and Adam is invariant to a constant scale of a gradient except through its epsilon,
so lambda acts only as a change of epsilon (tested); it matters while the generator's gradient
is near epsilon's size (F_phi starts as the teacher, so the direction F_pre - F_phi starts near
0). F_phi's learning rate is swept: it sets how closely the fake score follows the generator's
distribution, the usual failure of variational score distillation when it lags. The longer
points extend the 600-step runs (the schedules depend only on the step, so an extended run is a
run of that length); which settings to extend was chosen from the 600-step runs (the best
sCD + aVSD and the best aVSD alone).

    python -m scm_jax.studies.avsd_sweep --workdir=/tmp/study_avsd --teacher_workdir=DIR
"""
import sys

from scm_jax.studies import runner

STEPS = 600
LONG = (1200, 2500)   # the lengths the two longer settings are extended to
LONG_LAMBDA = 0.1     # sCD + LONG_LAMBDA aVSD (F_phi at the CM's lr) is one of them
LONG_FAKE_LR = 10.0   # aVSD alone with F_phi at this factor of the CM's lr the other


def _fake_lr(config, stage: str, factor: float) -> float:
    return float(f"{float(config[stage].optimizer.lr) * factor:.3g}")


def _lambda_run(lam, steps):
    return runner.Run(
        f"scd_vsd_l{lam:g}", "scd_vsd", (f"scd_vsd.vsd.weight={lam}", f"scd_vsd.steps={steps}"),
        label=f"sCD + {lam:g} aVSD", group="lambda", x=lam, directory=f"scd_vsd_l{lam:g}")


def _long_run(steps):
    """sCD + LONG_LAMBDA aVSD extended to `steps` (the folder of its `_lambda_run`)."""
    return runner.Run(
        f"scd_vsd_l{LONG_LAMBDA:g}_{steps}", "scd_vsd",
        (f"scd_vsd.vsd.weight={LONG_LAMBDA}", f"scd_vsd.steps={steps}"),
        label=f"sCD + {LONG_LAMBDA:g} aVSD, {steps} steps", group="length", x=steps,
        directory=f"scd_vsd_l{LONG_LAMBDA:g}")


def _vsd_run(config, factor, steps):
    """aVSD alone with F_phi's lr at `factor` times the CM's (always named: the digits default
    is not the CM's lr)."""
    return runner.Run(f"vsd_flr{factor:g}", "vsd",
                      (f"vsd.vsd.fake_lr={_fake_lr(config, 'vsd', factor)}", f"vsd.steps={steps}"),
                      label=f"aVSD, F_phi lr {factor:g}x", group="vsd", x=factor)


def runs(size, config):
    if size != "full":   # the test size: one of each kind, and one extension
        n = int(config.scd_vsd.steps)
        return [_lambda_run(0.1, n), _long_run(2 * n),
                _vsd_run(config, 10, int(config.vsd.steps))]

    def flr_run(factor):
        return runner.Run(
            f"scd_vsd_l{LONG_LAMBDA:g}_flr{factor:g}", "scd_vsd",
            (f"scd_vsd.vsd.weight={LONG_LAMBDA}",
             f"scd_vsd.vsd.fake_lr={_fake_lr(config, 'scd_vsd', factor)}",
             f"scd_vsd.steps={STEPS}"),
            label=f"sCD + {LONG_LAMBDA:g} aVSD, F_phi lr {factor:g}x", group="flr", x=factor)

    def vsd_long_run(n):
        factor = LONG_FAKE_LR
        return runner.Run(
            f"vsd_flr{factor:g}_{n}", "vsd",
            (f"vsd.vsd.fake_lr={_fake_lr(config, 'vsd', factor)}", f"vsd.steps={n}"),
            label=f"aVSD, F_phi lr {factor:g}x, {n} steps", group="vsd_length", x=n,
            directory=f"vsd_flr{factor:g}")

    # In the order of what each answers: lambda, F_phi's lr (alone, with sCD), length; Table
    # 5's settings (lambda 1, F_phi at the CM's lr), then the equal-length sCD reference (the compute study has sCD at 400 and 800 steps).
    return ([_lambda_run(0.1, STEPS), _lambda_run(0.3, STEPS), _vsd_run(config, 10, STEPS),
             flr_run(10)]
            + [_long_run(n) for n in LONG] + [vsd_long_run(n) for n in LONG]
            + [_lambda_run(1.0, STEPS), _vsd_run(config, 3, STEPS), _vsd_run(config, 1, STEPS),
               flr_run(3),
               runner.Run(f"scd_{STEPS}", "scd", (f"scd.steps={STEPS}",),
                          label=f"sCD, {STEPS} steps", group="scd", x=STEPS)])


def table(results) -> list:
    """[(run id, label, steps, 1-step row, 2-step row)] of the finished runs, in run order."""
    out = []
    for rid, entry in results["runs"].items():
        if entry.get("status") != "done":
            continue
        out.append((rid, entry["label"], entry["steps"], runner.best_row(entry, 1),
                    runner.best_row(entry, 2)))
    return out


def best(results, nfe: int = 1):
    """(run id, row) of the lowest `nfe`-step FD among the aVSD runs (sCD + aVSD or alone)."""
    rows = [(rid, runner.best_row(e, nfe)) for rid, e in results["runs"].items()
            if "vsd" in rid and e.get("status") == "done"]
    return min(((rid, r) for rid, r in rows if r), key=lambda x: x[1]["fd"],
               default=(None, None))


def _series(results, group: str, first: str = ""):
    """[(x, entry)] of the finished runs of `group` (and run `first`, the 600-step start of a
    longer setting, at x = its steps), by x."""
    out = [(e["x"], e) for rid, e in results["runs"].items()
           if e.get("status") == "done" and e["group"] == group]
    if first and results["runs"].get(first, {}).get("status") == "done":
        out.append((results["runs"][first]["steps"], results["runs"][first]))
    return sorted(out, key=lambda m: m[0])


def plot(results, path):
    plt, fig, axes = runner.figure(3)
    fake = f"vsd_flr{LONG_FAKE_LR:g}"
    panels = (
        ("sCD + lambda aVSD (600 steps)", "lambda", "log",
         (("", _series(results, "lambda")),)),
        ("trained longer", "steps", "linear",
         ((f"sCD + {LONG_LAMBDA:g} aVSD ", _series(results, "length", f"scd_vsd_l{LONG_LAMBDA:g}")),
          (f"aVSD, F_phi {LONG_FAKE_LR:g}x ", _series(results, "vsd_length", fake)))),
        ("aVSD alone (600 steps)", "F_phi lr / CM lr", "log",
         (("", _series(results, "vsd")),)))
    for ax, (title, xlabel, scale, series) in zip(axes, panels):
        for i, (name, members) in enumerate(series):
            for nfe, style in ((1, "o-"), (2, "s--")):
                pts = [(x, runner.best_row(e, nfe)) for x, e in members]
                pts = [(x, r["fd"]) for x, r in pts if r]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{2 * i + nfe - 1}",
                            label=f"{name}{nfe}-step FD")
        ref = results["runs"].get(f"scd_{STEPS}")
        for nfe, ls in ((1, ":"), (2, "-.")):
            r = runner.best_row(ref, nfe) if ref and ref.get("status") == "done" else None
            if r:
                ax.axhline(r["fd"], color="gray", ls=ls, label=f"sCD {STEPS} steps, {nfe}-step")
        runner.teacher_line(ax, runner.teacher_row(results))
        ax.set(title=title, xlabel=xlabel, ylabel="FD", xscale=scale, yscale="log")
        ax.legend(fontsize=7)
    runner.save_figure(plt, fig, path)


STUDY = runner.Study("avsd_sweep", __doc__.split("\n\n")[0], runs, plot)

if __name__ == "__main__":
    sys.exit(runner.main(STUDY))
