"""The cost of one training step of each stage on this host, relative to the teacher's step.

Each stage's jitted step is compiled once from one initial state and one batch; its FLOPs come
from XLA's cost analysis of the compiled program (deterministic) and its time is the median of
`calls` calls from that same state after a warm-up call (so it times the step, not training).
The stages are measured back to back in one process, so time ratios share the machine's load.
Used by `benchmarks/step_cost.py` and the compute study (`scm_jax.studies.compute`).
"""
import statistics
import time

import jax


def cost_analysis(program) -> dict:
    """XLA's cost analysis of a lowered or compiled program as one dict (some versions return a
    list with one dict per computation, some None). A program lowered for devices this host
    only describes (a TPU topology, for the compile check) is analysed by the host's CPU client:
    XLA's HLO cost analysis of the unoptimized program, the same on any backend."""
    cost = program.cost_analysis()
    if cost is None and isinstance(program, jax.stages.Lowered):
        cost = _host_cost_analysis(program)
    return dict((cost[0] if isinstance(cost, (list, tuple)) else cost) or {})


def _host_cost_analysis(lowered):
    try:
        from jax._src.lib import _jax

        module = lowered.compiler_ir("hlo").as_hlo_module()
        return _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    except (ImportError, AttributeError, RuntimeError):   # no CPU backend, or the API moved
        return None


def flops_of(program) -> float:
    """FLOPs of a lowered or compiled program from XLA's cost analysis (NaN where the backend
    has none), with the matmul FLOPs of every loop trip after the first added: the analysis
    counts a loop body (scanned blocks) once (`hlo_loops`)."""
    from scm_jax import hlo_loops

    flops = float(cost_analysis(program).get("flops", float("nan")))
    text = (program.as_text(dialect="hlo") if isinstance(program, jax.stages.Lowered)
            else program.as_text())
    return flops + hlo_loops.loop_extra_flops(text)["extra_flops"]


def median_seconds(fn, calls: int) -> float:
    """Median wall time of `calls` calls of fn() (blocked until ready), after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config, stages, batch: dict, *, calls: int = 10, log=None,
            keep_compiled: bool = False) -> dict:
    """{stage: {seconds, flops, time_ratio, flops_ratio}} for `stages` of `config` on `batch`
    ({'image': [B, H, W, C], 'label': [B]}); the ratios are to the first stage's step (the
    teacher's, by convention). A distilling stage's teacher is a random teacher EMA of the
    config's architecture (the cost does not depend on the teacher's values). With
    `keep_compiled`, each row also holds its compiled step (`compiled`)."""
    from scm_jax import objectives

    shape = batch["image"].shape[1:]

    def random_ema(name):
        built = objectives.build(config, name)
        return built, built.init_state(jax.random.PRNGKey(0), shape).nets["net"].ema

    rows = {}
    for name in stages:
        objective = objectives.build(config, name)
        state = objective.init_state(jax.random.PRNGKey(1), shape)
        teacher, tparams = None, None
        if objective.distills:
            teacher_objective, teacher_ema = random_ema(objective.teacher_stage)
            guide_objective, guide_ema = (random_ema(objective.guide_stage)
                                          if getattr(objective, "guide_stage", None)
                                          else (None, None))
            teacher = objectives.Teacher(teacher_objective, guide_objective)
            tparams = teacher.pack(teacher_ema, guide_ema)
        step = jax.jit(objective.make_step(teacher))
        compiled = step.lower(state, batch, tparams).compile()
        rows[name] = dict(seconds=median_seconds(lambda: compiled(state, batch, tparams), calls),
                          flops=flops_of(compiled))
        if keep_compiled:
            rows[name]["compiled"] = compiled
        if log:
            log(f"{name:8s} median {rows[name]['seconds'] * 1e3:8.1f} ms   "
                f"{rows[name]['flops'] / 1e9:8.2f} GFLOP")
    base = rows[stages[0]]
    for r in rows.values():
        r.update(time_ratio=r["seconds"] / base["seconds"], flops_ratio=r["flops"] / base["flops"])
    return rows
