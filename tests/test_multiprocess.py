"""Two real processes (jax.distributed on 127.0.0.1, 4 CPU devices each, gloo collectives) run
the digits teacher and sCD stages through the command line, as workers of a pod would, each
process feeding its own rows: one metrics.jsonl with each step once, one grid per stage, only
process 0 printing, checkpoints that a 1-process run reads, resumes and matches; the teacher
with every convolution split 8 ways over both processes' devices (mesh.fsdp = 8), equal to one
process, and two processes resuming a 1-process checkpoint; and SIGTERM to both mid-run stops
them at one step, from which a re-run reaches the uninterrupted run's parameters bit for bit."""
import json
import os
import re
import signal

import jax
import numpy as np
import pytest

from scm_jax import checkpoint as ckpt
from scm_jax import objectives, stage_restore, train
from tests.helpers import (finish_processes, load_experiment, start_two_processes,
                           wait_for_output)

pytestmark = pytest.mark.slow   # the fast loop: -m 'not slow'

DIGITS = "experiments/digits.py:variant=tiny"
# Full tangent from step 0, and Adam eps that keep gradients at rounding level (the reduction
# order differs between 2 processes and 1) from becoming lr-sized sign flips.
OVERRIDES = ["--config.pipeline=teacher,scd,eval", "--config.eval.teacher_steps=2",
             "--config.scd.loss.warmup_steps=0",
             "--config.teacher.optimizer.eps=0.001", "--config.scd.optimizer.eps=0.001",
             "--config.teacher.steps=10", "--config.teacher.log_every=1"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes")
    outputs = finish_processes(start_two_processes(workdir, DIGITS, OVERRIDES))
    return workdir, [out for out, _ in outputs]


def test_two_processes_write_one_set_of_side_files(two_process_run):
    workdir, stdouts = two_process_run
    assert "[teacher] step 10/10" in stdouts[0] and "=== stage scd ===" in stdouts[0]
    # Only process 0 prints. Gloo's own connection lines aside: its threads write them
    # unsynchronized, so a line's trailing rank number can land on a line of its own.
    assert not [line for line in stdouts[1].splitlines()
                if "peer ranks" not in line and not line.strip().isdigit()]
    for stage, steps in (("teacher", list(range(1, 11))), ("scd", [2, 4])):
        rows = [json.loads(r) for r in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == steps
        names = sorted(os.listdir(workdir / stage))
        assert [n for n in names if n.endswith(".png")] == [f"samples_{steps[-1]:07d}.png"]
        assert not [n for n in names if ".tmp" in n], names
        assert json.loads((workdir / stage / "config.json").read_text())["identity"]


def test_a_one_process_run_reads_and_resumes_the_two_process_checkpoints(two_process_run,
                                                                         tmp_path):
    workdir, _ = two_process_run
    config = load_experiment("digits", "variant=tiny",
                             [o[len("--config."):] for o in OVERRIDES])
    # The same pipeline in this process over its 8 devices: the same global batches and mesh.
    single = {name: train.train_stage(config, name, str(tmp_path / "one"), log=lambda m: None)
              for name in ("teacher", "scd")}
    # One sample file per evaluated model row (the teacher at 3 NFE, sCD at 1 and 2).
    assert len(list((workdir / "samples").iterdir())) == 3
    for name in ("teacher", "scd"):
        ema, step = stage_restore.restore_stage_ema(config, name, str(workdir))
        assert step == config[name].steps
        for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(single[name].nets["net"].ema)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    # The evaluation, sampled on both processes' devices and gathered, scores alike.
    from scm_jax import evaluate

    ours = evaluate.evaluate_all(config, str(tmp_path / "one"), log=lambda m: None)
    theirs = json.loads((workdir / "results.json").read_text())
    assert [r["model"] for r in ours["rows"]] == [r["model"] for r in theirs["rows"]]
    for a, b in zip(ours["rows"], theirs["rows"]):
        np.testing.assert_allclose(a["fd"], b["fd"], rtol=1e-3)
    # ...and continues the two-process run (a copy) from its last step and data position.
    import shutil

    shutil.copytree(workdir, tmp_path / "copy")
    config.scd.steps = 6
    lines = []
    state = train.train_stage(config, "scd", str(tmp_path / "copy"), log=lines.append)
    assert int(state.step) == 6 and any("resumed from step 4" in line for line in lines)
    rows = (tmp_path / "copy" / "scd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [2, 4, 6]


def test_sigterm_stops_both_processes_at_one_step_and_the_rerun_matches(two_process_run,
                                                                        tmp_path):
    straight, _ = two_process_run
    # The teacher stage alone (the fixture ran it with the same settings, then sCD and eval).
    teacher_only = ["--config.pipeline=teacher"] + OVERRIDES[1:]
    procs = start_two_processes(tmp_path, DIGITS, overrides=teacher_only)
    wait_for_output(procs[0], "[teacher] step 3/10")    # process 0's progress
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs = finish_processes(procs, codes=(143, 143))
    stops = [re.search(r"stage teacher saved step (\d+)", err) for _, err in outputs]
    assert all(stops), [err[-2000:] for _, err in outputs]
    assert stops[0].group(1) == stops[1].group(1)   # every process stopped at the same step
    step = int(stops[0].group(1))
    assert 3 < step < 10 and ckpt.CheckpointStore(tmp_path / "teacher").latest_step() == step
    # The same command resumes and finishes.
    finish_processes(start_two_processes(tmp_path, DIGITS, overrides=teacher_only))
    config = load_experiment("digits", "variant=tiny", [o[len("--config."):] for o in OVERRIDES])
    abstract, _ = objectives.build(config, "teacher").abstract_state((8, 8, 1))
    a, b = (ckpt.CheckpointStore(d / "teacher").restore(abstract)[0] for d in (straight, tmp_path))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_fsdp_across_the_process_boundary_and_two_processes_resume_one(tmp_path):
    """The teacher with its convolutions split over 'fsdp' across both processes' devices (each
    process feeding its own rows) equals one process over 8 devices; two processes then resume
    the one-process checkpoint at its step and data position."""
    fsdp = ["--config.pipeline=teacher", "--config.mesh.fsdp=8", "--config.teacher.steps=2",
            "--config.teacher.log_every=1", "--config.teacher.sample_every=-1",
            "--config.teacher.optimizer.eps=0.001"]
    finish_processes(start_two_processes(tmp_path / "two", DIGITS, fsdp))
    config = load_experiment("digits", "variant=tiny", [o[len("--config."):] for o in fsdp])
    single = train.train_stage(config, "teacher", str(tmp_path / "one"), log=lambda m: None)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(single.nets["net"].params)}
    assert any("fsdp" in spec for spec in specs)   # the weights really are split
    ema, step = stage_restore.restore_stage_ema(config, "teacher", str(tmp_path / "two"))
    assert step == 2
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(single.nets["net"].ema)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    outputs = finish_processes(start_two_processes(tmp_path / "one", DIGITS,
                                                   fsdp + ["--config.teacher.steps=4"]))
    assert "resumed from step 2" in outputs[0][0]
    rows = (tmp_path / "one" / "teacher" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]

