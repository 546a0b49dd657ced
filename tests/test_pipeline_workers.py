"""`stage=all` with config.pipeline_workers: which stages wait for which, stages side by side,
a failure or a signal stopping the others, and side-by-side stages training exactly what they
train in order."""
import json
import threading

import pytest

from scm_jax import checkpoint as ckpt
from scm_jax import main as entry
from scm_jax import pipeline, preemption
from scm_jax.errors import ConfigError
from tests.helpers import load_experiment

ORDER = ("teacher", "scd", "sct", "dscd", "vsd", "scd_vsd", "eval")


def _config(workers, **extra):
    config = load_experiment("digits", "variant=tiny", [f"pipeline_workers={workers}"])
    for key, value in extra.items():
        config[key] = value
    return config


def test_every_stage_waits_for_the_stages_it_reads():
    config = _config(2)
    assert pipeline.needs(config, "teacher", ORDER) == set()
    for cm in ("scd", "sct", "dscd", "vsd", "scd_vsd"):
        assert pipeline.needs(config, cm, ORDER) == {"teacher"}
    assert pipeline.needs(config, "eval", ORDER) == set(ORDER[:-1])
    # A stage not in this pipeline is not waited for (its checkpoints are read as they are).
    assert pipeline.needs(config, "scd", ("scd", "eval")) == set()


def _recording(events, lock, hold=None):
    def train_one(name):
        with lock:
            events.append(("start", name))
        if hold is not None and name in hold:
            hold[name].wait(timeout=60)
        with lock:
            events.append(("end", name))
    return train_one


def test_two_workers_run_the_consistency_stages_side_by_side_and_evaluate_last():
    events, lock = [], threading.Lock()
    barrier = threading.Barrier(2, timeout=60)   # both must be running at once to pass

    def train_one(name):
        with lock:
            events.append(("start", name))
        if name in ("scd", "sct"):
            barrier.wait()
        with lock:
            events.append(("end", name))

    lines = []
    pipeline.run(_config(2), ORDER, train_one, lambda: events.append(("eval", "eval")),
                 log=lines.append)
    assert lines[:3] == ["=== stage teacher ===", "=== stage scd ===",
                         "=== stage sct === (beside scd)"], lines
    starts = [n for kind, n in events if kind == "start"]
    assert starts[0] == "teacher" and set(starts[1:]) == set(ORDER[1:-1])
    assert events.index(("end", "teacher")) < events.index(("start", "scd"))
    assert events[-1] == ("eval", "eval") and len(events) == 2 * 6 + 1


def test_one_worker_runs_the_pipeline_in_order():
    events, lock = [], threading.Lock()
    pipeline.run(_config(1), ORDER, _recording(events, lock), lambda: events.append(("eval", "")),
                 log=lambda m: None)
    assert [n for kind, n in events if kind == "start"] == list(ORDER[:-1])
    assert all(events[2 * i][1] == events[2 * i + 1][1] for i in range(6))


def test_a_failing_stage_stops_the_one_beside_it_and_is_raised():
    stopped = []

    def train_one(name):
        if name == "sct":
            raise ValueError("sct broke")
        if name == "scd":   # trains until asked to stop, as the loop does with its checkpoint
            for _ in range(600):
                if preemption.stop_requested():
                    stopped.append(name)
                    raise preemption.StageInterrupted(15, name, 3, "/tmp/x")
                threading.Event().wait(0.1)
        return None

    ran = []
    with pytest.raises(ValueError, match="sct broke"):
        pipeline.run(_config(2), ORDER, lambda n: (ran.append(n), train_one(n))[1],
                     lambda: ran.append("eval"), log=lambda m: None)
    assert stopped == ["scd"] and "eval" not in ran and "dscd" not in ran
    assert not preemption.stop_requested()   # cleared for the next run in this process


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_pipeline_workers_is_a_config_error(bad):
    config = _config(1)
    config.pipeline_workers = bad
    with pytest.raises(ConfigError, match=f"pipeline_workers = {bad} is invalid"):
        entry.run(config, "/nonexistent/never-written")
    with pytest.raises(ConfigError, match="pipeline_workers"):
        load_experiment("digits", "variant=tiny", ["pipeline_workers=two"])


def _fingerprints(workdir, stage) -> dict:
    """Every saved array's fingerprint (checkpoint.py) in the stage's latest checkpoint."""
    store = ckpt.CheckpointStore(str(workdir / stage))
    step = store.latest_step()
    store.close()
    path = workdir / stage / "checkpoints" / str(step) / "integrity" / "metadata"
    return json.loads(path.read_text())["arrays"]


@pytest.mark.slow
def test_side_by_side_stages_train_what_they_train_in_order(tmp_path):
    steps = {f"{s}.steps": 3 for s in ("teacher", "scd", "sct")}
    overrides = [f"{k}={v}" for k, v in steps.items()] + [
        "mesh.data=1", "pipeline=teacher,scd,sct"] + [
        f"{s}.sample_every=-1" for s in ("teacher", "scd", "sct")]
    quiet = lambda m: None   # noqa: E731
    apart = load_experiment("digits", "variant=tiny", overrides + ["pipeline_workers=1"])
    together = load_experiment("digits", "variant=tiny", overrides + ["pipeline_workers=2"])
    entry.run(apart, str(tmp_path / "apart"), log=quiet)
    entry.run(together, str(tmp_path / "together"), log=quiet)
    for stage in ("teacher", "scd", "sct"):
        a = _fingerprints(tmp_path / "apart", stage)
        assert len(a) > 100 and a == _fingerprints(tmp_path / "together", stage), stage


def test_a_multi_process_run_trains_its_stages_in_order(monkeypatch):
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    lines = []
    assert pipeline.workers(_config(2), lines.append) == 1
    assert lines and "2 processes train the stages in order" in lines[0]
    assert pipeline.workers(_config(1), lines.append) == 1 and len(lines) == 1
