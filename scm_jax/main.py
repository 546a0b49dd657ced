"""Entry point: python -m scm_jax.main --config=experiments/<name>.py[:arg] --workdir=DIR
                                      [--config.<key>=<value> ...] [--distributed ...]

Runs config.stage: a training stage (teacher | scd | sct | dscd | ...), eval, or 'all'
(config.pipeline in order, each stage in <workdir>/<stage>, skipping work already done; with
config.pipeline_workers > 1 the stages that wait only for finished ones side by side:
`scm_jax/pipeline.py`).
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


def run(config, workdir, *, log=print) -> None:
    """Dispatches config.stage. Importable so tests and notebooks can call it directly."""
    from scm_jax import config_checks, configs, pipeline, train

    config_checks.validate(config)
    if config.dry_run:
        dry_run(config, log=log)
        return

    def evaluate_all():
        from scm_jax import evaluate

        evaluate.evaluate_all(config, workdir, log=log)

    pipeline.run(config, configs.pipeline(config),
                 lambda name: train.train_stage(config, name, workdir, log=log), evaluate_all,
                 log=log)


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


def _define_flags(fv) -> None:
    from absl import flags

    from scm_jax import cli

    cli.define_config_flags(fv)
    flags.DEFINE_string("workdir", None, "directory (or gs:// bucket path) for checkpoints, "
                        "metrics, samples and results", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "with --distributed: HOST:PORT of process "
                        "0 (found by itself on TPU VMs and SLURM)", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "with --distributed: the number of processes",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "with --distributed: this process's index",
                         flag_values=fv)


def _run(fv, overrides) -> int:
    from absl import logging

    from scm_jax import configs
    from scm_jax.preemption import StageInterrupted

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    if fv.distributed:
        import jax

        kwargs = {k: fv[k].value for k in ("coordinator_address", "num_processes", "process_id")
                  if fv[k].value is not None}
        jax.distributed.initialize(**kwargs)
        from scm_jax import processes

        # Every process here before any compile (a barrier, not a collective).
        processes.barrier("all processes started")
    config = configs.load(fv.config, overrides)
    try:
        run(config, fv.workdir, log=lambda msg: print(msg, flush=True))
    except StageInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    return 0


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    from scm_jax import cli

    return cli.run_command(__doc__, _define_flags, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
