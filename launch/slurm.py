"""A SLURM batch job for scm_jax on GPU nodes: one process per node, coordinator from the
node list.

    python launch/slurm.py --nodes=4 --gpus-per-node=8 --time=24:00:00 [--dry-run] -- \
        --config=experiments/imagenet512.py:variant=xxl,stage=scd --workdir=/shared/in512_xxl

writes `<job>.sbatch` and submits it (`--dry-run`: prints the script and the sbatch command).
In the job, the first host of $SLURM_JOB_NODELIST is the coordinator; `srun` starts one task per
node, each running the experiment with --distributed and its coordinator address, process
count and id, logging to logs/<job>-<jobid>-<task>.log. SLURM sends SIGTERM `--grace` seconds
before the time limit: training saves a checkpoint at a step every process agrees on and exits
with status 143; submitting the same job again resumes.
"""
import argparse
import shlex
import subprocess
import sys

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --signal=TERM@{grace}
#SBATCH --output=logs/{job}-%j.out
{extra}set -euo pipefail
mkdir -p logs
# The coordinator: process 0 on the first node of the allocation. (sed reads the whole list:
# `head -n 1` would close the pipe early, and pipefail would end the job on scontrol's SIGPIPE.)
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export SCM_COORDINATOR="$head:{port}"
srun --kill-on-bad-exit=1 --output=logs/{job}-%j-%t.log bash -c \\
  'cd {workdir_repo} && exec {command} --distributed \\
     --coordinator_address=$SCM_COORDINATOR --num_processes=$SLURM_NTASKS \\
     --process_id=$SLURM_PROCID'
"""


def script(args) -> str:
    experiment = list(args.experiment)
    if experiment and experiment[0] == "--":
        experiment = experiment[1:]
    if not experiment:
        raise SystemExit("error: give the experiment's arguments after --, e.g. -- "
                         "--config=experiments/imagenet512.py:variant=xxl,stage=scd "
                         "--workdir=/shared/run")
    experiment = [a for a in experiment if a != "--distributed"]
    # Quoted for the single-quoted bash -c string: each argument in double quotes.
    command = "python -m scm_jax.main " + " ".join(
        '"' + a.replace("\\", "\\\\").replace('"', '\\"').replace("'", "'\\''") + '"'
        for a in experiment)
    extra = "".join(f"#SBATCH {line}\n" for line in args.sbatch)
    return TEMPLATE.format(job=args.job, nodes=args.nodes, gpus=args.gpus_per_node,
                           cpus=args.cpus_per_task, time=args.time, grace=args.grace,
                           extra=extra, port=args.port, workdir_repo=shlex.quote(args.repo),
                           command=command)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default="scm_jax")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=32)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--grace", type=int, default=300, help="seconds of SIGTERM notice")
    p.add_argument("--port", type=int, default=12355, help="the coordinator's port")
    p.add_argument("--repo", default=".", help="the checkout every node runs from")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH line, e.g. --sbatch=--partition=gpu (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("experiment", nargs=argparse.REMAINDER)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    text = script(args)
    path = f"{args.job}.sbatch"
    if args.dry_run:
        print(text)
        print(shlex.join(["sbatch", path]))
        return 0
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", flush=True)
    return subprocess.call(["sbatch", path])


if __name__ == "__main__":
    sys.exit(main())
