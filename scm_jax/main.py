"""Entry point: python -m scm_jax.main --config=experiments/<name>.py[:args] --workdir=DIR

Runs config.stage: one of teacher | scd | sct | dscd | eval, or 'all' (the whole pipeline in
order, each stage in <workdir>/<stage>, skipping work already done). Re-running the same command
resumes from the last checkpoints. On a multi-host pod, pass --distributed on every worker.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run(config, workdir: str, *, log=print) -> None:
    """Dispatches config.stage. Importable so tests and notebooks can call it directly."""
    from scm_jax import configs, train

    configs.validate(config)
    if config.dry_run:
        dry_run(config, log=log)
        return
    stages = tuple(config.get("pipeline", configs.PIPELINE)) if config.stage == "all" else (
        config.stage,)
    for name in stages:
        if name == "eval":
            from scm_jax import evaluate

            if config.data.name != "digits":
                raise ValueError(f"stage=eval evaluates the digits experiment only; FID / "
                                 f"FD-DINOv2 for data.name={config.data.name!r} is not built yet")

            evaluate.evaluate_all(config, workdir, log=log)
        else:
            log(f"=== stage {name} ===")
            train.train_stage(config, name, workdir, log=log)


def dry_run(config, *, log=print) -> int:
    """Prints the resolved config and the backbone's parameter count (jax.eval_shape: nothing
    is allocated, so it works for the largest presets on a laptop). Returns the count."""
    import jax

    from scm_jax import train
    from scm_jax import train_step as ts

    stage = ts.build_stage(config, "scd" if config.model.get("guidance_input") else "teacher")
    abstract = train.abstract_train_state(stage, train.image_shape(config))
    count = sum(x.size for x in jax.tree.leaves(abstract.params["net"]))
    log(config)
    line = f"backbone parameters: {count:,} ({count / 1e6:.1f}M)"
    paper = config.get("paper_params_m", 0.0)
    if paper:
        line += (f"; the paper's table: {paper}M ({100 * (count / 1e6 / paper - 1):+.1f}%: the "
                 f"sCM changes, see README 'Parameter counts')")
    log(line)
    return count


def parse_flags(argv):
    """absl flag parsing, with a one-line error for a --config.<key> the config does not define."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as err:
        name = str(err).strip("\"'")
        culprits = [a for a in argv if a.startswith("--config.") and name in a.split("=")[0]]
        sys.exit(f"FATAL: unknown config key {name!r} in {' '.join(culprits) or argv}: "
                 f"the config file defines no such entry (print them with --config.dry_run=True)")
    except flags.Error as err:
        sys.exit(f"FATAL flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    if FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    run(FLAGS.config, FLAGS.workdir, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
