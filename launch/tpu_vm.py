"""Cloud TPU VMs for scm_jax: create, set up, run, watch, stop and delete a slice.

    python launch/tpu_vm.py create --name=scm --zone=us-east5-a --accelerator=v5p-128 [--spot]
    python launch/tpu_vm.py setup  --name=scm --zone=us-east5-a [--data=gs://B/in512_latents]
    python launch/tpu_vm.py run    --name=scm --zone=us-east5-a -- \
        --config=experiments/imagenet512.py:variant=xxl,stage=scd --workdir=gs://B/in512_xxl \
        --config.data.path=/mnt/data/in512_latents
    python launch/tpu_vm.py status|logs|stop|delete --name=scm --zone=us-east5-a

Every subcommand takes --dry-run, which prints the exact gcloud commands instead of running
them. The slice is requested as a queued resource (spot, reserved, or on demand); setup installs
the package with the [tpu] extra on every worker from a git URL (or the local checkout, copied)
and mounts (gcsfuse) or copies the data; run starts the same experiment command on every worker
with --distributed, detached from the ssh session (setsid nohup), one log per worker in
~/scm_jax_logs/; stop sends SIGTERM, on which training saves a checkpoint at a step all workers
agree on and exits (re-running `run` resumes); delete releases the slice.
"""
import argparse
import shlex
import subprocess
import sys

RUNTIMES = {"v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5e": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "~/scm_jax"
LOG_DIR = "~/scm_jax_logs"
DATA_MOUNT = "/mnt/data"


def _gcloud(*args, project: str | None = None) -> list:
    return ["gcloud", *args] + ([f"--project={project}"] if project else [])


def _ssh(args, command: str, worker: str = "all") -> list:
    return _gcloud("compute", "tpus", "tpu-vm", "ssh", args.name, f"--zone={args.zone}",
                   f"--worker={worker}", f"--command={command}", project=args.project)


def runtime_version(accelerator: str) -> str:
    family = accelerator.split("-")[0]
    if family not in RUNTIMES:
        raise SystemExit(f"error: unknown accelerator type {accelerator!r}; expected v5p-N, "
                         f"v5litepod-N, v5e-N or v6e-N")
    return RUNTIMES[family]


def create(args) -> list:
    """A queued resource: the slice is created when capacity is there."""
    version = args.runtime_version or runtime_version(args.accelerator)
    command = _gcloud("compute", "tpus", "queued-resources", "create", args.name,
                      f"--node-id={args.name}", f"--zone={args.zone}",
                      f"--accelerator-type={args.accelerator}", f"--runtime-version={version}",
                      project=args.project)
    if args.spot:
        command.append("--spot")
    elif args.reserved:
        command.append("--reserved")
    return [command]


def setup(args) -> list:
    """Installs the package on every worker; mounts (gs://) or copies (other paths) the data."""
    commands = []
    if args.repo:
        fetch = f"(test -d {REMOTE_DIR} || git clone {shlex.quote(args.repo)} {REMOTE_DIR})"
        if args.ref:
            fetch += f" && git -C {REMOTE_DIR} checkout {shlex.quote(args.ref)}"
    else:   # the local checkout, copied to every worker
        commands.append(_gcloud("compute", "tpus", "tpu-vm", "scp", "--recurse", args.local,
                                f"{args.name}:{REMOTE_DIR}", f"--zone={args.zone}",
                                "--worker=all", project=args.project))
        fetch = "true"
    install = f"{fetch} && cd {REMOTE_DIR} && pip install -q -e '.[tpu]' && mkdir -p {LOG_DIR}"
    commands.append(_ssh(args, install))
    if args.data:
        prepare = f"sudo mkdir -p {DATA_MOUNT} && sudo chown $USER {DATA_MOUNT}"
        if args.data.startswith("gs://") and args.copy_data:
            commands.append(_ssh(args, f"{prepare} && gcloud storage cp -r "
                                       f"{shlex.quote(args.data)} {DATA_MOUNT}/"))
        elif args.data.startswith("gs://"):
            bucket = args.data[len("gs://"):].split("/", 1)[0]
            commands.append(_ssh(args, f"{prepare} && mkdir -p {DATA_MOUNT}/{bucket} && "
                                       f"gcsfuse --implicit-dirs {shlex.quote(bucket)} "
                                       f"{DATA_MOUNT}/{bucket}"))
        else:
            commands.append(_ssh(args, f"test -e {shlex.quote(args.data)} || echo 'missing "
                                       f"{args.data} on this worker' >&2"))
    return commands


def data_path(data: str, copy: bool) -> str:
    """Where `setup --data=...` puts the data on the workers (for --config.data.path)."""
    if not data.startswith("gs://"):
        return data
    if copy:
        return f"{DATA_MOUNT}/{data.rstrip('/').rsplit('/', 1)[-1]}"
    return f"{DATA_MOUNT}/{data[len('gs://'):].rstrip('/')}"


def experiment_command(experiment_args: list) -> str:
    """The shell command each worker runs: python -m scm_jax.main ... --distributed."""
    args = list(experiment_args)
    if "--distributed" not in args:
        args.append("--distributed")
    return "python -m scm_jax.main " + " ".join(shlex.quote(a) for a in args)


def run(args) -> list:
    if not args.experiment:
        raise SystemExit("error: run needs the experiment's arguments after --, e.g. -- "
                         "--config=experiments/imagenet512.py:variant=xxl,stage=scd "
                         "--workdir=gs://BUCKET/run")
    log = f"{LOG_DIR}/{args.name}-$(hostname).log"
    command = (f"mkdir -p {LOG_DIR} && cd {REMOTE_DIR} && setsid nohup "
               f"{experiment_command(args.experiment)} > {log} 2>&1 < /dev/null &")
    return [_ssh(args, command)]


def status(args) -> list:
    return [_gcloud("compute", "tpus", "queued-resources", "describe", args.name,
                    f"--zone={args.zone}", project=args.project),
            _ssh(args, "pgrep -af scm_jax.main || echo 'not running'")]


def logs(args) -> list:
    return [_ssh(args, f"tail -n {args.lines} {LOG_DIR}/{args.name}-$(hostname).log",
                 worker=args.worker)]


def stop(args) -> list:
    """SIGTERM: every worker saves the same step and exits with status 143."""
    return [_ssh(args, "pkill -TERM -f scm_jax.main || true")]


def delete(args) -> list:
    return [_gcloud("compute", "tpus", "queued-resources", "delete", args.name,
                    f"--zone={args.zone}", "--force", "--quiet", project=args.project)]


SUBCOMMANDS = dict(create=create, setup=setup, run=run, status=status, logs=logs, stop=stop,
                   delete=delete)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in SUBCOMMANDS.items():
        s = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0] if fn.__doc__ else None)
        s.add_argument("--name", required=True, help="the TPU VM (and queued resource) name")
        s.add_argument("--zone", required=True)
        s.add_argument("--project", default=None)
        s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        if name == "create":
            s.add_argument("--accelerator", required=True, help="e.g. v5p-128, v6e-64")
            s.add_argument("--runtime-version", default=None)
            kind = s.add_mutually_exclusive_group()
            kind.add_argument("--spot", action="store_true")
            kind.add_argument("--reserved", action="store_true")
        if name == "setup":
            s.add_argument("--repo", default=None, help="git URL to clone on every worker "
                           "(default: copy this checkout)")
            s.add_argument("--ref", default=None, help="git ref to check out")
            s.add_argument("--local", default=".", help="the checkout to copy without --repo")
            s.add_argument("--data", default=None, help=f"gs://BUCKET/PATH, mounted with gcsfuse "
                           f"at {DATA_MOUNT}/BUCKET/PATH (or a path expected on the workers)")
            s.add_argument("--copy-data", action="store_true",
                           help="copy the gs:// data to local disk instead of mounting it")
        if name == "run":
            s.add_argument("experiment", nargs=argparse.REMAINDER,
                           help="-- then the arguments of python -m scm_jax.main")
        if name == "logs":
            s.add_argument("--worker", default="0")
            s.add_argument("--lines", type=int, default=100)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "experiment", None) and args.experiment[0] == "--":
        args.experiment = args.experiment[1:]
    commands = SUBCOMMANDS[args.command](args)
    if args.command == "setup" and args.data:
        print(f"# the data will be at {data_path(args.data, args.copy_data)} on every worker "
              f"(--config.data.path=...)", flush=True)
    for command in commands:
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            code = subprocess.call(command)
            if code:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
