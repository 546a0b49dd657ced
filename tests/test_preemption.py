"""Preemption: SIGTERM (or SIGINT) stops training at a step every process agrees on, after a
checkpoint there, with exit status 143 (130); re-running resumes to the uninterrupted result
bit for bit. kill -9 in the middle of an asynchronous save leaves the previous checkpoint
restorable. (The two-process case is in test_multiprocess.py.)"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from scm_jax import checkpoint as ckpt
from scm_jax import objectives, train
from scm_jax.preemption import StageInterrupted
from tests.helpers import REPO, load_experiment

STEPS = ["teacher.steps=8", "teacher.log_every=1", "teacher.checkpoint_every=100",
         "teacher.sample_every=-1", "mesh.data=1"]


def _leaves(state):
    return jax.tree.leaves(jax.device_get(state))


@pytest.mark.slow
def test_sigterm_saves_the_agreed_step_and_resumes_bit_exactly(tmp_path, monkeypatch):
    config = load_experiment("digits", "variant=tiny", STEPS)
    straight = train.train_stage(config, "teacher", str(tmp_path / "straight"), log=lambda m: None)

    write = train.MetricLogger.write

    def preempt_at_step_3(self, step, metrics, **kw):
        write(self, step, metrics, **kw)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # a real signal, to this process

    monkeypatch.setattr(train.MetricLogger, "write", preempt_at_step_3)
    with pytest.raises(StageInterrupted) as stop:
        train.train_stage(config, "teacher", str(tmp_path / "cut"), log=lambda m: None)
    monkeypatch.setattr(train.MetricLogger, "write", write)
    # The flag is read one step late: the stop comes after the step that follows the signal.
    assert stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143
    assert stop.value.step == 5
    assert ckpt.CheckpointStore(tmp_path / "cut" / "teacher").latest_step() == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is gone again
    lines = []
    resumed = train.train_stage(config, "teacher", str(tmp_path / "cut"), log=lines.append)
    assert any("resumed from step 5" in line for line in lines)
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)


SLOW_SAVE = """
import asyncio, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def slow(self):
    path = self._final_path     # a step's directory, or an item's inside the step's temporary one
    step = path.name if path.name.isdigit() else path.parent.name.split(".")[0]
    if step != "2":             # the first checkpoint commits; the next one hangs
        open(sys.argv[2], "w").write(step)
        await asyncio.sleep(600)
    return await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = slow
from tests.helpers import load_experiment
from scm_jax import train
config = load_experiment("digits", "variant=tiny", ["teacher.steps=8", "teacher.checkpoint_every=2",
                                                    "teacher.sample_every=-1", "mesh.data=1"])
train.train_stage(config, "teacher", sys.argv[1], log=print)
"""


@pytest.mark.slow   # a subprocess
def test_kill_9_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
    workdir, marker = tmp_path / "wd", tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(workdir), str(marker)],
                            cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.stderr.read().decode()[-2000:]
    proc.kill()   # SIGKILL while step 4's checkpoint is being written
    proc.wait()
    root = workdir / "teacher" / "checkpoints"
    assert any(".orbax-checkpoint-tmp" in p.name for p in root.iterdir())   # the half save
    store = ckpt.CheckpointStore(workdir / "teacher")
    assert store.latest_step() == 2
    config = load_experiment("digits", "variant=tiny", STEPS)
    abstract, _ = objectives.build(config, "teacher").abstract_state((8, 8, 1))
    state, data_state = store.restore(abstract)
    store.close()
    assert int(state.step) == 2 and data_state == {"step": 2}
    lines = []
    resumed = train.train_stage(config, "teacher", str(workdir), log=lines.append)
    assert int(resumed.step) == 8 and any("resumed from step 2" in line for line in lines)
