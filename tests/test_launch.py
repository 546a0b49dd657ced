"""The launch scripts' dry runs: the exact gcloud commands for a TPU VM slice, and a SLURM batch
script whose quoting survives bash (run here with stand-ins for scontrol, srun and python)."""
import importlib.util
import json
import os
import shlex
import stat
import subprocess

import pytest

from tests.helpers import REPO

EXPERIMENT = ["--config=experiments/imagenet512.py:variant=xxl,stage=scd",
              "--workdir=gs://bucket/run with space", "--config.scd.optimizer.lr=3e-5",
              "--config.data.path=/mnt/data/it's"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry(capsys, module, argv):
    assert module.main(argv + ["--dry-run"] if "--" not in argv else
                       argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_tpu_vm_commands(capsys):
    tpu = _load("tpu_vm")
    common = ["--name=scm-xxl", "--zone=us-east5-a", "--project=my-proj"]
    create = shlex.split(_dry(capsys, tpu, ["create", *common, "--accelerator=v5p-128",
                                            "--spot"])[0])
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "scm-xxl"]
    assert {"--zone=us-east5-a", "--accelerator-type=v5p-128", "--spot", "--node-id=scm-xxl",
            "--runtime-version=v2-alpha-tpuv5", "--project=my-proj"} <= set(create)
    reserved = shlex.split(_dry(capsys, tpu, ["create", *common, "--accelerator=v6e-64",
                                              "--reserved"])[0])
    assert "--reserved" in reserved and "--runtime-version=v2-alpha-tpuv6e" in reserved

    lines = _dry(capsys, tpu, ["setup", *common, "--repo=https://example.com/scm_jax.git",
                               "--data=gs://bucket/in512_latents"])
    assert lines[0] == ("# the data will be at /mnt/data/bucket/in512_latents on every worker "
                        "(--config.data.path=...)")
    install, mount = (shlex.split(line) for line in lines[1:])
    assert "--worker=all" in install and "--zone=us-east5-a" in install
    remote = next(a for a in install if a.startswith("--command="))[len("--command="):]
    assert "pip install -q -e '.[tpu]'" in remote and "git clone" in remote
    assert "gcsfuse --implicit-dirs bucket /mnt/data/bucket" in " ".join(mount)

    (run,) = _dry(capsys, tpu, ["run", *common, "--", *EXPERIMENT])
    run = shlex.split(run)
    assert "--worker=all" in run
    remote = next(a for a in run if a.startswith("--command="))[len("--command="):]
    # The remote shell sees the experiment's arguments intact, with --distributed, detached.
    words = shlex.split(remote.split("setsid nohup ", 1)[1].split(" > ")[0])
    assert words == ["python", "-m", "scm_jax.main", *EXPERIMENT, "--distributed"]
    assert remote.endswith("2>&1 < /dev/null &") and "~/scm_jax_logs/scm-xxl-$(hostname).log" in remote

    stop = shlex.split(_dry(capsys, tpu, ["stop", *common])[0])
    assert "--command=pkill -TERM -f scm_jax.main || true" in stop
    delete = shlex.split(_dry(capsys, tpu, ["delete", *common])[0])
    assert delete[3:6] == ["queued-resources", "delete", "scm-xxl"] and "--quiet" in delete
    logs = shlex.split(_dry(capsys, tpu, ["logs", *common])[0])
    assert "--worker=0" in logs
    status = _dry(capsys, tpu, ["status", *common])
    assert "describe" in status[0] and "pgrep -af scm_jax.main" in status[1]
    with pytest.raises(SystemExit):
        tpu.main(["run", *common, "--dry-run"])


def _stub(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_runs_one_process_per_node_with_the_coordinator(capsys, tmp_path):
    slurm = _load("slurm")
    lines = _dry(capsys, slurm, ["--nodes=2", "--gpus-per-node=4", "--time=1:00:00",
                                 "--sbatch=--partition=gpu", "--", *EXPERIMENT])
    text = "\n".join(lines[:-1]) + "\n"
    assert lines[-1] == "sbatch scm_jax.sbatch"
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--time=1:00:00",
                      "--partition=gpu", "--signal=TERM@300"):
        assert f"#SBATCH {directive}" in text
    # Run the script with stand-ins: scontrol lists two hosts, srun runs the task as task 1 of
    # 2, and `python` records its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    _stub(bin_dir, "srun", 'shift 2; SLURM_NTASKS=2 SLURM_PROCID=1 "$@"\n')
    _stub(bin_dir, "python", 'python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" '
                             '"$@" > "$ARGS_OUT"\n')
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]",
               ARGS_OUT=str(tmp_path / "argv.json"))
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == ["-m", "scm_jax.main", *EXPERIMENT, "--distributed",
                    "--coordinator_address=node-a:12355", "--num_processes=2", "--process_id=1"]
