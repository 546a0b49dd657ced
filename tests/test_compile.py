"""The compile check: the real train step of a stage, built as train.py builds it, compiled by
the TPU compiler for a v5p slice on this CPU host (libtpu), with per-chip memory, FLOPs and the
compiler's time estimate; the fused attention kernel follows the mesh's platform (TPU), not the
host's (CPU). A step that cannot fit is an answer (`fits: false`), the mesh is FSDP over all
chips unless the command line sets one, the compiler's answers are cached, and docs/paper-scale.md's
fit-and-speed tables are made from pod_fit's JSON."""
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


@pytest.mark.slow
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
    # The lowered programs' ratio (the report's flops_vs_teacher, no compile) counts before
    # XLA's optimizations: the JVP's primal and the gradient pass's forward both, the kernel's
    # attention not at all.
    lowered_ratio = r["lowered_flops"] / teacher["lowered_flops"]
    assert 0.8 * ratio <= lowered_ratio <= 2 * ratio, (name, ratio, lowered_ratio)
    # The arguments' bytes from their shapes and shardings: a lower bound, since TPU layouts
    # pad arrays to (8, 128) tiles, which more than triples these small networks' vectors.
    assert 0.25 * r["argument_bytes"] <= r["argument_bytes_from_shapes"] <= r["argument_bytes"]


def _command(args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "scm_jax.compile", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


@pytest.mark.slow
def test_the_command_reports_fit_speed_mfu_and_the_teacher_ratio_as_json(tmp_path):
    """--with_teacher compiles the teacher step too; the user's mesh wins; the second run of
    the same question takes the compiler's answers from the compile cache."""
    args = ["--config=experiments/imagenet512.py:variant=runlocal,backbone=dit,stage=scd",
            "--topology=v5p-8", "--with_teacher", "--config.mesh.fsdp=2",
            "--config.model.remat=block"]
    env = dict(SCM_JAX_COMPILE_CACHE_DIR=str(tmp_path / "cache"))
    reports = []
    for run in ("first", "second"):
        out = tmp_path / f"{run}.json"
        proc = _command(args + [f"--json={out}"], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads(out.read_text()))
    report, again = reports
    for key in ("topology", "chips", "hbm_bytes_per_chip", "peak_bytes_per_chip", "fits",
                "flops_per_step", "step_seconds", "mfu", "teacher_step_seconds",
                "teacher_peak_bytes_per_chip", "mesh", "remat", "estimate_above_peak",
                "lower_seconds", "compile_seconds", "fit_source", "flops_vs_teacher"):
        assert key in report, key
    assert report["chips"] == 4 and report["fits"] and report["fit_source"] == "compiled"
    assert report["mesh"] == {"data": 2, "fsdp": 2} and report["mesh_source"] == "config"
    assert report["remat"] == "block" and 0 < report["mfu"] < 1
    assert report["step_seconds_vs_teacher"] > 1 and report["compiled_flops_vs_teacher"] > 1
    # From the lowered programs: the same order as the compiled ratio, not the same number.
    assert 0.5 < report["flops_vs_teacher"] / report["compiled_flops_vs_teacher"] < 2
    assert report["lower_seconds"] > 0 and report["compile_seconds"] > 0
    assert report["compile_cache"] == "miss" and again["compile_cache"] == "hit"
    assert again["cached_compile_seconds"] == pytest.approx(report["compile_seconds"])
    for key in ("peak_bytes_per_chip", "flops_per_step", "step_seconds", "largest_buffers",
                "teacher_step_seconds", "step_seconds_vs_teacher"):
        assert again[key] == report[key], key
    assert "DOES NOT FIT" not in proc.stdout and "teacher step compiled" in proc.stdout
    assert "MFU" in proc.stdout and "upper bound" in proc.stdout


@pytest.mark.slow   # a TPU compile
def test_a_step_that_cannot_fit_is_an_answer_with_the_bytes_required(tmp_path):
    """The stage alone on FSDP over all chips (no mesh given); the compiler's out-of-memory
    error becomes fits false with its bytes, exit status 0, no traceback."""
    out = tmp_path / "oom.json"
    proc = _command(["--config=experiments/digits.py:variant=tiny,stage=sct", "--topology=v5e-4",
                     "--config.sct.batch_size=1048576", f"--json={out}"],
                    dict(SCM_JAX_COMPILE_CACHE="0"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["fits"] is False and r["fit_source"] == "compiler out of memory"
    assert r["required_bytes_per_chip"] > r["available_bytes_per_chip"] > 15 * cc.GIB
    assert "RESOURCE_EXHAUSTED" in r["oom_message"] and r["compile_cache"] == "off"
    assert r["mesh"] == {"data": 1, "fsdp": 4} and r["mesh_source"] == cc.AUTO_MESH
    # The stage alone: its FLOPs relative to the teacher from the lowered programs, no times.
    assert r["teacher_stage"] == "teacher" and 1.2 < r["flops_vs_teacher"] < 2.5
    assert r["teacher_step_seconds"] is None and r["step_seconds_vs_teacher"] is None
    assert r["step_seconds"] is None and r["peak_bytes_per_chip"] is None
    assert r["lower_seconds"] > 0 and r["compile_seconds"] > 0
    assert "DOES NOT FIT: the compiler ran out of memory" in proc.stdout


def test_arguments_beyond_hbm_do_not_fit_without_a_compile():
    config = load_experiment("digits", "variant=tiny,stage=sct", ["model.channels=4096"])
    r = cc.check(config, "sct", cc.parse_topology("v5e-1"), log=lambda m: None)
    assert r["fits"] is False and r["fit_source"] == "arguments exceed HBM"
    assert r["compile_seconds"] == 0 and r["compile_cache"] is None
    # parameters, Adam's two moments and the EMA in float32: 16 bytes a parameter, > 16 GiB
    assert r["required_bytes_per_chip"] == r["argument_bytes_from_shapes_per_chip"] > 16 * cc.GIB
    assert r["available_bytes_per_chip"] == cc.CHIPS["v5e"].hbm_bytes
    assert r["flops_vs_teacher"] > 1


def test_unestimated_ops_are_taken_out_of_a_step_estimated_above_one_second(v5p8, monkeypatch):
    """The compiler counts each op it does not estimate (the non-finite guard's ZeroCrop) as
    -1 s: the estimate of a step over 1 s keeps its whole seconds, and equals the unguarded
    step's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from scm_jax import tree_checks

    mesh = Mesh(np.array(v5p8[1]).reshape(-1), ("d",))
    rng = np.random.default_rng()
    depth, leaves = int(rng.integers(6, 9)), int(rng.integers(3, 8))

    def spec(shape, axis):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(axis)))

    def matmuls(x, w):
        for _ in range(depth):
            x = jnp.tanh(x @ w)
        return x

    def guarded(x, w, flags):
        return jnp.where(tree_checks.finite(flags), matmuls(x, w), 0)

    x, w = spec((131072, 32768), "d"), spec((32768, 32768), None)
    flags = [spec((4096, 256), "d") for _ in range(leaves)]
    plain = cc.compiled_figures(jax.jit(matmuls).lower(x, w).compile(), mesh)
    compiled = jax.jit(guarded).lower(x, w, flags).compile()
    guard = cc.compiled_figures(compiled, mesh)
    assert plain["unestimated_ops"] == 0 and guard["unestimated_ops"] == leaves
    assert guard["compiler_seconds"] < 0 and not guard["compute_seconds_ambiguous"]
    peak = v5p8[0].chip.peak_bf16_flops
    assert plain["compute_seconds"] > 1 and plain["flops"] <= plain["compute_seconds"] * peak
    assert guard["compute_seconds"] == pytest.approx(plain["compute_seconds"], rel=1e-3)
    # Had the count been the ceiling of -optimal_seconds, the whole seconds would be lost.
    assert guard["compiler_seconds"] + np.ceil(-guard["compiler_seconds"]) < 1
    # An unestimated op the check does not recognise: the time is flagged, not trusted.
    monkeypatch.setattr(cc, "UNESTIMATED_CUSTOM_CALLS", ())
    unknown = cc.compiled_figures(compiled, mesh)
    assert unknown["compute_seconds_ambiguous"] and unknown["compute_seconds"] < 1
    with open(os.path.join(REPO, "benchmarks", "results",
                           "edm2-in512-m_teacher_v5p-8_recompiled.json")) as f:
        report = json.load(f)   # a check's report, as --json wrote it
    assert "fraction of a second" not in cc.format_report(report)
    report["compute_seconds_ambiguous"] = True
    assert "fraction of a second" in cc.format_report(report)


def test_the_mesh_is_fsdp_over_all_chips_unless_the_command_line_sets_one():
    v5p = cc.parse_topology("v5p-32")
    assert cc.mesh_overrides(["model.remat=block"], v5p) == (
        ["model.remat=block", "mesh.data=1", "mesh.fsdp=16"], cc.AUTO_MESH)
    for given in (["mesh.fsdp=4"], ["mesh.data=2"], [" mesh.data = 16"]):
        assert cc.mesh_overrides(given, v5p) == (given, "config")
    overrides, source = cc.mesh_overrides([], cc.parse_topology("v6e-8", num_slices=2))
    assert overrides == ["mesh.data=2", "mesh.fsdp=8"] and "slices" in source


def test_out_of_memory_messages_give_required_and_available_bytes():
    hlo = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (28.70G) exceeds available HBM (15.75G).")
    assert cc.out_of_memory(hlo) == dict(required_bytes=round(28.70 * cc.GIB),
                                         available_bytes=round(15.75 * cc.GIB), message=hlo)
    used = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
            "space hbm. Used 101.50G of 95.74G hbm. Exceeded hbm capacity by 5.76G. Memory "
            "usage report: \n  arguments: ...")
    r = cc.out_of_memory(used)
    assert (r["required_bytes"], r["available_bytes"]) == (round(101.5 * cc.GIB),
                                                           round(95.74 * cc.GIB))
    assert "usage report" not in r["message"]
    early = ("RESOURCE_EXHAUSTED: Compilation failure: Aborting compilation early because it's "
             "unlikely to have enough device memory. Requires 40.0GiB, has 15.7GiB available.")
    assert cc.out_of_memory(early)["required_bytes"] == 40 * cc.GIB
    assert cc.out_of_memory("INVALID_ARGUMENT: bad shape") is None


def test_the_help_lists_the_flags():
    proc = _command(["--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--config", "--topology", "--num_slices", "--with_teacher", "--json",
                 "--[no]compile_cache"):
        assert flag in proc.stdout, flag


@pytest.mark.parametrize("args,message", [
    (["--topology=v5x-8"], "unknown --topology 'v5x-8'"),
    (["--topology=v5p-8", "--config.mesh.fsdp=3"], "config.mesh.fsdp = 3"),
    (["--topology=v5p-8", "--config.scd.batch_size=6"], "scd.batch_size = 6"),
])
def test_bad_topologies_meshes_and_batches_are_one_line_errors(args, message):
    proc = _command(["--config=experiments/imagenet512.py:variant=runlocal,backbone=dit,stage=scd",
                     *args], timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def _pod_fit():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import pod_fit
    finally:
        sys.path.pop(0)
    return pod_fit


def test_pod_fit_moves_past_what_does_not_fit_and_resumes(monkeypatch, tmp_path):
    pod_fit = _pod_fit()
    calls = []

    def check(config, stage, topology, **kw):
        calls.append((topology.product, config.model.remat, dict(config.mesh), kw["with_teacher"],
                      kw["mesh_source"]))
        fits = topology.product == "v5p-16"
        return dict(topology=topology.product, remat=config.model.remat, fits=fits,
                    fit_source="compiled" if fits else "compiler out of memory",
                    required_bytes_per_chip=(1 if fits else 200) * cc.GIB, lower_seconds=1.0,
                    compile_seconds=2.0)

    monkeypatch.setattr(pod_fit.cc, "check", check)
    monkeypatch.setitem(pod_fit.SIZES, "v5p", ["v5p-8", "v5p-16", "v5p-32"])
    r = pod_fit.fit(os.path.join(REPO, "experiments/digits.py:variant=tiny"), "sct", "v5p",
                    log=lambda m: None)
    assert [c[:2] for c in calls] == [("v5p-8", "none"), ("v5p-8", "block"), ("v5p-16", "none")]
    assert [c[2]["fsdp"] for c in calls] == [4, 4, 8] and calls[-1][2]["data"] == 1
    assert all(c[3] is True and c[4] == cc.AUTO_MESH for c in calls)
    assert r["fits"] and r["topology"] == "v5p-16" and len(r["tried"]) == 3
    assert [t["fit_source"] for t in r["tried"]][:2] == ["compiler out of memory"] * 2
    # Entries already in the JSON are not asked again.
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"ddpmpp-cifar10:teacher:v5p": dict(fits=False, tried=[])}))
    calls.clear()
    pod_fit.main([f"--json={path}", "--only=ddpmpp-cifar10:teacher", "--platforms=v5p"])
    assert calls == []


def test_pod_fit_infers_no_fit_from_a_smaller_network_of_the_family(monkeypatch):
    pod_fit = _pod_fit()
    failed = dict(topology="v5p-8", remat="none", fits=False, fit_source="compiled",
                  required_bytes_per_chip=105 * cc.GIB)
    results = {"edm2-in512-s:scd:v5p": dict(fits=True, tried=[failed]),
               "edm2-in512-m:scd:v5p": dict(fits=True, tried=[dict(
                   failed, remat="block", fit_source="inferred")]),
               "edm2-in64-s:scd:v5p": dict(fits=True, tried=[dict(failed, remat="block")])}
    smaller = pod_fit.smaller_failures(results, "edm2-in512-l", "scd", "v5p")
    # Only the compiler's answers of the same family, stage and platform count.
    assert smaller == {("v5p-8", "none"): ("edm2-in512-s", 105 * cc.GIB)}
    assert pod_fit.smaller_failures(results, "edm2-in512-s", "scd", "v5p") == {}
    assert pod_fit.smaller_failures(results, "edm2-in512-l", "teacher", "v5p") == {}
    # A CM stage is not compiled where its own preset's teacher step did not fit at its batch
    # (inferred answers count: they stand for a compiler's answer).
    results["edm2-in512-l:teacher:v5p"] = dict(fits=True, tried=[
        failed, dict(failed, remat="block", fit_source="inferred", required_bytes_per_chip=None)])
    config = pod_fit.configs.load(pod_fit.PRESETS["edm2-in512-l"], ["stage=scd"])
    assert pod_fit.teacher_failures(results, "edm2-in512-l", "scd", "v5p", config) == {
        ("v5p-8", "none"): ("edm2-in512-l teacher", 105 * cc.GIB),
        ("v5p-8", "block"): ("edm2-in512-l teacher", None)}
    assert pod_fit.teacher_failures(results, "edm2-in512-l", "teacher", "v5p", config) == {}
    assert pod_fit.teacher_failures(results, "edm2-in512-l", "scd", "v6e", config) == {}
    with config.unlocked():
        config.scd.batch_size //= 2   # a smaller CM batch may fit where the teacher's did not
    assert pod_fit.teacher_failures(results, "edm2-in512-l", "scd", "v5p", config) == {}
    calls = []

    def check(config, stage, topology, **kw):
        calls.append((topology.product, config.model.remat))
        return dict(topology=topology.product, remat=config.model.remat, fits=True,
                    fit_source="compiled", required_bytes_per_chip=cc.GIB, lower_seconds=1.0,
                    compile_seconds=2.0)

    monkeypatch.setattr(pod_fit.cc, "check", check)
    monkeypatch.setitem(pod_fit.SIZES, "v5p", ["v5p-8", "v5p-16"])
    r = pod_fit.fit(os.path.join(REPO, "experiments/digits.py:variant=tiny"), "sct", "v5p",
                    log=lambda m: None, smaller={("v5p-8", "none"): ("edm2-in512-s", 7)})
    assert calls == [("v5p-8", "block")] and r["remat"] == "block"
    assert r["tried"][0] == dict(topology="v5p-8", remat="none", fits=False,
                                 fit_source="inferred", inferred_from="edm2-in512-s",
                                 required_bytes_per_chip=7)


def _entry(topology, stage, fits=True, **kw):
    entry = dict(topology=topology, stage=stage, fits=fits, mesh=dict(data=1, fsdp=4),
                 remat="none", batch_size=512, peak_bytes_per_chip=7 * cc.GIB,
                 flops_per_step=2e13, step_seconds=0.088, compute_seconds=0.08,
                 peak_bf16_flops_per_chip=459e12, mfu=0.38, step_seconds_vs_teacher=1.34,
                 lower_seconds=3.0, compile_seconds=500.0, compile_cache="miss")
    return dict(entry, **kw) if fits else dict(
        fits=False, tried=[dict(topology="v5p-8", remat="none", fits=False),
                           dict(topology="v5p-1024", remat="block", fits=False)])


def test_the_fit_table_is_made_from_the_json_between_the_readme_markers(tmp_path):
    results = {
        "ddpmpp-cifar10:teacher:v5p": _entry("v5p-8", "teacher", step_seconds_vs_teacher=1.0),
        "ddpmpp-cifar10:sct:v5p": _entry("v5p-8", "sct", compile_cache="hit",
                                         cached_compile_seconds=1081.0, compile_seconds=0.0),
        "edm2-in512-xxl:scd:v5p": _entry("v5p-8", "scd", fits=False),
    }
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text("# before\n<!-- pod_fit_table:start -->\nold table\n"
                      "<!-- pod_fit_table:end -->\nafter\n")
    script = os.path.join(REPO, "benchmarks", "pod_fit_table.py")
    for _ in range(2):   # the second run rewrites the same text
        proc = subprocess.run([sys.executable, script, f"--json={path}", "--write_readme",
                               f"--readme={readme}"], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert proc.returncode == 0, proc.stderr[-2000:]
    text = readme.read_text()
    assert text.startswith("# before\n<!-- pod_fit_table:start -->\n") and "old table" not in text
    assert text.endswith("<!-- pod_fit_table:end -->\nafter\n") and text.count("pod_fit_table") == 2
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| preset"))
    for column in ("smallest v5p slice (fsdp, remat)", "per-chip memory", "FLOPs/step",
                   "est. step time", "MFU", "time / teacher", "compile s"):
        assert column in header, column
    sct = next(line for line in lines if line.startswith("| ddpmpp-cifar10 | sct"))
    assert sct == ("| ddpmpp-cifar10 | sct | v5p-8 (fsdp 4, remat none) | 7.0 GiB | 20.0 TFLOP | "
                   "88 ms | 38% | 1.34x | 1081 |")
    assert "| edm2-in512-xxl | scd | none fits (tried v5p-8 to v5p-1024) |" in text
    assert "Not run on v5p" in text and "dit-in512-xl" in text and "**v6e**: not run." in text
    assert "h100" not in text   # no GPU entries, no GPU markers: no GPU table

    # GPU entries go between the GPU markers, in a table of their own.
    results["edm2-in512-s:scd:h100"] = _entry("h100-8x2", "scd", mesh=dict(data=2, fsdp=8),
                                              peak_bytes_per_chip=44 * cc.GIB)
    path.write_text(json.dumps(results))
    readme.write_text("<!-- pod_fit_table:start -->\n<!-- pod_fit_table:end -->\nmiddle\n"
                      "<!-- pod_fit_gpu_table:start -->\nold\n<!-- pod_fit_gpu_table:end -->\n")
    proc = subprocess.run([sys.executable, script, f"--json={path}", "--write_readme",
                           f"--readme={readme}"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    tpu_part, gpu_part = readme.read_text().split("middle")
    assert "h100" not in tpu_part and "ddpmpp-cifar10" in tpu_part
    assert "old" not in gpu_part and "**h100**" in gpu_part and "h200" not in gpu_part
    assert "smallest h100 nodes of 8 GPUs (fsdp, remat) | per-GPU memory" in gpu_part
    assert "| edm2-in512-s | scd | h100-8x2 (fsdp 8, remat none) | 44.0 GiB |" in gpu_part
    assert "Not run" not in gpu_part
    no_markers = tmp_path / "OTHER.md"
    no_markers.write_text("nothing here\n")
    proc = subprocess.run([sys.executable, script, f"--json={path}", "--write_readme",
                           f"--readme={no_markers}"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "pod_fit_table:start" in errors[0]
    assert no_markers.read_text() == "nothing here\n"
