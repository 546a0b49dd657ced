"""What every study shares: one command line, shared teachers, runs that resume, one JSON.

A study is a list of `Run`s (a training stage of the experiment config with overrides, started
from one of the study's teachers) and a plot. `run_study` trains each run in
`<workdir>/runs/<run id>/`, scores its EMA with the experiment's evaluation (the digits
classifier's FD, precision and recall; one scorer for every run), reads its training curves from
`metrics.jsonl`, and rewrites `<workdir>/<study>.json` after every run, so an interrupted study
re-run with the same command skips the finished runs and resumes the unfinished one from its
last checkpoint. A run whose training diverges (the non-finite guard stops it,
`train.TrainingDiverged`) is recorded as diverged with the step and the message, and the study
goes on. The plot is redrawn from the JSON at the end (`<workdir>/<study>.png`).

Seeds: `--seeds=N` trains every run N times, with student seeds config.seed + 0..N-1 (the
teachers shared); the other seeds' results sit in the run's entry (`seeds`), and `best_row`
returns the mean over the seeds with its spread (`fd_std`, the sample standard deviation, and
`fd_values`). `compare` calls two results different only when their means differ by more than
the larger spread (otherwise 'inconclusive'); with one seed it cannot say.

Teachers: the study's default teacher is trained once in `<workdir>/teachers/base/` (or taken
from an existing run of the experiment, `--teacher_workdir=DIR`, its `DIR/teacher`); a study
that changes the architecture names other teachers (`Study.teachers`: id -> overrides), each
trained once with those overrides.
"""
import dataclasses
import json
import os
import time
from typing import Callable

CURVES = ("loss", "raw_loss", "tangent_norm", "grad_norm")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a study: `stage` of the experiment config with `overrides`
    ('key=value', as --config.key=value) from teacher `teacher`, scored by evaluation with
    `eval_overrides` (e.g. guidance scales). `label` names it in tables and plots; `group`
    and `x` place it in the plot."""

    id: str
    stage: str
    overrides: tuple = ()
    teacher: str = "base"   # '' = the run trains a teacher stage itself (no study teacher)
    eval_overrides: tuple = ()
    label: str = ""
    group: str = ""
    x: float = 0.0
    directory: str = ""   # '' = the id; runs sharing one extend it in order (longer each time)


@dataclasses.dataclass
class Study:
    """name; runs(size, config) -> [Run]; plot(results, path); the teachers the runs name
    (id -> overrides; 'base' is the experiment's own), each scored with the evaluation
    overrides teacher_eval_overrides(size); finish, when given, adds to the results after the
    runs (before the plot); table, when given, makes the study's markdown table from the results
    (written to <workdir>/<name>.md and printed at the end)."""

    name: str
    description: str
    runs: Callable
    plot: Callable
    teachers: dict = dataclasses.field(default_factory=lambda: {"base": ()})
    teacher_eval_overrides: Callable = lambda size: ()
    finish: Callable | None = None   # finish(results, config, log): extra measurements, once
    table: Callable | None = None    # table(results) -> markdown


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "the study's directory (its runs, JSON and PNG)",
                        flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.DEFINE_string("config", "experiments/digits.py", "the digits experiment the runs "
                        "start from; entries of every run overridden with "
                        "--config.<key>=<value>", flag_values=fv)
    flags.DEFINE_enum("size", "full", ("full", "tiny"), "'tiny': the seconds-long variant (what "
                      "the tests run)", flag_values=fv)
    flags.DEFINE_string("teacher_workdir", None, "reuse the teacher of a digits run instead of "
                        "training one", flag_values=fv)
    flags.DEFINE_string("only", "", "comma-separated run ids (default: all)", flag_values=fv)
    flags.DEFINE_integer("seeds", 1, "student seeds per run (the tables show mean and spread)",
                         lower_bound=1, flag_values=fv)


def main(study: Study, argv=None) -> int:
    """The command `python -m scm_jax.studies.<name>`: argv without the program name
    (sys.argv's by default). Runs (or resumes) the study; returns the exit status (2 with a
    one-line error for a bad flag or a known failure)."""
    from scm_jax import cli

    doc = (f"python -m scm_jax.studies.{study.name} --workdir=DIR [flags]: "
           f"{study.description}")

    def body(fv, overrides) -> int:
        run_study(study, workdir=fv.workdir, config=fv.config, size=fv.size,
                  teacher_workdir=fv.teacher_workdir, only=fv.only, overrides=overrides,
                  seeds=fv.seeds)
        return 0

    return cli.run_command(doc, _define_flags, body, cli.program_argv(argv))


def load_config(spec: str, size: str, overrides=()):
    """The experiment config at the study's size ('tiny': the seconds-long variant)."""
    from scm_jax import config_checks, configs

    if size == "tiny":
        spec = spec if ":" in spec else f"{spec}:variant=tiny"
    config = configs.load(spec, list(overrides))
    config_checks.validate(config)
    return config


def run_study(study: Study, *, workdir, config="experiments/digits.py", size="full",
              teacher_workdir=None, only="", overrides=(), seeds: int = 1, log=print) -> dict:
    """Runs (or resumes) the study, every run with `seeds` student seeds; returns its results
    dict (also in <workdir>/<name>.json)."""
    from scm_jax import files, sharding
    from scm_jax.evaluation import evaluators

    spec, common = config, tuple(overrides)
    base = load_config(spec, size, common)
    if base.data.name != "digits":
        from scm_jax.errors import ConfigError
        raise ConfigError(f"the studies run on the digits experiment (scored by its classifier); "
                          f"got data.name={base.data.name!r}")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"{study.name}.json")
    results = dict(study=study.name, description=study.description, config=spec, size=size,
                   overrides=list(common), teachers={}, runs={})
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if (previous.get("config"), previous.get("size"), previous.get("overrides")) == (
                spec, size, list(common)):
            results = previous
        else:
            log(f"[study] {path} belongs to another command ({previous.get('config')}, "
                f"{previous.get('size')}, {previous.get('overrides')}): starting over beside it")
            os.replace(path, path + ".old")

    def save():
        files.write_json(path, results)

    runs = study.runs(size, base)
    unknown = sorted(set(filter(None, only.split(","))) - {r.id for r in runs})
    if unknown:
        from scm_jax.errors import ConfigError
        raise ConfigError(f"--only names unknown runs {unknown}; this study's runs at size "
                          f"{size!r}: {', '.join(r.id for r in runs)}")
    wanted = [r for r in runs if not only or r.id in only.split(",")]
    mesh = sharding.make_mesh(base.mesh)
    scorer = evaluators.from_config(base.eval, base.data, mesh, eval_dir=files.join(workdir, "eval"), log=log)
    teacher_dirs = {}
    named = {r.teacher for r in wanted if r.teacher}
    for tid in sorted(named | ({"base"} if "base" in study.teachers else set())):
        teacher_dirs[tid] = _teacher(study, tid, base, spec, size, common, workdir,
                                     teacher_workdir, results, scorer, save, log)
    t_start = time.time()
    results["seeds"] = max(int(seeds), int(results.get("seeds", 1)))
    for i, run in enumerate(wanted):
        for k in range(int(seeds)):
            entry = results["runs"].get(run.id)
            if k:
                entry = (entry or {}).get("seeds", {}).get(str(k))
            steps = _steps(run, base)
            if entry and entry.get("status") in ("done", "diverged") and entry.get("steps") == steps:
                continue
            log(f"[study] run {i + 1}/{len(wanted)}: {run.id}" + (f" (seed +{k})" if k else "")
                + f" ({run.stage}, {' '.join(run.overrides) or 'as configured'})")
            entry = _train_and_score(run, k, spec, size, common, base, steps, workdir,
                                     teacher_dirs, scorer, log)
            if k:
                results["runs"][run.id].setdefault("seeds", {})[str(k)] = entry
            else:
                entry["seeds"] = results["runs"].get(run.id, {}).get("seeds", {})
                results["runs"][run.id] = entry
            save()
    if study.finish is not None:
        results["workdir"] = str(workdir)
        study.finish(results, base, log)
    results["wall_seconds_last_invocation"] = time.time() - t_start
    save()
    png = os.path.join(workdir, f"{study.name}.png")
    study.plot(results, png)
    if study.table is not None:
        text = study.table(results)
        files.write_text(os.path.join(workdir, f"{study.name}.md"), text + "\n")
        log(text)
    log(f"[study] {study.name}: {path}, {png}")
    return results


def _train_and_score(run: Run, k: int, spec, size, common, base, steps, workdir, teacher_dirs,
                     scorer, log) -> dict:
    """Trains run `run` with student seed config.seed + k (in its own folder for k > 0) and
    scores it; its results entry."""
    from scm_jax import evaluate, train

    seed = (f"seed={int(base.seed) + k}",) if k else ()
    cfg = load_config(spec, size, common + tuple(run.overrides) + seed
                      + tuple(run.eval_overrides))
    if run.teacher:
        cfg.teacher.checkpoint_dir = teacher_dirs[run.teacher]
    run_dir = os.path.join(workdir, "runs", (run.directory or run.id) + (f"_seed{k}" if k else ""))
    stage_dir = os.path.join(run_dir, run.stage)
    _check_not_past(stage_dir, steps, run)
    entry = dict(stage=run.stage, overrides=list(run.overrides + seed), teacher=run.teacher,
                 label=run.label or run.id, group=run.group, x=run.x, steps=steps,
                 directory=stage_dir)
    t0 = time.time()
    try:
        train.train_stage(cfg, run.stage, run_dir, log=log)
        entry["status"] = "done"
    except train.TrainingDiverged as e:
        entry.update(status="diverged", message=str(e))
        log(f"[study] {run.id}: diverged: {e}")
    entry["curves"] = read_curves(os.path.join(stage_dir, "metrics.jsonl"))
    entry["rows"] = []
    if entry["status"] == "done":
        cfg[run.stage].checkpoint_dir = stage_dir   # scored from the run's checkpoints
        scores = evaluate.evaluate_all(cfg, os.path.join(run_dir, f"eval_at_{steps}"),
                                       stages=(run.stage,), scorer=scorer, log=log)
        entry["rows"] = [_row(r) for r in scores["rows"] if r.get("id") != "data"]
    entry["seconds"] = time.time() - t0
    return entry


def _steps(run: Run, config) -> int:
    for item in run.overrides:
        key, _, value = item.partition("=")
        if key == f"{run.stage}.steps":
            return int(float(value))
    return int(config[run.stage].steps)


def _check_not_past(stage_dir: str, steps: int, run: Run) -> None:
    """A run extended to `steps` must not already hold a later checkpoint (its score would be
    the later one's)."""
    from scm_jax import checkpoint as ckpt
    from scm_jax.errors import ConfigError

    if ckpt.has_checkpoint(stage_dir):
        latest = ckpt.CheckpointStore(stage_dir).latest_step()
        if latest is not None and latest > steps:
            raise ConfigError(f"run {run.id}: {stage_dir} already holds step {latest} > "
                              f"{run.stage}.steps={steps}; its earlier lengths are scored in "
                              f"order (remove the folder to redo it)")


def _row(r: dict) -> dict:
    keep = ("id", "nfe", "guidance", "fd", "fd_small", "accuracy", "precision", "recall",
            "checkpoint_step")
    return {k: r[k] for k in keep if k in r}


def _teacher(study, tid, base, spec, size, common, workdir, teacher_workdir, results, scorer,
             save, log) -> str:
    """The checkpoint folder of teacher `tid`, trained (or resumed) here unless it is 'base'
    with --teacher_workdir; scored once when the study asks."""
    from scm_jax import evaluate, train

    overrides = tuple(study.teachers.get(tid, ()))
    if tid == "base" and teacher_workdir:
        directory = os.path.join(teacher_workdir, "teacher")
        if not os.path.isdir(directory):
            from scm_jax.errors import MissingInputError
            raise MissingInputError(f"--teacher_workdir={teacher_workdir} has no teacher/ "
                                    f"folder (train one with stage=teacher)")
        run_dir = teacher_workdir
    else:
        run_dir = os.path.join(workdir, "teachers", tid)
        directory = os.path.join(run_dir, "teacher")
    evaluation = tuple(study.teacher_eval_overrides(size))
    cfg = load_config(spec, size, common + overrides + evaluation)
    record = results["teachers"].get(tid, {})
    if record.get("status") != "done":
        log(f"[study] teacher {tid} ({' '.join(overrides) or 'the experiment config'})")
        t0 = time.time()
        if not (tid == "base" and teacher_workdir):
            train.train_stage(cfg, "teacher", run_dir, log=log)
        cfg.teacher.checkpoint_dir = directory
        scores = evaluate.evaluate_all(cfg, os.path.join(workdir, "teachers", f"{tid}_eval"),
                                       stages=("teacher",), scorer=scorer, log=log)
        record = dict(status="done", overrides=list(overrides), directory=directory,
                      train_seconds=time.time() - t0,
                      curves=read_curves(os.path.join(directory, "metrics.jsonl")),
                      rows=[_row(r) for r in scores["rows"] if r.get("id") != "data"])
        results["teachers"][tid] = record
        save()
    return directory


def read_curves(path: str) -> dict:
    """{'step': [...], name: [...]} from a stage's metrics.jsonl (the training rows; missing
    values and non-finite ones (written as null) become NaN)."""
    out = {"step": [], "steps_per_sec": []}
    out.update({k: [] for k in CURVES})
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "step" not in row or not any(k in row for k in CURVES):
                continue
            out["step"].append(row["step"])
            for k in CURVES + ("steps_per_sec",):
                v = row.get(k)
                out[k].append(float("nan") if v is None or isinstance(v, str) else float(v))
    return out


# --- Helpers the studies' tables and plots share ----------------------------------------------
def _seed_row(entry: dict, nfe: int, guidance: float):
    for r in entry.get("rows", []):
        if r.get("nfe") == nfe and abs(r.get("guidance", 1.0) - guidance) < 1e-9:
            return r
    return None


MEANS = ("fd", "fd_small", "accuracy", "precision", "recall")


def best_row(entry: dict, nfe: int, guidance: float = 1.0):
    """The row of a run (or a teacher) at `nfe` and `guidance`, or None. A run trained with
    several seeds (`seeds`) gives the mean over those that finished, with `n`, `fd_std` (the
    sample standard deviation; 0 for one) and `fd_values`."""
    rows = [_seed_row(entry, nfe, guidance)] + [
        _seed_row(e, nfe, guidance) for _, e in sorted(entry.get("seeds", {}).items())]
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    if len(rows) == 1 and not entry.get("seeds"):
        return rows[0]
    out = dict(rows[0], n=len(rows), fd_values=[r["fd"] for r in rows])
    for key in MEANS:
        if all(key in r for r in rows):
            out[key] = float(sum(r[key] for r in rows) / len(rows))
    values = out["fd_values"]
    out["fd_std"] = (float((sum((v - out["fd"]) ** 2 for v in values) / (len(values) - 1))
                           ** 0.5) if len(values) > 1 else 0.0)
    return out


def compare(a: dict, b: dict, key: str = "fd") -> str:
    """'lower' / 'higher' (a's mean against b's) when they differ by more than the larger of
    their run-to-run spreads (`best_row`'s `fd_std`), else 'inconclusive' (also when either
    has fewer than two seeds: its spread is unknown)."""
    if min(a.get("n", 1), b.get("n", 1)) < 2:
        return "inconclusive"
    spread = max(a.get(f"{key}_std", 0.0), b.get(f"{key}_std", 0.0))
    diff = a[key] - b[key]
    if abs(diff) <= spread:
        return "inconclusive"
    return "lower" if diff < 0 else "higher"


def format_fd(row: dict | None) -> str:
    """'2.310' for one seed, '2.310 ± 0.120 (3)' for several, '-' for none."""
    if row is None:
        return "-"
    if row.get("n", 1) > 1:
        return f"{row['fd']:.3f} ± {row['fd_std']:.3f} ({row['n']})"
    return f"{row['fd']:.3f}"


def teacher_row(results: dict, tid: str = "base", guidance: float = 1.0):
    """The teacher's row at its longest solver length (the reference of the ratios)."""
    rows = [r for r in results["teachers"].get(tid, {}).get("rows", [])
            if abs(r.get("guidance", 1.0) - guidance) < 1e-9]
    return max(rows, key=lambda r: r["nfe"]) if rows else None


def figure(ncols: int, width: float = 4.2, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, axes[0]


def teacher_line(ax, teacher) -> None:
    """The teacher's FD as a horizontal line (a row from `teacher_row`, or None)."""
    if teacher:
        ax.axhline(teacher["fd"], color="gray", ls=":", label=f"teacher (NFE {teacher['nfe']})")


def save_figure(plt, fig, path, dpi: int = 100) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
