"""Every command's shared command-line behaviour (`scm_jax.cli.run_command`): `--help` lists the
command's flags one line each and exits 0; a bad flag is one line `error: ...` with exit 2."""
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

# module -> flags its --help must list
COMMANDS = {
    "scm_jax.sample": ("--config", "--workdir", "--stage", "--steps", "--out", "--distributed"),
    "scm_jax.compile": ("--config", "--topology", "--with_teacher", "--json", "--num_slices"),
    "scm_jax.evaluation.ref_stats": ("--config", "--out", "--data_dir", "--batch_size"),
    "scm_jax.data.encode_latents": ("--vae", "--out", "--storage_dtype", "--num_workers"),
}


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_lists_each_flag_on_one_line(module):
    proc = _run(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for flag in COMMANDS[module]:
        listed = [line for line in lines if line.startswith((f"  {flag}:",
                                                             f"  --[no]{flag[2:]}:"))]
        assert len(listed) == 1, (flag, proc.stdout)
    assert "Flags:" in proc.stdout and proc.stderr.strip() == ""


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_an_unknown_flag_is_one_line_with_exit_2(module):
    proc = _run(module, "--no_such_flag=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no_such_flag" in errors[0]
    assert "--help" in errors[0]


def test_a_missing_required_flag_names_it():
    proc = _run("scm_jax.sample", "--config=experiments/digits.py", "--workdir=/tmp/x",
                "--out=x.png")
    assert proc.returncode == 2 and "stage" in proc.stderr and proc.stderr.count("\n") == 1
