"""`stage=all`: config.pipeline's stages, each started once the stages it reads have finished,
up to `config.pipeline_workers` training stages at a time.

A training stage reads the stage whose EMA it starts from or distills (`teacher_stage`) and a
guided student its guiding network's stage (`guide_stage`); 'eval' reads every training stage
before it in the pipeline. With one worker (the default) the stages run in the pipeline's
order. With more, each stage that waits only for finished ones starts on a worker thread of
this process, as its own jitted program on the same devices, and logs under its own name. That
is for one process (a multi-process run trains its stages in order) on a machine the stages do
not fill: on the digits pipeline (a 0.7 M parameter U-Net on a 2-core CPU) one step keeps about
1.3 cores busy and compiles use one, so two stages side by side shorten the pipeline; on
accelerators two stages also share the devices' memory. Every stage computes what it computes
in order: it depends only on its own config and the finished stages it reads
(tests/test_pipeline_workers.py).

A SIGTERM or SIGINT stops every running stage at its next step with a checkpoint (exit 143 /
130, re-run to resume), as in order; when a stage fails, the others stop the same way and the
first failure is raised.
"""
import concurrent.futures

import jax

from scm_jax import configs, files, objectives, preemption


def workers(config, log=print) -> int:
    """config.pipeline_workers (default 1; checked by `config_checks.validate`); 1 in a
    multi-process run, where every process must train the same stage at the same time (its
    collectives and barriers)."""
    n = int(config.get("pipeline_workers", 1))
    if n > 1 and jax.process_count() > 1:
        if files.is_primary():
            log(f"config.pipeline_workers = {n}: {jax.process_count()} processes train the "
                f"stages in order (side by side only in a single process)")
        return 1
    return n


def needs(config, name: str, order: tuple) -> set:
    """The stages of `order` that stage `name` reads (they must finish before it starts)."""
    before = set(order[:order.index(name)])
    if name == configs.EVAL:
        return {s for s in before if s in configs.training_stages(config)}
    objective = objectives.build(config, name)
    return {s for s in (objective.teacher_stage, getattr(objective, "guide_stage", None))
            if s in before}


def run(config, stages: tuple, train_one, eval_all, *, log=print) -> None:
    """Runs `stages` (config.pipeline's order): train_one(name) per training stage, eval_all()
    for 'eval', with up to `workers(config)` training stages at a time."""
    n = workers(config, log)
    if n == 1:
        for name in stages:
            _announce(name, log)
            eval_all() if name == configs.EVAL else train_one(name)
        return
    waits = {name: needs(config, name, stages) for name in stages}
    done, running = set(), {}
    failure = None
    with preemption.SharedStop(), concurrent.futures.ThreadPoolExecutor(n) as pool:
        pending = list(stages)
        while pending or running:
            ready = [s for s in pending if waits[s] <= done] if failure is None else []
            for name in ready:
                if name == configs.EVAL:
                    if running:
                        break   # evaluates in this thread once every stage before it is done
                    pending.remove(name)
                    _announce(name, log)
                    eval_all()
                    done.add(name)
                    continue
                if len(running) >= n:
                    break
                pending.remove(name)
                _announce(name, log, beside=sorted(running.values()))
                running[pool.submit(train_one, name)] = name
            if not running:
                if failure is not None or not pending:
                    break
                raise RuntimeError(f"stages {pending} wait for stages that are not run")
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                err = future.exception()
                if err is None:
                    done.add(name)
                elif failure is None:
                    failure = err
                    if not isinstance(err, preemption.StageInterrupted):
                        log(f"[{name}] failed ({type(err).__name__}); stopping the other stages "
                            f"at their next step")
                    preemption.request_stop()
    if failure is not None:
        raise failure


def _announce(name: str, log, beside=()) -> None:
    if files.is_primary():
        log(f"=== stage {name} ===" + (f" (beside {', '.join(beside)})" if beside else ""))
