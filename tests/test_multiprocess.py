"""Two real processes (jax.distributed on 127.0.0.1, 4 CPU devices each, gloo collectives) run
the digits teacher and sCD stages through the command line, as workers of a pod would: one
metrics.jsonl with each step once, one grid per stage, only process 0 printing, and
checkpoints that a 1-process run reads, resumes and matches."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from scm_jax import checkpoint as ckpt
from scm_jax import train
from tests.helpers import REPO, load_experiment

# Full tangent from step 0, and Adam eps that keep gradients at rounding level (the reduction
# order differs between 2 processes and 1) from becoming lr-sized sign flips.
OVERRIDES = ["--config.pipeline=teacher,scd", "--config.scd.loss.warmup_steps=0",
             "--config.teacher.optimizer.eps=0.001", "--config.scd.optimizer.eps=0.001"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "scm_jax.main", "--config=experiments/digits.py:variant=tiny",
         f"--workdir={workdir}", *OVERRIDES, "--distributed",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return workdir, [out for out, _ in outputs]


def test_two_processes_write_one_set_of_side_files(two_process_run):
    workdir, stdouts = two_process_run
    assert "[teacher] step 4/4" in stdouts[0] and "=== stage scd ===" in stdouts[0]
    # Only process 0 prints (gloo's own connection lines aside).
    assert not [line for line in stdouts[1].splitlines() if not line.startswith("[Gloo]")]
    for stage in ("teacher", "scd"):
        rows = [json.loads(r) for r in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4]
        names = sorted(os.listdir(workdir / stage))
        assert [n for n in names if n.endswith(".png")] == ["samples_0000004.png"]
        assert not [n for n in names if ".tmp" in n], names
        assert json.loads((workdir / stage / "config.json").read_text())["identity"]


def test_a_one_process_run_reads_and_resumes_the_two_process_checkpoints(two_process_run,
                                                                         tmp_path):
    workdir, _ = two_process_run
    config = load_experiment("digits", "variant=tiny",
                             [o[len("--config."):] for o in OVERRIDES])
    # The same pipeline in this process over its 8 devices: the same global batches and mesh.
    single = {name: train.train_stage(config, name, str(tmp_path), log=lambda m: None)
              for name in ("teacher", "scd")}
    for name in ("teacher", "scd"):
        ema, step = ckpt.restore_stage_ema(config, name, str(workdir))
        assert step == 4
        for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(single[name].nets["net"].ema)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    # ...and continues the two-process run from its last step and data position.
    config.scd.steps = 6
    lines = []
    state = train.train_stage(config, "scd", str(workdir), log=lines.append)
    assert int(state.step) == 6 and any("resumed from step 4" in line for line in lines)
    rows = (workdir / "scd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [2, 4, 6]
