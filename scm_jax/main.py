"""Entry point: python -m scm_jax.main --config=experiments/<name>.py[:arg] --workdir=DIR
                                      [--config.<key>=<value> ...] [--distributed ...]

Runs config.stage: a training stage (teacher | scd | sct | dscd | ...), eval, or 'all'
(config.pipeline in order, each stage in <workdir>/<stage>, skipping work already done).
Re-running the same command resumes from the last checkpoints.

Multi-process runs start one process per host (or per group of devices) with --distributed:
on TPU VMs and SLURM clusters `jax.distributed.initialize()` finds its peers by itself; anywhere
else pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I.

Exit status: 0 when every stage did what was asked; 2 for a known failure (a bad config key
or value, a missing teacher or dataset, a mismatched checkpoint), printed as one line
`error: ...`; 143 (SIGTERM) or 130 (SIGINT) when a signal stopped training after a checkpoint
at a step every process agreed on (re-run the same command to resume).
"""
import sys

from absl import app, flags, logging

flags.DEFINE_string("config", None, "Experiment config: experiments/<name>.py[:arg]. Entries are "
                    "overridden with --config.<key>=<value>.")
flags.DEFINE_string("workdir", None, "Directory (or gs:// bucket path) for checkpoints, "
                    "metrics, samples and results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process runs).")
flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0 "
                    "(auto-detected on TPU VMs and SLURM).")
flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

_OVERRIDES = []   # the --config.<key>=<value> arguments, applied by configs.load


def run(config, workdir, *, log=print) -> None:
    """Dispatches config.stage. Importable so tests and notebooks can call it directly."""
    from scm_jax import configs, files, train

    configs.validate(config)
    if config.dry_run:
        dry_run(config, log=log)
        return
    for name in configs.pipeline(config):
        if name == configs.EVAL:
            from scm_jax import evaluate

            evaluate.evaluate_all(config, workdir, log=log)
        else:
            if files.is_primary():
                log(f"=== stage {name} ===")
            train.train_stage(config, name, workdir, log=log)


def dry_run(config, *, log=print) -> int:
    """Prints the resolved config, the backbone's parameter table and its count (from
    jax.eval_shape: nothing is allocated, so it works for the largest presets on a laptop).
    The stage shown is config.stage, or the pipeline's first training stage. Returns the count."""
    from clu import parameter_overview

    from scm_jax import configs, objectives
    from scm_jax.data import data_shape

    stages = configs.training_stages(config)
    name = config.stage if config.stage in stages else next(
        s for s in config.pipeline if s in stages)
    objective = objectives.build(config, name)
    abstract, _ = objective.abstract_state(data_shape(config.data))
    net = abstract.nets["net"].params
    count = int(parameter_overview.count_parameters(net))
    log(config)
    log(parameter_overview.get_parameter_overview(net, include_stats=False, max_lines=60))
    line = f"backbone parameters (stage {name}): {count:,} ({count / 1e6:.1f}M)"
    paper = config.get("paper_params_m", 0.0)
    if paper:
        line += (f"; the paper's table: {paper}M ({100 * (count / 1e6 / paper - 1):+.1f}%: the "
                 f"sCM changes, see docs/paper-scale.md 'Parameter counts')")
    log(line)
    return count


def parse_flags(argv):
    """absl flags, with every --config.<key>[=<value>] set aside for configs.load (a key alone
    means true). Unknown keys and bad values are reported by the loader, one line each."""
    from scm_jax.configs import split_overrides

    overrides, rest = split_overrides(argv)
    _OVERRIDES.extend(overrides)
    try:
        return FLAGS(rest)
    except flags.Error as err:
        sys.exit(f"error: {err}\nPass --helpshort or --helpfull to see help on flags.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    from scm_jax import configs
    from scm_jax.cli import EXIT_USER_ERROR, one_line
    from scm_jax.errors import UserError
    from scm_jax.preemption import StageInterrupted

    try:
        if FLAGS.distributed:
            import jax

            kwargs = {k: getattr(FLAGS, k) for k in ("coordinator_address", "num_processes",
                                                     "process_id")
                      if getattr(FLAGS, k) is not None}
            jax.distributed.initialize(**kwargs)
            from scm_jax import processes

            # Every process here before any compile (a barrier, not a collective).
            processes.barrier("all processes started")
        config = configs.load(FLAGS.config, _OVERRIDES)
        run(config, FLAGS.workdir, log=lambda msg: print(msg, flush=True))
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except StageInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
