"""Every command's shared command-line behaviour (`scm_jax.cli.run_command`): `--help` lists the
command's flags one line each and exits 0; a bad flag is one line `error: ...` with exit 2."""
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

# module -> flags its --help must list
COMMANDS = {
    "scm_jax.main": ("--config", "--workdir", "--distributed", "--coordinator_address",
                     "--num_processes", "--process_id"),
    "scm_jax.sample": ("--config", "--workdir", "--stage", "--steps", "--out", "--distributed"),
    "scm_jax.compile": ("--config", "--topology", "--with_teacher", "--json", "--num_slices"),
    "scm_jax.ref_stats": ("--config", "--out", "--data_dir", "--batch_size"),
    "scm_jax.encode_latents": ("--vae", "--out", "--storage_dtype", "--num_workers"),
    "scm_jax.config_reference": ("--out", "--check"),
    "scm_jax.convert_weights": ("--network", "--src", "--out"),
    "scm_jax.studies.posthoc": ("--workdir", "--size", "--seeds", "--only", "--config"),
    "scm_jax.studies.teacher_length": ("--workdir", "--size", "--seeds", "--only", "--config"),
}
# benchmark script -> flags its --help must list (the same wrapper; run by path)
SCRIPTS = {
    "attention_jvp": ("--ns", "--head_dim", "--time_max_n", "--no_tpu_aot", "--json"),
    "edm2_digits": ("--workdir", "--variant", "--json"),
    "gpu_check": ("--out", "--networks", "--dry", "--calls"),
    "param_flops": ("--only", "--modulation", "--json"),
    "pod_fit": ("--json", "--only", "--platforms", "--attention", "--no_compile_cache"),
    "pod_fit_table": ("--json", "--write_readme", "--readme"),
    "sampling": ("--config", "--batch", "--skip_presets", "--json"),
    "step_cost": ("--config", "--batch", "--steps", "--synthetic", "--json"),
}


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _run_script(name, *args):
    return subprocess.run([sys.executable, os.path.join("benchmarks", f"{name}.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _check_help(proc, flags):
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for flag in flags:
        listed = [line for line in lines if line.startswith((f"  {flag}:",
                                                             f"  --[no]{flag[2:]}:"))]
        assert len(listed) == 1, (flag, proc.stdout)
    assert "Flags:" in proc.stdout and proc.stderr.strip() == ""


def _check_unknown_flag(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no_such_flag" in errors[0]
    assert "--help" in errors[0]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_lists_each_flag_on_one_line(module):
    _check_help(_run(module, "--help"), COMMANDS[module])


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_an_unknown_flag_is_one_line_with_exit_2(module):
    _check_unknown_flag(_run(module, "--no_such_flag=3"))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_benchmark_uses_the_same_command_line(script):
    """--help lists the script's flags one line each; an unknown flag is one line with exit
    2."""
    _check_help(_run_script(script, "--help"), SCRIPTS[script])
    _check_unknown_flag(_run_script(script, "--no_such_flag=3"))


def test_a_missing_required_flag_names_it():
    proc = _run("scm_jax.sample", "--config=experiments/digits.py", "--workdir=/tmp/x",
                "--out=x.png")
    assert proc.returncode == 2 and "stage" in proc.stderr and proc.stderr.count("\n") == 1
