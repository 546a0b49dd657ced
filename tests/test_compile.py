"""The compile check: the real train step of a stage, built as train.py builds it, compiled by
the TPU compiler for a v5p slice on this CPU host (libtpu), with per-chip memory, FLOPs and the
compiler's time estimate; the fused attention kernel follows the mesh's platform (TPU), not the
host's (CPU)."""
import json
import os
import subprocess
import sys

import pytest

from scm_jax import compile as cc
from scm_jax import sharding
from scm_jax.errors import ConfigError
from tests.helpers import REPO, load_experiment

pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu (the [test] extra)")


def test_topology_names():
    v5p = cc.parse_topology("v5p-128")
    assert (v5p.chips, v5p.name, v5p.host_bounds) == (64, "v5p:4x4x4", (2, 2, 1))
    assert cc.parse_topology("v5p-32").name == "v5p:2x2x4"
    assert cc.parse_topology("v6e-32").name == "v6e:4x8"
    assert cc.parse_topology("v5litepod-16").name == "v5e:4x4"
    assert cc.parse_topology("v5e-8").host_bounds == (2, 4, 1)
    for bad in ("v5x-8", "v5p-6", "v5p-2", "v6e-3", "tpu"):
        with pytest.raises(ConfigError, match="topology"):
            cc.parse_topology(bad)


@pytest.fixture(scope="module")
def v5p8():
    topology = cc.parse_topology("v5p-8")
    return topology, cc.topology_devices(topology)


@pytest.fixture(scope="module")
def in512_reports(v5p8):
    """The paper's stages of the guided ImageNet 512 runlocal preset (EDM2 U-Net with attention;
    the dsCD baseline's step is built by the same code and compiled on CPU in tests/test_train.py)."""
    config = load_experiment("imagenet512", "variant=runlocal")
    mesh = sharding.make_mesh(config.mesh, v5p8[1])
    return {name: cc.compile_stage(config, name, mesh) for name in ("teacher", "sct", "scd")}


@pytest.mark.parametrize("name", ["teacher", "sct", "scd"])
def test_every_stage_compiles_for_v5p_with_the_tpu_kernel(in512_reports, v5p8, name):
    r = in512_reports[name]
    assert 0 < r["peak_bytes"] < v5p8[0].chip.hbm_bytes and r["flops"] > 0 and r["seconds"] > 0
    assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
    # 'auto' resolves for the TPU mesh (the host itself is a CPU), and the Mosaic kernel is in
    # the sCM steps' tangent pass only (the teacher and dsCD take no JVP).
    assert r["attention_impl"] == "pallas:mosaic_tpu"
    hlo = r["lowered"].as_text(debug_info=True)
    assert ("attention_jvp_mosaic" in hlo) == (name in ("sct", "scd")), name
    teacher = in512_reports["teacher"]
    ratio = r["flops"] / teacher["flops"]
    # FLOP bounds: sCT ~ 4/3 (the JVP's primal shared with the gradient pass's forward, the
    # kernel's attention on top), guided sCD ~ 2 (two teacher forwards).
    bounds = dict(teacher=(1.0, 1.0), sct=(1.2, 1.6), scd=(1.7, 2.5))[name]
    assert bounds[0] <= round(ratio, 6) <= bounds[1], (name, ratio)


def test_the_command_reports_fit_speed_and_mfu_as_json(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "scm_jax.compile",
           "--config=experiments/imagenet512.py:variant=runlocal,backbone=dit,stage=scd",
           "--topology=v5p-8", f"--json={out}", "--config.mesh.fsdp=2", "--config.model.remat=block"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("topology", "chips", "hbm_bytes_per_chip", "peak_bytes_per_chip", "fits",
                "flops_per_step", "step_seconds", "mfu", "teacher_step_seconds",
                "teacher_peak_bytes_per_chip", "mesh", "remat", "estimate_above_peak"):
        assert key in report, key
    assert report["chips"] == 4 and report["fits"] and report["mesh"] == {"data": 2, "fsdp": 2}
    assert report["remat"] == "block" and 0 < report["mfu"] < 1
    assert report["step_seconds_vs_teacher"] > 1 and "DOES NOT FIT" not in proc.stdout
    assert "MFU" in proc.stdout and "upper bound" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--topology=v5x-8"], "unknown --topology 'v5x-8'"),
    (["--topology=v5p-8", "--config.mesh.fsdp=3"], "config.mesh.fsdp = 3"),
    (["--topology=v5p-8", "--config.scd.batch_size=6"], "scd.batch_size = 6"),
])
def test_bad_topologies_meshes_and_batches_are_one_line_errors(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "scm_jax.compile",
         "--config=experiments/imagenet512.py:variant=runlocal,backbone=dit,stage=scd", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
