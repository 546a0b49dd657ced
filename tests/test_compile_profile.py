"""benchmarks/compile_profile.py: libtpu's log of a compile check, summarized per module."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
try:
    import compile_profile
finally:
    sys.path.pop(0)

# Lines in libtpu's format (glog prefix, source file and line), two modules; the numbers are
# made up so that every field the summary reads has a known answer.
_LOG = """\
I1207 07:16:31.000000    100 deepsea_compiler_hlo_passes.cc:6046] XLA::TPU running hlo passes for 1,031 instructions, module: jit_step
I1207 07:16:31.100000    100 hlo_pass_pipeline.cc:176] HLO pass: dce time: 14 us (14 us) (cumulative: 45 us, max: 24 us, #called: 3)
I1207 07:16:31.200000    100 hlo_pass_pipeline.cc:176] HLO pass: tpu_fusion time: 2.5 s (2500000 us) (cumulative: 2.5 s, max: 2.5 s, #called: 4)
I1207 07:16:31.300000    100 hlo_pass_pipeline.cc:176] HLO pass: dce time: 6 us (6 us) (cumulative: 51 us, max: 24 us, #called: 5)
a line that is not libtpu's
I1207 07:16:31.400000    100 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage duration: 160.265102ms
I1207 07:16:32.000000    101 hlo_deduplication.cc:334] total # of HLOs = 15
I1207 07:16:32.000010    101 hlo_deduplication.cc:335] # of duplicate HLOs = 4
I1207 07:16:32.000020    101 hlo_deduplication.cc:336] # of unique HLOs = 7
I1207 07:16:32.000030    102 hlo_deduplication.cc:334] total # of HLOs = 15
I1207 07:16:32.000040    102 hlo_deduplication.cc:335] # of duplicate HLOs = 4
I1207 07:16:32.000050    102 hlo_deduplication.cc:336] # of unique HLOs = 7
I1207 07:16:32.500000    101 deepsea_compiler_base.cc:1290] XLA::TPU memory space and buffer assignment time: 39.9 ms (39923 us) (cumulative: 39.9 ms, max: 39.9 ms, #called: 1)
I1207 07:16:32.600000    102 deepsea_compiler_backend.cc:3769] [<no-hlo-instruction>] LLO optimizing 854 instructions
I1207 07:16:33.000000    103 deepsea_compiler_backend.cc:3769] [fusion.5] LLO optimizing 50,886 instructions
I1207 07:16:33.500000    104 deepsea_compiler_backend.cc:3769] [convolution_tanh_fusion] LLO optimizing 39,774 instructions
I1207 07:16:35.000000    103 deepsea_compiler_backend.cc:3769] [fusion.15] LLO optimizing 34,654 instructions
I1207 07:16:35.100000    103 deepsea_compiler_backend.cc:1100] XLA::TPU emitting for fusion.15 time: 2.7 s (2700000 us) (cumulative: 2.7 s, max: 2.7 s, #called: 1)
I1207 07:16:36.500000    102 deepsea_compiler_base.cc:1078] [<no-hlo-instruction>] LLO optimized 125,314 instructions (deduplicated from total 132,437 by factor 1.06).
I1207 07:16:36.600000    102 deepsea_compiler_base.cc:2319] XLA::TPU lowering and optimization time: 4 s (4000000 us) (cumulative: 4 s, max: 4 s, #called: 1)
I1207 07:16:36.700000    102 deepsea_compiler_base.cc:3931] BACKEND_PASSES stage duration: 4.1s
I1207 07:16:37.000000    100 deepsea_compiler_base.cc:985] END_TO_END stage duration: 1m0.5s
I1207 07:17:00.000000    100 deepsea_compiler_hlo_passes.cc:6046] XLA::TPU running hlo passes for 9 instructions, module: jit_teacher_step
I1207 07:17:00.500000    100 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage duration: 0.5s
"""


def test_the_log_is_summarized_per_module():
    step, teacher = compile_profile.parse(_LOG)
    assert (step["module"], step["hlo_instructions"]) == ("jit_step", 1031)
    assert step["stage_seconds"] == pytest.approx(
        {"HLO_PASSES": 0.160265102, "BACKEND_PASSES": 4.1, "END_TO_END": 60.5})
    assert step["hlo_passes_total_seconds"] == pytest.approx(2.5 + 20e-6)
    assert step["top_hlo_passes"][0] == dict(name="tpu_fusion", seconds=2.5, calls=1)
    assert step["top_hlo_passes"][1]["calls"] == 2   # dce, summed over its two calls
    assert step["timers_seconds"] == pytest.approx(
        {"memory space and buffer assignment": 0.039923, "lowering and optimization": 4.0})
    assert step["dedup"] == [dict(total=15, duplicate=4, unique=7)]   # logged by two threads
    assert step["llo_optimized"] == dict(instructions=125314, before_deduplication=132437)
    # Units on one thread run one after another; the last ones end with the lowering; the
    # program-level unit's thread only waits, so its span is no unit's time.
    assert step["llo_unit_count"] == 4
    assert step["llo_unit_instructions"] == 854 + 50886 + 39774 + 34654
    assert step["llo_unit_seconds"] == pytest.approx(2.0 + 3.0 + 1.5)
    assert step["largest_llo_units"][0] == dict(name="fusion.5", instructions=50886,
                                                seconds=pytest.approx(2.0))
    kinds = {k["kind"]: k for k in step["slowest_llo_kinds"]}
    assert set(kinds) == {"fusion", "convolution_tanh_fusion"}
    assert kinds["fusion"]["units"] == 2 and kinds["fusion"]["seconds"] == pytest.approx(3.5)
    assert (teacher["module"], teacher["stage_seconds"]) == ("jit_teacher_step", {"HLO_PASSES": 0.5})
    text = compile_profile.format_summary(step)
    assert "15 lowered, 4 duplicates, 7 unique" in text and "fusion x2 3.5 s" in text


def test_the_command_needs_the_compile_checks_flags(capsys):
    with pytest.raises(SystemExit):
        compile_profile.main(["--profile_json=/dev/null"])
    assert "give the compile check's flags after `--`" in capsys.readouterr().err


@pytest.mark.slow   # a TPU compile
def test_a_real_compile_is_profiled(tmp_path):
    """libtpu's log of a real compile still has the lines the parser reads."""
    pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu (the [test] extra)")
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "compile_profile.py"),
         f"--profile_json={out}", "--", "--config=experiments/digits.py:stage=teacher", "--topology=v5p-8"],
        cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = json.loads(out.read_text())
    step = profile["modules"][0]
    assert profile["report"]["fits"] and step["hlo_instructions"] > 100
    assert step["stage_seconds"]["END_TO_END"] > step["stage_seconds"]["BACKEND_PASSES"] > 0
    assert step["dedup"] and step["dedup"][0]["total"] >= step["dedup"][0]["unique"] > 0
    assert step["llo_unit_count"] > 10 and step["llo_unit_seconds"] > 0
    assert "HLO deduplication" in proc.stdout
