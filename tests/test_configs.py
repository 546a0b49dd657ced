"""The one config loader (files, arguments, overrides typed by their entry) and the command
line's error path: a known failure is one line on stderr and exit status 2, with no traceback
and, on a CPU machine, no accelerator-probing noise."""
import json
import os
import subprocess
import sys

import pytest

from scm_jax import configs, main
from scm_jax.cli import EXIT_USER_ERROR
from scm_jax.errors import ConfigError
from tests.helpers import REPO, load_experiment


def test_overrides_are_typed_by_the_entry_they_replace():
    c = load_experiment("digits", "variant=tiny", [
        "dry_run=False", "scd.steps=1e3", "teacher.optimizer.lr=3e-4", "pipeline=teacher,scd",
        "model.attn_resolutions=(4,)", "scd.optimizer.force_finite=true", "model.name=unet"])
    assert c.dry_run is False and c.scd.steps == 1000 and isinstance(c.scd.steps, int)
    assert c.teacher.optimizer.lr == 3e-4 and c.pipeline == ("teacher", "scd")
    assert c.model.attn_resolutions == (4,) and c.scd.optimizer.force_finite is True
    assert configs.parse_arg("flag=False,n=3", {"flag": True, "n": 1}).to_dict() == dict(
        flag=False, n=3)
    for override, message in [
            ("dry_run=maybe", "expected a boolean"),
            ("scd.steps=1.5", "expected an integer"),
            ("scd.loss=3", "is a section"),
            ("scd.loss.tangent_cc=1", r"did you mean config\.scd\.loss\.tangent_c\?"),
            ("teacher.lss.p_mean=1", r"config\.teacher has no entry 'lss'; did you mean "
                                     r"config\.teacher\.loss\?")]:
        with pytest.raises(ConfigError, match=message):
            load_experiment("digits", "variant=tiny", [override])
    with pytest.raises(ConfigError, match="expected a boolean"):
        configs.parse_arg("flag=nope", {"flag": True})
    locked = load_experiment("digits", "variant=tiny")
    with pytest.raises((AttributeError, KeyError)):
        locked.new_entry = 1


def _cli(args, workdir, env=None):
    env = dict(os.environ if env is None else env)
    return subprocess.run(
        [sys.executable, "-m", "scm_jax.main", "--config=experiments/digits.py:variant=tiny",
         f"--workdir={workdir}", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600)


def _one_line_error(proc, expected: str):
    assert proc.returncode == EXIT_USER_ERROR, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "\\n" not in lines[0] and "\\'" not in lines[0]
    return lines[0]


def test_known_failures_print_one_line_and_exit_2(tmp_path):
    line = _one_line_error(_cli(["--config.scd.loss.bogus_knob=3"], tmp_path / "a"),
                           "unknown config key 'scd.loss.bogus_knob'")
    assert "config.scd.loss has no entry 'bogus_knob'" in line
    _one_line_error(_cli(["--config.scd.loss.tangent_c=-1"], tmp_path / "b"),
                    "config.scd.loss.tangent_c = -1.0 is invalid: expected >= 0")
    # A stage directory written by another architecture (its record is checked first).
    other = load_experiment("digits", "variant=tiny", ["model.channels=16"])
    from scm_jax import stage_identity
    from scm_jax import objectives

    stage_identity.write_record(tmp_path / "c" / "teacher",
                      stage_identity.stage_record(other, objectives.build(other, "teacher")))
    _one_line_error(_cli([], tmp_path / "c"), "model.channels = 16 there, 8 now")
    assert not any(tmp_path.joinpath("a").glob("*")) and not tmp_path.joinpath("b").exists()


def test_missing_teacher_on_a_cpu_machine_prints_no_accelerator_noise(tmp_path):
    """Without JAX_PLATFORMS, JAX probes every platform; with libtpu installed (the [test]
    extra) that printed libtpu's initialization errors on every run of a TPU-less machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = _cli(["--config.stage=scd"], tmp_path, env=env)
    _one_line_error(proc, "no teacher checkpoint found in")
    assert "hostname" not in proc.stderr and "TPU" not in proc.stderr
    assert "=== stage scd ===" in proc.stdout


def test_dry_run_writes_nothing_and_shows_the_parameter_table(tmp_path):
    lines = []
    count = main.dry_run(load_experiment("digits"), log=lambda m: lines.append(str(m)))
    assert "| Name" in lines[-2] and f"{count:,}" in lines[-1]
    assert isinstance(count, int) and not any(tmp_path.iterdir())
