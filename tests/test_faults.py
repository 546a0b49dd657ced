"""Fault injection: each fault ends in a bit-exact resume or a one-line error naming its cause,
with no checkpoint lost or poisoned (docs/running.md's "What survives what" table).

Faults: a learning rate that produces NaN; a teacher with non-finite parameters; flipped bytes,
a truncated file, a deleted file and garbage metadata in the latest checkpoint (and in every
one); a second run in the same stage directory, and a stale lock; a storage layer that fails on
write; steps=0 and an evaluation with nothing to evaluate. (kill -9 during a save and SIGTERM
are in test_preemption.py.)
"""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from scm_jax import checkpoint as ckpt
from scm_jax import stage_identity
from scm_jax import tree_checks
from scm_jax import main as entry
from scm_jax import objectives, train
from scm_jax.errors import ConfigError, MissingInputError
from scm_jax.run_lock import LOCK_FILE, StageLockedError
from tests.helpers import REPO, load_experiment

BASE = ["teacher.log_every=1", "teacher.sample_every=-1", "mesh.data=1"]


def _config(*overrides):
    return load_experiment("digits", "variant=tiny", BASE + list(overrides))


def _quiet(msg):
    pass


def _leaves(state):
    return jax.tree.leaves(jax.device_get(state))


def _assert_finite_checkpoints(directory, config):
    abstract, _ = objectives.build(config, "teacher").abstract_state((8, 8, 1))
    store = ckpt.CheckpointStore(directory)
    for step in store.manager.all_steps():
        state, _ = store.restore(abstract, step)
        assert tree_checks.all_finite(state), step
    store.close()


@pytest.mark.slow
def test_a_diverging_learning_rate_stops_at_the_last_finite_state(tmp_path):
    config = _config("teacher.steps=20", "teacher.checkpoint_every=2", "teacher.optimizer.lr=1e6",
                     "teacher.nonfinite.max_consecutive=3", "teacher.keep_checkpoints=20")
    lines = []
    with pytest.raises(train.TrainingDiverged, match=r"stage teacher: 3 consecutive steps up to "
                                                     r"step \d+ had a non-finite"):
        train.train_stage(config, "teacher", str(tmp_path), log=lines.append)
    assert any("its update was not applied" in line for line in lines)
    _assert_finite_checkpoints(tmp_path / "teacher", config)
    rows = [json.loads(r) for r in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("NaN" not in json.dumps(r) for r in rows)   # strict JSON
    assert rows[-1]["skipped_steps"] >= 2
    # Without skipping, the non-finite state is never saved either.
    unguarded = _config("teacher.steps=20", "teacher.checkpoint_every=2", "teacher.optimizer.lr=1e6",
                        "teacher.nonfinite.skip=False", "teacher.nonfinite.max_consecutive=100")
    with pytest.raises(train.TrainingDiverged, match="not finite, so it was not saved"):
        train.train_stage(unguarded, "teacher", str(tmp_path / "unguarded"), log=_quiet)
    _assert_finite_checkpoints(tmp_path / "unguarded" / "teacher", unguarded)


def test_a_student_refuses_a_non_finite_teacher(tmp_path):
    config = _config("teacher.steps=2", "teacher.checkpoint_every=2")
    teacher = objectives.build(config, "teacher")
    state = teacher.init_state(jax.random.PRNGKey(0), (8, 8, 1))
    poisoned = jax.tree.map(lambda a: a * np.nan if a.dtype == np.float32 else a, state)
    store = ckpt.CheckpointStore(tmp_path / "teacher", async_save=False)
    store.save(2, poisoned, {"step": 2})
    store.close()
    stage_identity.write_record(tmp_path / "teacher", stage_identity.stage_record(config, teacher))
    with pytest.raises(ckpt.CheckpointMismatchError, match="holds non-finite values"):
        train.train_stage(config, "scd", str(tmp_path), log=_quiet)
    assert not (tmp_path / "scd").exists()


def _data_files(step_dir):
    """The files holding the arrays' bytes (tensorstore's OCDBT data files)."""
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and "ocdbt.process_" in str(p)
                  and p.parent.name == "d")


def _flip(step_dir):
    """64 random bytes in the middle of each data file, as a failing disk or copy would."""
    for path in _data_files(step_dir):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = os.urandom(64)
        path.write_bytes(bytes(data))


def _truncate(step_dir):
    for path in _data_files(step_dir):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _delete(step_dir):
    for path in _data_files(step_dir):
        path.unlink()


def _garbage_metadata(step_dir):
    for path in step_dir.rglob("_METADATA"):
        path.write_text("{not json")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 8-step run that every recovered run must equal bit for bit."""
    config = _config("teacher.steps=8", "teacher.checkpoint_every=2", "teacher.keep_checkpoints=4")
    return train.train_stage(config, "teacher", str(tmp_path_factory.mktemp("straight")),
                             log=_quiet)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [_flip, _truncate, _delete, _garbage_metadata])
def test_a_corrupt_latest_checkpoint_is_named_and_the_previous_one_resumes(fault, straight,
                                                                         tmp_path):
    six = _config("teacher.steps=6", "teacher.checkpoint_every=2", "teacher.keep_checkpoints=4")
    train.train_stage(six, "teacher", str(tmp_path), log=_quiet)
    fault(tmp_path / "teacher" / "checkpoints" / "6")
    eight = _config("teacher.steps=8", "teacher.checkpoint_every=2", "teacher.keep_checkpoints=4")
    lines = []
    resumed = train.train_stage(eight, "teacher", str(tmp_path), log=lines.append)
    warning = next(line for line in lines if line.startswith("warning: "))
    assert "checkpoints/6" in warning and "trying the previous checkpoint" in warning
    assert any("resumed from step 4" in line for line in lines)
    assert any(p.name.startswith("corrupt-6-")
               for p in (tmp_path / "teacher" / "checkpoints").iterdir())   # kept, set aside
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    config = _config("teacher.steps=4", "teacher.checkpoint_every=2", "teacher.keep_checkpoints=4")
    train.train_stage(config, "teacher", str(tmp_path), log=_quiet)
    for step in ("2", "4"):
        _flip(tmp_path / "teacher" / "checkpoints" / step)
    config.teacher.steps = 6
    with pytest.raises(ckpt.CorruptCheckpointError, match="no intact checkpoint in"):
        train.train_stage(config, "teacher", str(tmp_path), log=_quiet)


@pytest.mark.slow   # a subprocess
def test_a_second_run_in_the_same_stage_directory_is_refused(tmp_path):
    script = ("import sys; from tests.helpers import load_experiment; from scm_jax import train; "
              "train.train_stage(load_experiment('digits', 'variant=tiny', ['teacher.steps=100000',"
              " 'teacher.sample_every=-1', 'mesh.data=1']), 'teacher', sys.argv[1], log=print)")
    first = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "teacher" / LOCK_FILE
    try:
        deadline = time.time() + 300
        while not lock.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert lock.exists()
        holder = json.loads(lock.read_text())
        with pytest.raises(StageLockedError, match=f"pid {first.pid}") as refused:
            train.train_stage(_config("teacher.steps=4"), "teacher", str(tmp_path), log=_quiet)
        assert holder["host"] in str(refused.value)
    finally:
        first.kill()
        first.wait()
    # Its holder is dead now (kill -9 leaves the file): the next run takes the lock over.
    assert lock.exists()
    lines = []
    train.train_stage(_config("teacher.steps=4"), "teacher", str(tmp_path), log=lines.append)
    assert any("taking over" in line and str(first.pid) in line for line in lines)
    assert not lock.exists()   # released at the end


def test_a_failing_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full(self):
        path = self._final_path
        step = path.name if path.name.isdigit() else path.parent.name.split(".")[0]
        if step != "2":
            raise OSError(28, "No space left on device")
        return await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    config = _config("teacher.steps=8", "teacher.checkpoint_every=2")
    with pytest.raises(ckpt.CheckpointSaveError, match="No space left on device") as failed:
        train.train_stage(config, "teacher", str(tmp_path), log=_quiet)
    assert "the previous checkpoint (2) is intact" in str(failed.value)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    store = ckpt.CheckpointStore(tmp_path / "teacher")
    assert store.latest_step() == 2
    store.close()
    resumed = train.train_stage(config, "teacher", str(tmp_path), log=_quiet)
    assert int(resumed.step) == 8


def test_success_that_did_nothing_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.steps = 0 is invalid"):
        entry.run(_config("teacher.steps=0"), str(tmp_path), log=_quiet)
    eval_only = _config("stage=eval")
    with pytest.raises(MissingInputError, match="nothing to evaluate"):
        entry.run(eval_only, str(tmp_path), log=_quiet)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow   # a subprocess
def test_divergence_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scm_jax.main", "--config=experiments/digits.py:variant=tiny,stage=teacher",
         f"--workdir={tmp_path}", "--config.teacher.optimizer.lr=1e6", "--config.teacher.steps=20",
         "--config.teacher.nonfinite.max_consecutive=2", "--config.mesh.data=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "stage teacher: 2 consecutive steps up to step" in errors[0]
    assert "the last finite checkpoint is step" in errors[0] and "Traceback" not in proc.stderr
    assert "its update was not applied" in proc.stdout
