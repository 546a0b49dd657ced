"""The studies (scm_jax/studies) at their tiny size: every run trains, is scored and lands in the
JSON table, the plot is written, a re-run trains nothing, and a diverging run is recorded, not
raised. One tiny teacher serves every study (--teacher_workdir)."""
import json
import os

import numpy as np
import pytest

from scm_jax import train
from scm_jax.studies import (avsd_sweep, compute, continuous_vs_discrete, posthoc, robustness,
                             runner, stabilizers, teacher_length, vsd_vs_scd)
from tests.helpers import load_experiment


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("study_teacher"))
    train.train_stage(load_experiment("digits", "variant=tiny"), "teacher", workdir,
                      log=lambda m: None)
    return workdir


def _run(study, tmp_path, teacher_workdir, **kw):
    lines = []
    results = runner.run_study(study.STUDY, workdir=str(tmp_path), size="tiny",
                               teacher_workdir=teacher_workdir, overrides=("eval.teacher_steps=2",),
                               log=lambda m: lines.append(str(m)), **kw)
    saved = json.loads((tmp_path / f"{study.STUDY.name}.json").read_text())
    assert saved["runs"].keys() == results["runs"].keys()
    assert (tmp_path / f"{study.STUDY.name}.png").stat().st_size > 5000
    return results, lines


def _scored(entry, nfes=(1, 2)):
    assert entry["status"] == "done", entry
    assert sorted(r["nfe"] for r in entry["rows"]) == sorted(nfes), entry["rows"]
    assert all(r["fd"] > 0 and 0 <= r["precision"] <= 1 for r in entry["rows"])
    assert len(entry["curves"]["step"]) > 0 and entry["curves"]["loss"]


@pytest.mark.slow
def test_continuous_vs_discrete(tmp_path, teacher_workdir):
    results, _ = _run(continuous_vs_discrete, tmp_path, teacher_workdir)
    assert set(results["runs"]) == {"scd", "dscd_N16"}
    for entry in results["runs"].values():
        _scored(entry)
    assert results["runs"]["dscd_N16"]["overrides"][-1] == "dscd.loss.num_points=16"
    assert runner.teacher_row(results)["fd"] > 0
    # Done runs are not trained again.
    _, lines = _run(continuous_vs_discrete, tmp_path, teacher_workdir)
    assert not any(line.startswith("[study] run") for line in lines), lines
    # --seeds=2 adds one more student seed per run (and only that), summarized as mean and
    # spread: the other seed is another run.
    results, lines = _run(continuous_vs_discrete, tmp_path, teacher_workdir, seeds=2)
    assert sum(line.startswith("[study] run") for line in lines) == 2, lines
    for rid, entry in results["runs"].items():
        other = entry["seeds"]["1"]
        _scored(other)
        assert other["overrides"][-1] == "seed=1" and other["directory"].endswith(
            f"{rid}_seed1/{entry['stage']}")
        row = runner.best_row(entry, 2)
        assert row["n"] == 2 and len(set(row["fd_values"])) == 2 and row["fd_std"] > 0
        assert row["fd"] == pytest.approx(sum(row["fd_values"]) / 2)
    assert results["seeds"] == 2


def test_best_row_means_seeds_and_compare_needs_a_gap_beyond_the_spread():
    def entry(*fds):
        rows = lambda fd: [dict(nfe=2, guidance=1.0, fd=fd, precision=0.5)]  # noqa: E731
        return dict(rows=rows(fds[0]), seeds={str(i + 1): dict(rows=rows(fd))
                                              for i, fd in enumerate(fds[1:])})

    a, b, c = (runner.best_row(entry(*v), 2) for v in ((1.0, 1.2, 1.1), (2.0, 2.2, 2.1),
                                                        (1.05, 1.25, 1.15)))
    assert a["fd"] == pytest.approx(1.1) and a["fd_std"] == pytest.approx(0.1) and a["n"] == 3
    assert runner.compare(a, b) == "lower" and runner.compare(b, a) == "higher"
    assert runner.compare(a, c) == "inconclusive"   # 0.05 apart, within the spread 0.1
    single = runner.best_row(dict(rows=[dict(nfe=2, fd=1.0)]), 2)
    assert "n" not in single and runner.compare(single, b) == "inconclusive"
    assert runner.format_fd(a) == "1.100 ± 0.100 (3)" and runner.format_fd(single) == "1.000"


@pytest.mark.slow
def test_vsd_vs_scd_scores_each_method_at_its_guidance(tmp_path, teacher_workdir):
    # aVSD at the tiny size's one scale (sCD + aVSD and sCD train through the same runner).
    results, _ = _run(vsd_vs_scd, tmp_path, teacher_workdir, only="vsd_g1.5")
    assert set(results["runs"]) == {"vsd_g1.5"}
    for entry in results["runs"].values():
        _scored(entry)
        # Distilled at 1.5, sampled without more guidance: the row says 1.5.
        assert {r["guidance"] for r in entry["rows"]} == {1.5}
    teacher = results["teachers"]["base"]["rows"]
    assert {r["guidance"] for r in teacher} == {1.5}


def test_vsd_vs_scd_trains_avsd_at_table_5s_settings_not_the_tuned_defaults():
    config = runner.load_config("experiments/digits.py", "full")
    assert config.vsd.vsd.fake_lr > 0 and config.scd_vsd.vsd.weight != 1.0   # tuned defaults
    for run in vsd_vs_scd.runs("full", config):
        if run.stage in ("vsd", "scd_vsd"):
            assert run.overrides[0] == f"{run.stage}.steps=600"
            assert {f"{run.stage}.vsd.weight=1.0", f"{run.stage}.vsd.fake_lr=0.0"} <= set(
                run.overrides), run
            cfg = runner.load_config("experiments/digits.py", "full", run.overrides)
            assert (cfg[run.stage].vsd.weight, cfg[run.stage].vsd.fake_lr) == (1.0, 0.0)


@pytest.mark.slow
def test_avsd_sweep_extends_one_setting_and_ranks_the_aVSD_runs(tmp_path, teacher_workdir):
    results, _ = _run(avsd_sweep, tmp_path, teacher_workdir)
    runs = results["runs"]
    assert set(runs) == {"scd_vsd_l0.1", "scd_vsd_l0.1_8", "vsd_flr10"}
    for entry in runs.values():
        _scored(entry)
        assert {r["checkpoint_step"] for r in entry["rows"]} == {entry["steps"]}
    # The longer point is the 4-step run extended: one folder, scored at 4 and at 8 steps.
    assert runs["scd_vsd_l0.1"]["directory"] == runs["scd_vsd_l0.1_8"]["directory"]
    assert "scd_vsd.vsd.weight=0.1" in runs["scd_vsd_l0.1_8"]["overrides"]
    lr = float(load_experiment("digits", "variant=tiny").vsd.optimizer.lr)
    assert f"vsd.vsd.fake_lr={10 * lr:.3g}" in runs["vsd_flr10"]["overrides"]
    rid, row = avsd_sweep.best(results, 1)
    assert row["fd"] == min(runner.best_row(e, 1)["fd"] for e in runs.values())
    assert [r[0] for r in avsd_sweep.table(results)] == list(runs)


@pytest.mark.slow
def test_lambda_acts_on_avsd_alone_only_through_adams_epsilon(tmp_path, teacher_workdir):
    """Why the sweep varies lambda only beside the sCD term: for aVSD alone every gradient (the
    generator's and w_psi's) is lambda times that at lambda 1, so with Adam's epsilon at ~0
    lambda 4 trains the generator lambda 1 does, to float32 rounding; at the default epsilon
    it does not (F_phi starts as the teacher, so the aVSD direction and the generator's
    gradient start near 0, where epsilon dominates Adam's step)."""
    import jax
    import numpy as np

    from scm_jax import stage_restore

    def trained(weight, eps):
        config = load_experiment("digits", "variant=tiny", (f"vsd.vsd.weight={weight}",
                                                            f"vsd.optimizer.eps={eps}"))
        config.teacher.checkpoint_dir = os.path.join(teacher_workdir, "teacher")
        workdir = str(tmp_path / f"w{weight}_{eps}")
        train.train_stage(config, "vsd", workdir, log=lambda m: None)
        return stage_restore.restore_stage_ema(config, "vsd", workdir, log=lambda m: None)[0]

    def gap(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    default_eps = gap(trained(1.0, 1e-8), trained(4.0, 1e-8))
    no_eps = gap(trained(1.0, 1e-30), trained(4.0, 1e-30))
    assert default_eps > 0 and no_eps <= 0.05 * default_eps, (no_eps, default_eps)


@pytest.mark.slow
def test_compute_extends_each_run_and_measures_its_cost(tmp_path, teacher_workdir):
    results, _ = _run(compute, tmp_path, teacher_workdir)
    assert set(results["runs"]) == {"scd_4", "scd_8"}
    for rid, entry in results["runs"].items():
        _scored(entry)
        assert {r["checkpoint_step"] for r in entry["rows"]} == {entry["steps"]}
    cost = results["step_cost"]
    assert set(cost) == {"teacher", "scd", "sct"} and cost["teacher"]["time_ratio"] == 1.0
    assert cost["scd"]["flops_ratio"] > 1.2 and cost["sct"]["flops_ratio"] > 1.1
    fractions = compute.fractions(results)
    assert 0 < fractions["scd_4"] < fractions["scd_8"]
    # Both lengths are one run, extended.
    assert sorted(os.listdir(tmp_path / "runs")) == ["scd"]
    # The teacher's compute is that of the checkpoint distilled, not the config's teacher.steps.
    teacher_step = runner.teacher_row(results)["checkpoint_step"]
    assert results["teacher_steps"] == teacher_step
    longer = dict(results, teachers={"base": dict(rows=[
        dict(r, checkpoint_step=5 * teacher_step) for r in results["teachers"]["base"]["rows"]])})
    assert compute.teacher_steps(longer, load_experiment("digits", "variant=tiny")) == 5 * teacher_step


@pytest.mark.slow
def test_teacher_length_extends_its_own_teacher_and_scores_each_length(tmp_path):
    """The study trains the teacher itself (no study teacher is trained or borrowed), one run
    extended in order, each length scored from its own checkpoint."""
    results = runner.run_study(teacher_length.STUDY, workdir=str(tmp_path), size="tiny",
                               overrides=("eval.teacher_steps=2",), log=lambda m: None)
    assert set(results["runs"]) == {"teacher_4", "teacher_8"} and results["teachers"] == {}
    for entry in results["runs"].values():
        _scored(entry, nfes=(3,))
        assert {r["checkpoint_step"] for r in entry["rows"]} == {entry["steps"]}
    assert sorted(os.listdir(tmp_path / "runs")) == ["teacher"]
    assert not (tmp_path / "teachers").exists()
    pts = teacher_length.curve(results, 3)
    assert [p[0] for p in pts] == [4, 8] and pts[0][1]["fd"] != pts[1][1]["fd"]
    assert (tmp_path / "teacher_length.png").stat().st_size > 5000


def test_stabilizer_runs_train_for_the_experiments_length():
    """Past the dip: every full-size run trains its stage's configured steps (digits: sCT 1600,
    sCD 2500), and the command line's `--config.<stage>.steps` sets them."""
    config = runner.load_config("experiments/digits.py", "full")
    runs = stabilizers.runs("full", config)
    assert len(runs) == 2 * len(stabilizers.VARIANTS)
    for run in runs:
        assert run.overrides[0] == f"{run.stage}.steps={int(config[run.stage].steps)}", run
    assert {r.overrides[0] for r in runs} == {"sct.steps=1600", "scd.steps=2500"}
    short = runner.load_config("experiments/digits.py", "full", ("sct.steps=400", "scd.steps=400"))
    assert {r.overrides[0] for r in stabilizers.runs("full", short)} == {"sct.steps=400",
                                                                       "scd.steps=400"}


def _fake_entry(stage, fds_by_nfe, status="done"):
    """A finished run's entry with one seed per column of fds_by_nfe ({nfe: [fd per seed]})."""
    def rows(k):
        return [dict(id=f"{stage}_{nfe}", nfe=nfe, guidance=1.0, fd=float(v[k]))
                for nfe, v in fds_by_nfe.items()]
    n = len(next(iter(fds_by_nfe.values())))
    return dict(stage=stage, group=stage, status=status, rows=rows(0) if status == "done" else [],
                seeds={str(k): dict(status="done", rows=rows(k)) for k in range(1, n)})


def test_stabilizers_table_marks_only_differences_beyond_the_spread():
    rng = np.random.default_rng()
    base = rng.uniform(1.5, 3.0, size=(2, 3))          # nfe x seed around a random mean
    spread = base.std(axis=1, ddof=1).max()
    far = base + 5.0 * (spread + 0.1)                  # clearly worse
    near = base + rng.uniform(-0.2, 0.2) * spread      # inside the spread
    results = dict(runs=dict(
        sct_baseline=_fake_entry("sct", {1: base[0], 2: base[1]}),
        sct_no_warmup=_fake_entry("sct", {1: far[0], 2: near[1]}),
        scd_baseline=_fake_entry("scd", {1: base[0], 2: base[1]}),
        scd_no_warmup=_fake_entry("scd", {1: base[0] - 5.0 * (spread + 0.1), 2: base[1]}),
        scd_fp16_jvp=_fake_entry("scd", {1: base[0]}, status="diverged")))
    lines = stabilizers.table(results).splitlines()
    assert lines[0].startswith("| variant (3 seeds) |")
    by_label = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert set(by_label) == {"all stabilizers", "no tangent warm-up", "float16 JVP, rearranged"}
    sct1, sct2, scd1, scd2 = (c.strip(" |") for c in by_label["no tangent warm-up"])
    assert sct1.endswith("(worse)") and sct1.startswith(f"{far[0].mean():.3f} ± ")
    assert "(" not in sct2 and scd1.endswith("(better)") and "(" not in scd2
    assert [c.strip(" |") for c in by_label["float16 JVP, rearranged"]] == [
        "-", "-", "diverged", "diverged"]
    assert not any("(" in c for c in by_label["all stabilizers"])


@pytest.mark.slow
def test_stabilizers_each_switch_trains_or_is_reported_diverged(tmp_path, teacher_workdir,
                                                                  monkeypatch):
    # Beside the tiny size's one switch, a diverging run (a huge learning rate trips the
    # non-finite guard) is recorded and the study goes on.
    original = stabilizers.runs

    def with_a_diverging_one(size, config):
        out = original(size, config)
        return out + [runner.Run("sct_lr_huge", "sct", ("sct.optimizer.lr=1e6",
                                                        "sct.nonfinite.max_consecutive=1"),
                                 label="sCT: lr 1e6", group="sct")]

    monkeypatch.setattr(stabilizers.STUDY, "runs", with_a_diverging_one)
    results, _ = _run(stabilizers, tmp_path, teacher_workdir)
    assert set(results["runs"]) == {"sct_adagn", "sct_lr_huge"}
    _scored(results["runs"]["sct_adagn"])
    assert results["teachers"]["adagn"]["overrides"] == ["model.modulation=adagn"]
    assert results["runs"]["sct_adagn"]["teacher"] == "adagn"
    huge = results["runs"]["sct_lr_huge"]
    assert huge["status"] == "diverged" and "non-finite" in huge["message"] and not huge["rows"]
    assert (tmp_path / "stabilizers.md").read_text() == stabilizers.table(results) + "\n"


@pytest.mark.slow
def test_robustness_retrains_the_teacher_and_the_student_with_other_seeds(tmp_path,
                                                                          teacher_workdir):
    results, _ = _run(robustness, tmp_path, teacher_workdir)
    assert set(results["runs"]) == {"sct_t0_s0", "sct_t0_s1", "sct_t1_s0"}
    for entry in results["runs"].values():
        _scored(entry)
    assert results["teachers"]["seed1"]["overrides"] == ["seed=1"]
    assert results["runs"]["sct_t1_s0"]["teacher"] == "seed1"
    # Another seed is another run (the seed reaches the student's training), and each ratio
    # is to the run's own teacher.
    fd = {rid: runner.best_row(e, 2)["fd"] for rid, e in results["runs"].items()}
    assert fd["sct_t0_s1"] != fd["sct_t0_s0"] and fd["sct_t1_s0"] != fd["sct_t0_s0"]
    table = {rid: (teacher, ratio) for rid, _, teacher, _, _, ratio in robustness.ratios(results)}
    t1 = runner.teacher_row(results, "seed1")["fd"]
    assert table["sct_t1_s0"] == ("seed1", pytest.approx(fd["sct_t1_s0"] / t1))
    assert runner.teacher_row(results)["fd"] != t1


@pytest.mark.slow
def test_posthoc_scores_the_teacher_and_the_student_at_every_sigma_rel(tmp_path, teacher_workdir):
    results, _ = _run(posthoc, tmp_path, teacher_workdir)
    _scored(results["runs"]["scd"])
    for stage, nfes in (("teacher", [3]), ("scd", [1, 2])):
        scored = results["posthoc"][stage]
        assert sorted(scored) == sorted(f"{s:g}" for s in posthoc.TINY_SIGMA_RELS)
        for entry in scored.values():
            assert sorted(r["nfe"] for r in entry["rows"]) == nfes
            assert all(r["fd"] > 0 for r in entry["rows"]) and entry["profile_error"] >= 0
    assert posthoc.best(results, "scd", 2)[0] in posthoc.TINY_SIGMA_RELS
    # A re-run scores nothing again.
    again, lines = _run(posthoc, tmp_path, teacher_workdir)
    assert again["posthoc"] == results["posthoc"]
    assert not any("EMA 0.05:" in line for line in lines)


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    def error_of(argv):
        assert runner.main(compute.STUDY, argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert "wordir" in error_of([f"--wordir={tmp_path}"])
    assert "--workdir" in error_of([])
    assert "size" in error_of([f"--workdir={tmp_path}", "--size=huge"])
    assert "nowhere" in error_of([f"--workdir={tmp_path}", "--size=tiny",
                                  f"--teacher_workdir={tmp_path / 'nowhere'}"])
    assert runner.main(compute.STUDY, ["--help"]) == 0
    listed = capsys.readouterr().out
    for flag in ("--workdir", "--size", "--teacher_workdir", "--only", "--seeds", "--config"):
        assert f"\n  {flag}:" in listed
    with pytest.raises(Exception, match="unknown runs"):
        runner.run_study(compute.STUDY, workdir=str(tmp_path), size="tiny", only="scd_9")
