"""What the command-line entry points share: flags parsed with the `--config.<key>=<value>`
overrides set aside, `--help` listing each flag on one line, errors as one line with exit
status 2, the optional `jax.distributed` start, and not probing for a TPU on a machine without
one.

    def define(fv):                       # the command's own flags, on its own FlagValues
        flags.DEFINE_string("out", None, "where to write", flag_values=fv)
    def body(fv, overrides):              # the work; a UserError becomes 'error: ...', exit 2
        config = cli.load_config(fv, overrides)
        ...
    sys.exit(cli.run_command(__doc__, define, body))
"""
import glob
import os
import sys

EXIT_USER_ERROR = 2   # a known failure: bad config, missing input, mismatched checkpoint


HELP_ARGUMENTS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def one_line(err: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(err).splitlines())


def print_error(err: BaseException | str) -> None:
    """`error: <message on one line>` on stderr."""
    print(f"error: {one_line(err) if isinstance(err, BaseException) else err}", file=sys.stderr,
          flush=True)


def flag_help(fv) -> str:
    """One line per flag of `fv` (an absl FlagValues): name, help, default."""
    lines = []
    for name in sorted(fv):
        flag = fv[name]
        if flag.name != name:   # a short alias
            continue
        default = "" if flag.default in (None, "") else f" (default: {flag.default_as_str})"
        shown = f"[no]{name}" if flag.boolean else name
        lines.append(f"  --{shown}: {' '.join(flag.help.split())}{default}")
    return "\n".join(lines)


def define_config_flags(fv, *, config_help: str = "experiments/<name>.py[:arg]; entries "
                        "overridden with --config.<key>=<value>", distributed: bool = True) -> None:
    """--config (required) and, with `distributed`, --distributed on `fv`."""
    from absl import flags

    flags.DEFINE_string("config", None, config_help, flag_values=fv)
    flags.mark_flag_as_required("config", flag_values=fv)
    if distributed:
        flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first "
                          "(multi-process runs; peers found on TPU VMs and SLURM)", flag_values=fv)


def load_config(fv, overrides, *, validate: bool = True):
    """jax.distributed started when --distributed is set, then `configs.load(--config,
    overrides)` (validated unless `validate` is false)."""
    from scm_jax import config_checks, configs

    if "distributed" in fv and fv.distributed:
        import jax

        jax.distributed.initialize()
    config = configs.load(fv.config, overrides)
    if validate:
        config_checks.validate(config)
    return config


def run_command(doc: str, define, body, argv=None, *, takes_overrides: bool = True) -> int:
    """Runs a command: `define(fv)` declares its flags on a fresh FlagValues; argv (sys.argv by
    default, program name first) is parsed with every --config.<key>[=<value>] set aside (a
    command that reads no config passes `takes_overrides=False`: one is then an error);
    `--help` (or -h, --helpshort, --helpfull) prints `doc` and the flags, one line each, and
    returns 0; a bad flag or a `UserError` from `body(fv, overrides)` prints one line and
    returns 2; otherwise `body`'s return value (None means 0)."""
    from absl import flags

    from scm_jax.configs import split_overrides
    from scm_jax.errors import ConfigError, UserError

    fv = flags.FlagValues()
    define(fv)
    overrides, rest = split_overrides(sys.argv if argv is None else argv)
    if any(arg in HELP_ARGUMENTS for arg in rest[1:]):
        print(doc.strip() + "\n\nFlags:\n" + flag_help(fv), flush=True)
        return 0
    try:
        fv(rest)
    except flags.Error as err:
        print_error(f"{one_line(err)} (--help lists the flags)")
        return EXIT_USER_ERROR
    try:
        if overrides and not takes_overrides:
            raise ConfigError(f"--config.{overrides[0]}: this command takes no --config.<key> "
                              "overrides")
        return body(fv, overrides) or 0
    except UserError as err:
        print_error(err)
        return EXIT_USER_ERROR


def program_argv(argv):
    """argv for `run_command` from a `main(argv)` that takes the arguments alone (as the
    benchmarks' do, so tests can call them): None stays None (sys.argv), else the program name
    is put first."""
    return None if argv is None else [sys.argv[0], *argv]


def skip_absent_tpu() -> None:
    """On a machine with neither a TPU nor a GPU, use the CPU without probing for a TPU or GPU.

    libtpu (installed by the [test] and [tpu] extras) prints initialization errors ("unexpected
    worker hostname", ...) when JAX probes for a TPU on a host that has none, and JAX's CUDA
    plugin (the [test] and [gpu] extras) a `cuInit` traceback for an absent GPU; it still
    describes GPUs to compile for (`scm_jax.gpu_nodes`) with the CPU as the platform. Run once,
    when the package is imported (`scm_jax/__init__.py`), so every command is covered. The check reads
    the PCI bus (Google's vendor id is 0x1ae0) and the NVIDIA / ROCm device files; an explicit
    JAX_PLATFORMS always wins.
    """
    if os.environ.get("JAX_PLATFORMS"):
        return
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() == "0x1ae0":
                return
        except OSError:
            continue
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):
        return
    import jax

    try:
        jax.config.update("jax_platforms", "cpu")
    except Exception:   # noqa: BLE001 - backends already initialized by the caller: leave them
        pass
