"""Post-hoc EMA on digits: FD against the EMA length sigma_rel, for the teacher and the sCD
student, each EMA rebuilt after training from the snapshots of the two tracked power EMAs (0.05
and 0.10; `python -m scm_jax.posthoc_ema`).

The paper picks every EMA length after training (sCM Tables 4/5, with EDM2's post-hoc EMA): the
teacher EMA the CM starts from (sigma_rel 0.015-0.075 by size) and sigma_rel 0.05 to sample the
CMs. The question here: on digits, where along sigma_rel are the teacher (35 NFE) and the 2-step
and 1-step sCD student best, and how far is the configured 0.1 (the digits default) or the
paper's 0.05 from that? The student distills the teacher's own EMA (0.1) as in the pipeline;
the rebuilt EMA of a tracked sigma_rel at the last snapshot is that snapshot exactly.

    python -m scm_jax.studies.posthoc --workdir=/tmp/study_posthoc
"""
import copy
import os
import sys

from scm_jax.studies import runner

SIGMA_RELS = (0.02, 0.035, 0.05, 0.07, 0.1, 0.15, 0.2)
TINY_SIGMA_RELS = (0.05, 0.07)


def runs(size, config):
    return [runner.Run("scd", "scd", label="sCD (default length)", group="scd")]


def measure(results, config, log=print) -> None:
    """results['posthoc'] = {'teacher' | 'scd': {sigma_rel: [rows]}}: each model's EMA of every
    sigma_rel rebuilt from its snapshots and scored (the teacher at its longest solver length;
    the student at 1 and 2 steps). Resumable: a scored sigma_rel is not scored again."""
    from scm_jax import evaluate, files, posthoc_ema, sharding
    from scm_jax.evaluation import evaluators

    workdir = results["workdir"]
    sigma_rels = SIGMA_RELS if results.get("size", "full") == "full" else TINY_SIGMA_RELS
    scorer = evaluators.from_config(config.eval, config.data, sharding.make_mesh(config.mesh),
                                    eval_dir=files.join(workdir, "eval"), log=log)
    models = [("teacher", results["teachers"]["base"]["directory"])]
    if results["runs"].get("scd", {}).get("status") == "done":
        models.append(("scd", results["runs"]["scd"]["directory"]))
    out = results.setdefault("posthoc", {})
    for stage, directory in models:
        done = out.setdefault(stage, {})
        todo = [s for s in sigma_rels if f"{s:g}" not in done]
        if not todo:
            continue
        cfg = copy.deepcopy(config)
        cfg[stage].checkpoint_dir = directory
        cfg.eval.teacher_steps = (max(cfg.eval.teacher_steps),)
        rebuilt = posthoc_ema.reconstruct_stage(cfg, workdir, stage, list(todo), log=log)
        errors = {f"{r['sigma_rel']:g}": r["profile_error"] for r in rebuilt}
        for s in todo:
            cfg.eval.sigma_rel = float(s)
            scores = evaluate.evaluate_all(
                cfg, os.path.join(workdir, "posthoc_eval", f"{stage}_{s:g}"), stages=(stage,),
                scorer=scorer, log=log)
            done[f"{s:g}"] = dict(profile_error=errors[f"{s:g}"], rows=[
                runner._row(r) for r in scores["rows"] if r.get("id") != "data"])
            log(f"[study] {stage} EMA {s:g}: " + ", ".join(
                f"{r['nfe']}-NFE FD {r['fd']:.3f}" for r in done[f"{s:g}"]["rows"]))
            results["posthoc"] = out


def curve(results, stage: str, nfe: int) -> list:
    """[(sigma_rel, FD)] of `stage` at `nfe` evaluations, by sigma_rel."""
    pts = []
    for s, entry in results.get("posthoc", {}).get(stage, {}).items():
        fds = [r["fd"] for r in entry["rows"] if r["nfe"] == nfe]
        if fds:
            pts.append((float(s), min(fds)))
    return sorted(pts)


def plot(results, path):
    plt, fig, axes = runner.figure(2)
    teacher_nfe = max((r["nfe"] for e in results.get("posthoc", {}).get("teacher", {}).values()
                       for r in e["rows"]), default=0)
    panels = ((axes[0], "teacher", ((teacher_nfe, f"teacher, {teacher_nfe} NFE"),)),
              (axes[1], "scd", ((2, "sCD 2-step"), (1, "sCD 1-step"))))
    for ax, stage, lines in panels:
        for i, (nfe, label) in enumerate(lines):
            pts = curve(results, stage, nfe)
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=label)
        ax.axvline(0.05, color="gray", ls="--", lw=0.8, label="0.05 (paper, CM sampling)")
        ax.axvline(0.1, color="gray", ls=":", lw=0.8, label="0.1 (digits default)")
        ax.set_xscale("log")
        measured = sorted({float(s) for s in results.get("posthoc", {}).get(stage, {})})
        if measured:
            ax.set_xticks(measured)   # each measured length labelled, none in between
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set(xlabel="post-hoc EMA sigma_rel", ylabel="FD (digits classifier)",
               title=f"{stage}: FD against the EMA length")
        ax.legend(fontsize=7)
    runner.save_figure(plt, fig, path)


def best(results, stage: str, nfe: int):
    """(sigma_rel, FD) with the lowest FD of `stage` at `nfe`, or None."""
    pts = curve(results, stage, nfe)
    return min(pts, key=lambda p: p[1]) if pts else None


STUDY = runner.Study("posthoc", __doc__.split("\n\n")[0], runs, plot, finish=measure)

if __name__ == "__main__":
    sys.exit(runner.main(STUDY))
