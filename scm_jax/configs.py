"""The shape of an experiment config, its argument parser and its validation.

Experiments (`experiments/<dataset>.py`) build their `get_config(arg)` from the sections here so
every dataset shares one schema:

    config.stage            teacher | scd | sct | dscd | eval | all
    config.data / .model / .mesh / .eval
    config.teacher          the diffusion teacher's training stage (nested in every student)
    config.scd / .sct       continuous-time CM stages (Alg. 1), initialized from the teacher EMA
    config.dscd             the discrete-time CM baseline (Alg. 2)

`validate(config)` runs before anything touches a workdir and raises ValueError naming the key,
the bad value and what was expected.
"""
import math

import ml_collections

STAGES = ("teacher", "scd", "sct", "dscd", "eval", "all")
TRAIN_STAGES = ("teacher", "scd", "sct", "dscd")
PIPELINE = ("teacher", "scd", "sct", "dscd", "eval")


def parse_arg(arg: str | None, defaults: dict) -> ml_collections.ConfigDict:
    """Parses 'key=value,key=value' (e.g. 'variant=tiny,stage=scd') against known keys."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
        out[key] = type(defaults[key])(value) if defaults[key] is not None else value
    return ml_collections.ConfigDict(out)


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, schedule="constant", t_ref=1,
        warmup_steps=0, grad_clip=0.0, force_finite=True))
    _merge(cfg, overrides)
    return cfg


def stage_config(kind: str, **overrides) -> ml_collections.ConfigDict:
    """A training stage: objective, optimizer, EMA, length and logging cadence.

    kind: 'diffusion' (teacher), 'scm' (sCT/sCD) or 'discrete' (dsCD).
    """
    cfg = ml_collections.ConfigDict(dict(
        kind=kind,
        steps=1000,
        batch_size=128,
        dropout=0.0,
        label_dropout=0.0,          # teacher only: p(null label) for classifier-free guidance
        tangent="data",             # scm: 'data' (sCT) or 'teacher' (sCD)
        loss=ml_collections.ConfigDict(dict(
            p_mean=-1.0, p_std=1.6,   # log-normal proposal of ln(sigma_d tan t) (Alg. 1)
            tangent_c=0.1,            # c of g / (||g|| + c) (Sec. 4.2)
            warmup_steps=10000,       # H of r = min(1, step / H) (Alg. 1)
            tangent_norm="l2",        # l2 | rms | clip | none
            prior_weighting="paper",  # paper: w(t) = 1/(sigma_d tan t) (the cos t in Eq. 8) | uniform
            num_points=1024,          # discrete: N grid points (Alg. 2)
        )),
        guidance=ml_collections.ConfigDict(dict(scale_min=1.0, scale_max=1.0)),  # sCD teacher CFG
        jvp_dtype="",               # compute dtype of the tangent pass; '' = model.dtype
        optimizer=optimizer_config(),
        ema=ml_collections.ConfigDict(dict(kind="power", value=0.05)),
        log_every=50,
        checkpoint_every=500,
        keep_checkpoints=2,
        sample_every=0,             # 0: a sample grid only at the end; -1: none
        checkpoint_dir="",          # teacher: where sCD/sCT find it ('' = <workdir>/teacher)
    ))
    _merge(cfg, overrides)
    return cfg


def _merge(cfg: ml_collections.ConfigDict, overrides: dict) -> None:
    """Recursive update: nested dicts update nested sections instead of replacing them."""
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"unknown stage config key {key!r}; expected one of {sorted(cfg)}")
        if isinstance(value, (dict, ml_collections.ConfigDict)) and isinstance(
                cfg[key], ml_collections.ConfigDict):
            _merge(cfg[key], dict(value))
        else:
            cfg[key] = value


def _check(cond: bool, key: str, value, expected: str):
    if not cond:
        raise ValueError(f"config.{key} = {value!r} is invalid: expected {expected}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every value the run depends on; raises ValueError naming the first bad one."""
    _check(config.stage in STAGES, "stage", config.stage, f"one of {STAGES}")
    _check(config.data.sigma_d > 0, "data.sigma_d", config.data.sigma_d, "> 0")
    m = config.model
    for key in ("channels", "num_blocks", "hidden_size", "depth"):   # whichever the backbone has
        if key in m:
            _check(m[key] > 0, f"model.{key}", m[key], "a positive integer")
    _check(m.num_classes >= 0, "model.num_classes", m.num_classes, ">= 0")
    _check(config.mesh.data == -1 or config.mesh.data >= 1, "mesh.data", config.mesh.data,
           "-1 (all devices) or a positive device count")
    _check(config.mesh.get("fsdp", 1) >= 1, "mesh.fsdp", config.mesh.get("fsdp", 1),
           "a positive device count")
    pipeline = tuple(config.get("pipeline", PIPELINE))
    _check(all(name in PIPELINE for name in pipeline), "pipeline", pipeline,
           f"stages among {PIPELINE}")
    for name in TRAIN_STAGES:
        st = config[name]
        kind = {"teacher": "diffusion", "dscd": "discrete"}.get(name, "scm")
        _check(st.kind == kind, f"{name}.kind", st.kind, repr(kind))
        _check(st.steps >= 0, f"{name}.steps", st.steps, ">= 0")
        _check(st.batch_size > 0, f"{name}.batch_size", st.batch_size, "> 0")
        _check(0.0 <= st.dropout < 1.0, f"{name}.dropout", st.dropout, "in [0, 1)")
        _check(0.0 <= st.label_dropout < 1.0, f"{name}.label_dropout", st.label_dropout, "in [0, 1)")
        _check(st.loss.p_std > 0, f"{name}.loss.p_std", st.loss.p_std, "> 0")
        _check(math.isfinite(st.loss.p_mean), f"{name}.loss.p_mean", st.loss.p_mean, "finite")
        _check(st.loss.tangent_c >= 0, f"{name}.loss.tangent_c", st.loss.tangent_c, ">= 0")
        _check(st.loss.warmup_steps >= 0, f"{name}.loss.warmup_steps", st.loss.warmup_steps, ">= 0")
        _check(st.loss.tangent_norm in ("l2", "rms", "clip", "none"), f"{name}.loss.tangent_norm",
               st.loss.tangent_norm, "one of l2, rms, clip, none")
        _check(st.loss.prior_weighting in ("paper", "uniform"), f"{name}.loss.prior_weighting",
               st.loss.prior_weighting, "'paper' or 'uniform'")
        _check(st.loss.num_points >= 2, f"{name}.loss.num_points", st.loss.num_points, ">= 2")
        _check(st.tangent in ("data", "teacher"), f"{name}.tangent", st.tangent,
               "'data' (sCT) or 'teacher' (sCD)")
        g = st.guidance
        _check(0.0 <= g.scale_min <= g.scale_max, f"{name}.guidance", (g.scale_min, g.scale_max),
               "0 <= scale_min <= scale_max")
        _check(st.jvp_dtype in ("", "float32", "bfloat16", "float16"), f"{name}.jvp_dtype",
               st.jvp_dtype, "'', float32, bfloat16 or float16")
        _check(st.log_every > 0 and st.checkpoint_every > 0, f"{name}.log_every/checkpoint_every",
               (st.log_every, st.checkpoint_every), "positive step counts")
        _check(st.keep_checkpoints >= 1, f"{name}.keep_checkpoints", st.keep_checkpoints, ">= 1")
    _check(config.scd.tangent == "teacher", "scd.tangent", config.scd.tangent, "'teacher'")
    _check(config.sct.tangent == "data", "sct.tangent", config.sct.tangent, "'data'")
    guided = config.scd.guidance.scale_max != 1.0 or config.scd.guidance.scale_min != 1.0
    if guided:
        _check(m.num_classes > 0 and config.teacher.label_dropout > 0, "scd.guidance",
               (config.scd.guidance.scale_min, config.scd.guidance.scale_max),
               "1.0 unless the teacher is class-conditional and trained with label_dropout > 0")
    if config.scd.guidance.scale_min != config.scd.guidance.scale_max:
        _check(m.guidance_input, "model.guidance_input", m.guidance_input,
               "True when scd samples a range of guidance scales")
