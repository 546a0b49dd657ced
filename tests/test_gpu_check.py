"""benchmarks/gpu_check.py, the script prepared for a lent GPU, runs its whole plumbing on the
CPU with --dry (tiny sizes, the Triton kernel interpreted), and refuses to measure without a
GPU."""
import pytest
import json
import os
import subprocess
import sys

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


@pytest.mark.slow
def test_the_dry_run_writes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--dry", f"--out={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["dry"] and r["device"]["platform"] == "cpu"
    assert {(c["head_dim"], c["masked"]) for c in r["kernel_accuracy"]} == {
        (64, False), (128, False), (64, True), (72, True)}
    for case in r["kernel_accuracy"]:   # the interpreted kernel against the float32 reference
        assert case["max_err_out"] < 1e-4 and case["max_err_tangent"] < 1e-4, case
    assert [s["shape"][1] for s in r["kernel_speed"]] == [64, 128]
    for s in r["kernel_speed"]:
        assert s["fused"]["time_s"] > 0 and s["fused"]["tflops"] > 0 and s["speedup"] > 0, s
        assert s["memory_ratio"] > 0, s
    assert set(r["train_steps"]) == {"dit-s", "edm2-s"}
    for network, steps in r["train_steps"].items():
        stages = steps["stages"]
        assert set(stages) == {"teacher", "sct", "scd"}, network
        for name, s in stages.items():
            assert s["seconds"] > 0 and s["roofline_seconds"] > 0 and s["peak_bytes"] > 0, name
        assert 1.1 < stages["sct"]["flops_vs_teacher"] < 1.6 < stages["scd"]["flops_vs_teacher"]
    sampled = r["sampling"]
    assert set(sampled["samplers"]) >= {"1-step", "2-step", "teacher NFE 63"}
    assert sampled["one_step_vs_teacher"] > 1 and sampled["two_step_vs_teacher"] > 1
    assert "wrote" in proc.stdout and "measured / roofline" in proc.stdout


def test_an_unknown_network_is_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--dry", f"--out={tmp_path}",
                           "--networks=dit-s,unet9"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "unet9" in proc.stderr and "dit-s" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_without_a_gpu_it_says_so():
    proc = subprocess.run([sys.executable, SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and "no GPU here" in proc.stderr, proc.stderr[-2000:]
