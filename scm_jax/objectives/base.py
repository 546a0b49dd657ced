"""What every objective is: its networks, its state, its config section, its pure step.

A training stage is a config section (`config.teacher`, `config.scd`, ...) whose `objective`
key names a class registered in `scm_jax.objectives`. The class

- owns the section's schema (`section()`: the keys every stage has, `COMMON`, plus its own
  `SCHEMA`) and its validation (`validate_section`, run before anything is written);
- declares its trained networks (`networks`: name -> `Network`, each with its own optimizer,
  optional EMA and post-update projection) and whether it reads a teacher (`teacher_stage`,
  `distills`);
- computes its stop-gradient targets (`targets`) and its differentiated loss (`loss`); the
  step built here (`make_step`) does the rest, identically for every objective:

      key   = fold_in(state.rng, state.step)
      tgt   = targets(key, batch, stopgrad(params), step, teacher)     # nothing differentiated
      grads = grad(loss)(params, tgt)                                  # one differentiated pass
      for each network: optimizer update, projection, EMA

Nothing here knows meshes, data loading, checkpoints or logging (that is `train.py`).
"""
import abc
import dataclasses
import zlib
from typing import Any, Callable, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from scm_jax import ema as ema_lib
from scm_jax import optimizers, sharding, tree_checks
from scm_jax.errors import ConfigError, check
from scm_jax.networks import BACKBONES, bind_apply, build_network, init_backbone
from scm_jax.networks.attention import resolve_attention_impl
from scm_jax.objectives.randomness import Randomness


@struct.dataclass
class NetState:
    """One trained network: params, its optimizer's state, its EMA (None: keeps none), and the
    power EMAs tracked for post-hoc EMA ({'ema0': ..., 'ema1': ...} in the order of the stage's
    `ema.posthoc_sigma_rels`; None when none are tracked)."""

    params: Any
    opt_state: Any
    ema: Any
    posthoc: Any = None


@struct.dataclass
class TrainState:
    step: jax.Array          # int32 [], optimizer steps taken
    rng: jax.Array           # uint32 [2], the stage's base key (see `stage_key`)
    nets: dict               # network name -> NetState


@dataclasses.dataclass(frozen=True)
class Network:
    """A network an objective trains. `init(key, example) -> params` may return logically
    partitioned (boxed) params; `project` runs after every optimizer update."""

    module: nn.Module
    init: Callable
    optimizer: optax.GradientTransformation
    ema: Any = None                      # the stage's `ema` section, or None
    project: Callable = dataclasses.field(default=lambda params: params)


def stage_key(seed: int, name: str) -> jax.Array:
    """The stage's base key, derived from its name: adding or reordering stages leaves every
    other stage's randomness unchanged."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


# Keys of every stage section, with their defaults.
COMMON = dict(
    objective="",              # the registered objective (objectives.OBJECTIVES) this stage trains
    steps=1000,                # optimizer steps of the stage (a re-run resumes up to this)
    batch_size=128,            # the global batch of one optimizer step
    microbatches=1,            # gradient accumulation: the batch in this many sequential parts
    dropout=0.0,               # the network's dropout rate in this stage
    log_every=50,              # steps between metrics rows and progress lines
    checkpoint_every=500,      # steps between checkpoints (and at the end, and on SIGTERM)
    keep_checkpoints=2,        # the newest checkpoints kept
    sample_every=0,            # 0: a sample grid only at the end; -1: none
    eval_every=0,              # >0: score the EMA every this many steps (config.eval; 0: never)
    checkpoint_dir="",         # where this stage's checkpoints live ('' = <workdir>/<stage>)
    # A step whose loss, gradients or updated parameters are not finite is not applied (the
    # state is kept, the step counted); `max_consecutive` such steps in a row stop the run.
    nonfinite=dict(
        skip=True,             # a non-finite step is not applied (False: stop at the first)
        max_consecutive=5,     # this many non-finite steps in a row stop the run
    ),
)


def _posthoc_start(net: "Network", params):
    """The tracked post-hoc EMAs of a fresh network (each starts at its parameters), or None."""
    rels = ema_lib.posthoc_sigma_rels(net.ema)
    return {ema_lib.posthoc_key(i): params for i in range(len(rels))} if rels else None


def _merge(cfg: ml_collections.ConfigDict, overrides: dict, where: str) -> None:
    """Recursive update: nested dicts update nested sections; unknown keys are errors."""
    for key, value in overrides.items():
        if key not in cfg:
            raise ConfigError(f"unknown config key {where}.{key}; expected one of {sorted(cfg)}")
        if isinstance(value, (dict, ml_collections.ConfigDict)) and isinstance(
                cfg[key], ml_collections.ConfigDict):
            _merge(cfg[key], dict(value), f"{where}.{key}")
        else:
            cfg[key] = value



class Objective(abc.ABC):
    """Base class; subclasses set `name`, `sampler`, `SCHEMA` and implement `targets`/`loss`."""

    name: ClassVar[str] = ""
    sampler: ClassVar[str] = ""        # 'ode' (a diffusion model) | 'consistency' (f_theta)
    SCHEMA: ClassVar[dict] = {}        # the objective's own keys of its section
    IDENTITY_KEYS: ClassVar[tuple] = ()  # keys of the section that change a checkpoint's meaning

    # --- Config section -------------------------------------------------------------------
    @classmethod
    def section(cls, **overrides) -> ml_collections.ConfigDict:
        """A stage section for this objective: COMMON + SCHEMA, an optimizer and an EMA."""
        cfg = ml_collections.ConfigDict(dict(COMMON, **cls.SCHEMA,
                                             optimizer=optimizers.default_config(),
                                             ema=ema_lib.default_config()))
        cfg.objective = cls.name
        _merge(cfg, overrides, "<stage>")
        return cfg

    @classmethod
    def validate_section(cls, config, where: str) -> None:
        """Every check of config.<where>, before anything is written (ConfigError names the key)."""
        st = config[where]
        check(st.steps >= 1, f"{where}.steps", st.steps,
              ">= 1 (a stage that trains no step would produce nothing)")
        check(st.batch_size > 0, f"{where}.batch_size", st.batch_size, "> 0")
        check(st.microbatches >= 1 and st.batch_size % st.microbatches == 0,
              f"{where}.microbatches", st.microbatches,
              f"a count >= 1 that divides batch_size = {st.batch_size}")
        check(0.0 <= st.dropout < 1.0, f"{where}.dropout", st.dropout, "in [0, 1)")
        check(st.log_every > 0, f"{where}.log_every", st.log_every, "a positive step count")
        check(st.checkpoint_every > 0, f"{where}.checkpoint_every", st.checkpoint_every,
              "a positive step count")
        check(st.keep_checkpoints >= 1, f"{where}.keep_checkpoints", st.keep_checkpoints, ">= 1")
        check(st.sample_every >= -1, f"{where}.sample_every", st.sample_every,
              "a step count, 0 (a grid at the end) or -1 (none)")
        check(st.eval_every >= 0, f"{where}.eval_every", st.eval_every,
              "a step count, or 0 (no evaluation during training)")
        check(st.eval_every == 0 or "eval" in config, f"{where}.eval_every", st.eval_every,
              "0: this experiment has no eval section")
        check(st.nonfinite.max_consecutive >= 1, f"{where}.nonfinite.max_consecutive",
              st.nonfinite.max_consecutive, "a step count >= 1")
        optimizers.validate(st.optimizer, f"{where}.optimizer")
        ema_lib.validate(st.ema, f"{where}.ema")
        cls.check_section(config, where)

    @classmethod
    def check_section(cls, config, where: str) -> None:
        """The objective's own checks of config.<where> (override)."""

    # --- Construction ---------------------------------------------------------------------
    def __init__(self, stage_name: str, stage: ml_collections.ConfigDict,
                 model: ml_collections.ConfigDict, sigma_d: float,
                 platform: str | None = None):
        """stage_name: the section's name (`config.<stage_name>`); stage: that section (this
        objective's schema); model: config.model; sigma_d: config.data.sigma_d; platform:
        where the networks run (it resolves attention_impl 'auto'; default: JAX's).
        `objectives.build(config, stage_name)` picks these sections out of a config."""
        self.stage_name, self.cfg, self.sigma_d = stage_name, stage, float(sigma_d)
        self.model_cfg = self.model_config(model)
        with self.model_cfg.unlocked():
            self.model_cfg.attention_impl = resolve_attention_impl(
                self.model_cfg.attention_impl, platform)
        # `model_cfg.attention_impl` is the tangent pass's (see `ConsistencyObjective`); the
        # fused forward+JVP kernel has no transpose rule, so `jax.grad` never meets it: the
        # differentiated network takes its partner, resolved for the same platform (the
        # shipped flash attention on TPU/GPU, XLA on CPU or where the config says 'xla').
        self.differentiated_attention_impl = resolve_attention_impl(
            self.model_cfg.attention_impl, platform, differentiated=True)
        plain = self.model_cfg.copy_and_resolve_references()
        with plain.unlocked():
            plain.attention_impl = self.differentiated_attention_impl
        self.module = build_network(plain, dropout=self.cfg.dropout)
        self.net_train = bind_apply(self.module, train=True)
        eval_fn = bind_apply(self.module, train=False)
        self.net_eval = lambda p, x, t, cond, key=None: eval_fn(p, x, t, cond)
        self.optimizer = optimizers.build_optimizer(self.cfg.optimizer)
        self.networks = self.build_networks()

    def model_config(self, model):
        """config.model (`model`) as this objective's networks use it, a copy (override to
        change an entry)."""
        return model.copy_and_resolve_references()

    def build_networks(self) -> dict:
        """name -> Network: the backbone 'net' with the stage's EMA (override to add more)."""
        project = getattr(BACKBONES[self.model_cfg.name], "project_params", lambda p: p)

        def init_net(key, example):
            x, t, cond = example
            return init_backbone(self.module, key, x, t, cond.get("y"), cond.get("guidance"))

        return {"net": Network(self.module, init_net, self.optimizer, ema=self.cfg.ema,
                               project=project)}

    # --- Teacher ----------------------------------------------------------------------------
    @property
    def teacher_stage(self) -> str | None:
        """The stage whose EMA this one starts from or distills (None: needs no teacher)."""
        return None

    @property
    def distills(self) -> bool:
        """True when the step queries the teacher (its params are an input of every step)."""
        return False

    @property
    def teacher_initialized(self) -> tuple:
        """The networks a fresh stage starts from the teacher's EMA (with `init_from_teacher`)."""
        return ("net",)

    # --- State ------------------------------------------------------------------------------
    def example_inputs(self, image_shape, batch_size: int = 1):
        """Dummy (x, t, cond) for initialization; shapes only matter."""
        x = jnp.zeros((batch_size,) + tuple(image_shape), jnp.float32)
        t = jnp.ones((batch_size,), jnp.float32)
        cond = {}
        if self.model_cfg.num_classes:
            cond["y"] = jnp.zeros((batch_size,), jnp.int32)
        if self.model_cfg.guidance_input:
            cond["guidance"] = jnp.ones((batch_size,), jnp.float32)
        return x, t, cond

    def init_state(self, key, image_shape, *, boxed: bool = False) -> TrainState:
        """Fresh parameters, optimizer states and EMAs (an EMA starts at its parameters).

        boxed=True keeps the backbones' `nn.LogicallyPartitioned` boxes (on params, EMA and the
        optimizer's per-parameter state alike): `jax.eval_shape` of it is what the shardings
        are derived from. The state a step takes is the unboxed one.
        """
        *keys, k_rng = jax.random.split(key, len(self.networks) + 1)
        example = self.example_inputs(image_shape)
        nets = {}
        for k, (name, net) in zip(keys, self.networks.items()):
            params = net.init(k, example)
            nets[name] = NetState(params=params, opt_state=net.optimizer.init(params),
                                  ema=params if net.ema is not None else None,
                                  posthoc=_posthoc_start(net, params))
        state = TrainState(step=jnp.zeros((), jnp.int32), rng=k_rng, nets=nets)
        return state if boxed else nn.meta.unbox(state)

    def abstract_state(self, image_shape, mesh=None, rules=None):
        """(ShapeDtypeStructs of the TrainState, their NamedShardings or None) from one trace
        of the init. With a mesh, weights are split by the logical rules (FSDP) and scalars and
        unnamed leaves replicated, and the structs carry their shardings (restore targets)."""
        boxed = jax.eval_shape(
            lambda: self.init_state(jax.random.PRNGKey(0), image_shape, boxed=True))
        if mesh is None:
            return nn.meta.unbox(boxed), None
        shardings = sharding.tree_shardings(boxed, mesh, rules)
        return sharding.with_shardings(nn.meta.unbox(boxed), shardings), shardings

    def with_params(self, state: TrainState, name: str, params) -> TrainState:
        """Network `name` restarted at `params` (its EMA too, its optimizer state fresh)."""
        net = self.networks[name]
        # Own buffers for params and EMA: the step donates the state, and a teacher's
        # parameters (possibly passed to the same step) must alias neither.
        params = jax.tree.map(jnp.copy, params)
        ema = jax.tree.map(jnp.copy, params) if net.ema is not None else None
        posthoc = _posthoc_start(net, params)
        if posthoc is not None:
            posthoc = jax.tree.map(jnp.copy, posthoc)
        nets = dict(state.nets, **{name: NetState(params, net.optimizer.init(params), ema,
                                                  posthoc)})
        return state.replace(nets=nets)

    # --- The step ---------------------------------------------------------------------------
    def conditioning(self, rng, batch) -> dict:
        """cond of the batch: labels (if class-conditional); subclasses add the rest."""
        cond = {}
        if self.model_cfg.num_classes:
            cond["y"] = batch["label"].astype(jnp.int32)
        return cond

    @abc.abstractmethod
    def targets(self, rng, batch, params, step, teacher, teacher_params):
        """Everything not differentiated, from stop-gradient `params` (name -> params).

        rng: the (micro)batch's `regression.Randomness` (a key per sample, a dropout key);
        batch: its rows; teacher / teacher_params: the `Teacher` and its EMA when distilling.
        """

    @abc.abstractmethod
    def loss(self, params, targets):
        """(scalar loss, metrics dict) of the differentiated pass."""

    def identity(self) -> dict:
        """What this stage's checkpoints mean, beside the architecture and the dataset."""
        return dict(objective=self.name, **{k: self.cfg[k] for k in self.IDENTITY_KEYS})

    def make_step(self, teacher=None):
        """step(state, batch, teacher_params) -> (state, metrics); pure and jittable.

        batch: dict(image=[B, H, W, C] float, label=[B] int). `teacher` (an
        `objectives.Teacher`) is required when the objective distills. With `microbatches`
        k > 1 the targets and gradients are computed in k sequential parts (a `lax.scan`; part
        i holds rows i, i + k, ..., so each part stays spread over all devices) and averaged
        before the one optimizer update. Every sample draws its randomness from its index in
        the global batch (`Randomness`), so without dropout the update equals the whole
        batch's up to float rounding; dropout masks are drawn per part. metrics['nonfinite']
        is 1 when the loss, a gradient or an updated parameter was not finite; with
        `nonfinite.skip` that update is not applied (the state stays the last finite one).
        """
        if self.distills and teacher is None:
            raise ValueError(f"stage {self.stage_name} distills a teacher but none was given")
        batch_size, parts = self.cfg.batch_size, self.cfg.microbatches
        skip_nonfinite = bool(self.cfg.nonfinite.skip)

        def value_and_grad(params, key, rows, start_or_index, part, step, teacher_params):
            rng = Randomness.for_rows(key, start_or_index, part)
            tgt = self.targets(rng, rows, jax.lax.stop_gradient(params), step, teacher,
                               teacher_params)
            return jax.value_and_grad(self.loss, has_aux=True)(params, tgt)

        def step(state: TrainState, batch, teacher_params):
            chex.assert_rank(batch["image"], 4)
            chex.assert_shape(batch["label"], batch["image"].shape[:1])
            key = jax.random.fold_in(state.rng, state.step)
            params = {name: net.params for name, net in state.nets.items()}
            index = jnp.arange(batch["image"].shape[0], dtype=jnp.uint32)
            if parts == 1:
                (_, metrics), grads = value_and_grad(params, key, batch, index, 0, state.step,
                                                     teacher_params)
            else:
                split = lambda a: a.reshape(a.shape[0] // parts, parts, *a.shape[1:]).swapaxes(0, 1)  # noqa: E731
                rows, index = jax.tree.map(split, (batch, index))

                def accumulate(total, xs):
                    part_rows, part_index, part = xs
                    (_, metrics), grads = value_and_grad(params, key, part_rows, part_index, part,
                                                         state.step, teacher_params)
                    return jax.tree.map(jnp.add, total, (grads, metrics)), None

                zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                    lambda: value_and_grad(params, key, jax.tree.map(lambda a: a[0], rows),
                                           index[0], 0, state.step, teacher_params)))
                zeros = (zeros[1], zeros[0][1])
                (grads, metrics), _ = jax.lax.scan(accumulate, zeros,
                                                   (rows, index, jnp.arange(parts)))
                grads, metrics = jax.tree.map(lambda a: a / parts, (grads, metrics))
            nets = {}
            for name, net in state.nets.items():
                spec = self.networks[name]
                updates, opt_state = spec.optimizer.update(grads[name], net.opt_state,
                                                           net.params)
                new = spec.project(optax.apply_updates(net.params, updates))
                ema, posthoc = net.ema, net.posthoc
                if ema is not None:
                    weight = ema_lib.ema_weight(spec.ema.kind, spec.ema.value, state.step,
                                                batch_size)
                    ema = ema_lib.update_ema(ema, new, weight)
                if posthoc is not None:   # EDM2's tracked power EMAs (post-hoc EMA)
                    posthoc = {
                        ema_lib.posthoc_key(i): ema_lib.update_ema(
                            posthoc[ema_lib.posthoc_key(i)], new,
                            ema_lib.ema_weight("power", sigma_rel, state.step, batch_size))
                        for i, sigma_rel in enumerate(ema_lib.posthoc_sigma_rels(spec.ema))}
                nets[name] = NetState(new, opt_state, ema, posthoc)
            finite = (tree_checks.finite(metrics["loss"]) & tree_checks.finite(grads)
                      & tree_checks.finite({name: net.params for name, net in nets.items()}))
            if skip_nonfinite:   # keep the last finite state; the step still counts
                nets = jax.tree.map(lambda new, old: jnp.where(finite, new, old), nets,
                                    state.nets)
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)
            return state.replace(step=state.step + 1, nets=nets), metrics

        return step
