"""The compile check for GPU nodes: the real train step of every stage of a paper preset with
attention, built as train.py builds it and compiled deviceless for H100s (sm_90) by JAX's CUDA
plugin on this CPU host: per-GPU memory against what JAX's allocator may use, FLOPs with the
kernels counted, the roofline time, the Triton attention-JVP kernel in the tangent pass and
cuDNN flash attention in the differentiated pass."""
import json
import os
import subprocess
import sys

import pytest

from scm_jax import compile as cc
from scm_jax import gpu_nodes
from scm_jax.errors import ConfigError
from tests.helpers import REPO, load_experiment

pytestmark = pytest.mark.slow   # the fast loop: -m 'not slow'


def test_gpu_topologies_through_the_compile_check():
    topology = cc.parse_topology("h200-8x2")
    assert topology.platform == "gpu" and (topology.chips, topology.num_slices) == (8, 2)
    assert cc.mesh_overrides([], topology) == (["mesh.data=2", "mesh.fsdp=8"],
                                               "auto: fsdp over each slice's chips, data over "
                                               "the slices")
    with pytest.raises(ConfigError, match="num_slices = 2"):
        cc.parse_topology("h100-8", num_slices=2)


def test_jaxs_allocator_fraction_is_what_fits(monkeypatch):
    topology = cc.parse_topology("h100-8")
    assert topology.available_bytes == int(0.75 * topology.chip.hbm_bytes)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
    assert topology.available_bytes == int(0.9 * topology.chip.hbm_bytes)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "2")
    with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='2'"):
        topology.available_bytes  # noqa: B018


@pytest.fixture(scope="module")
def gpu_reports():
    """The three stages of the guided ImageNet 512 DiT runlocal preset on 2 H100s."""
    pytest.importorskip("jax_cuda12_plugin", reason="the [test] extra installs JAX's CUDA plugin")
    topology = cc.parse_topology("h100-2")
    overrides, source = cc.mesh_overrides([], topology)
    config = load_experiment("imagenet512", "variant=runlocal,backbone=dit", overrides)
    return topology, {name: cc.check(config, name, topology, log=lambda m: None,
                                     mesh_source=source) for name in ("teacher", "sct", "scd")}


@pytest.mark.parametrize("name", ["teacher", "sct", "scd"])
def test_every_stage_compiles_for_h100_with_the_triton_kernel(gpu_reports, name):
    topology, reports = gpu_reports
    r = reports[name]
    assert r["platform"] == "gpu" and r["chips"] == 2 and r["mesh"] == {"data": 1, "fsdp": 2}
    assert r["fits"] and r["fit_source"] == "compiled"
    assert r["available_bytes_per_chip"] == topology.available_bytes
    assert 0 < r["peak_bytes_per_chip"] < topology.available_bytes
    # 'auto' resolves for the GPU mesh (the host itself is a CPU): the Triton kernel.
    assert r["attention_impl"] == "pallas:triton"
    kernels = r["kernel_flops_per_chip"]
    assert ("triton attention jvp" in kernels) == (name in ("sct", "scd")), kernels
    assert not r["uncounted_kernels"], r["uncounted_kernels"]
    assert r["flops_per_step"] > 0 and r["step_seconds"] >= r["compute_seconds"] > 0
    assert r["step_seconds"] >= r["flops_per_step"] / topology.chip.peak_bf16_flops
    assert "roofline" in r["time_source"] and 0 < r["mfu"] < 1
    teacher = reports["teacher"]
    ratio = r["flops_per_step"] / teacher["flops_per_step"]
    bound = {"teacher": 1.0, "sct": 4 / 3, "scd": 2.0}[name]   # sCM's bounds (App. F, guided)
    assert ratio == pytest.approx(bound, rel=0.15), (name, ratio)


def test_the_gpu_command_writes_the_json(tmp_path):
    out = tmp_path / "h100.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scm_jax.compile", f"--json={out}", "--topology=h100-8",
         "--config=experiments/imagenet512.py:variant=runlocal,backbone=dit,stage=scd"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        # The command picks the CPU itself on a host without a GPU (no JAX_PLATFORMS given).
        env={**{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
             "SCM_JAX_COMPILE_CACHE": "0"})
    if "JAX's CUDA plugin" in proc.stderr:
        pytest.skip("JAX's CUDA plugin is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["topology"] == "h100-8" and r["fits"] and r["attention_impl"] == "pallas:triton"
    assert r["peak_bytes_per_chip"] > 0 and r["flops_per_step"] > 0
    assert "roofline" in proc.stdout and "triton attention jvp" in proc.stdout
    assert "cuInit" not in proc.stderr


def test_without_the_plugin_the_error_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_plugin(name, *args, **kwargs):
        if name == "jax_cuda12_plugin":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    from scm_jax.errors import MissingInputError

    monkeypatch.setattr(builtins, "__import__", no_plugin)
    with pytest.raises(MissingInputError, match=r"pip install -e '.\[gpu\]'"):
        gpu_nodes.gpu_devices(gpu_nodes.parse_gpu_topology("h100-8"))
