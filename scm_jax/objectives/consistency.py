"""What the consistency objectives share (sCM Sec. 4.2, Alg. 1 and 2): the tangent's
normalization and warm-up, the teacher's (guided) velocity, the guidance-scale input of a
guided student, the tangent pass's network, and initialization from the teacher's EMA.

A consistency model is f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t)
(sCM Eq. 5); its loss regresses F_theta onto F_theta^- + g, where g is the (normalized,
warmed-up) tangent the subclass computes (`scm.SCM`, `discrete.DiscreteCM`).
"""
import copy

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from scm_jax.networks import bind_apply, build_network
from scm_jax.errors import check
from scm_jax.objectives.randomness import GUIDANCE
from scm_jax.objectives.regression import (RegressionObjective, bcast, check_adaptive_weighting,
                                           check_proposal, per_sample_sq_norm)

TANGENT_NORMS = ("l2", "rms", "clip", "none")
JVP_DTYPES = ("", "float32", "bfloat16", "float16")


def extend(schema: dict, **more) -> dict:
    """A copy of `schema` with `more` merged in (nested dicts merged, not replaced)."""
    out = copy.deepcopy(schema)
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = extend(out[key], **value)
        else:
            out[key] = value
    return out


def normalize_tangent(g, *, kind="l2", c=0.1):
    """Tangent normalization g / (||g|| + c) with the per-sample l2 norm (sCM Sec. 4.2).

    'rms' divides by ||g||/sqrt(D) + c instead (which changes the effective c by sqrt(D));
    'clip' is clip(g, -1, 1) (Fig. 5a); 'none' leaves g alone.
    """
    if kind == "l2":
        return g / (bcast(jnp.sqrt(per_sample_sq_norm(g)), g) + c)
    if kind == "rms":
        d = np.prod(g.shape[1:])
        return g / (bcast(jnp.sqrt(per_sample_sq_norm(g) / d), g) + c)
    if kind == "clip":
        return jnp.clip(g, -1.0, 1.0)
    if kind == "none":
        return g
    raise ValueError(f"unknown tangent normalization {kind!r}; expected one of {TANGENT_NORMS}")


def warmup_ratio(step, warmup_steps):
    """r = min(1, step / H) (Alg. 1); H counts optimizer steps. H = 0 disables warmup."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


class ConsistencyObjective(RegressionObjective):
    """Base of the consistency objectives; subclasses define `targets` (and `distills`)."""

    sampler = "consistency"
    SCHEMA = dict(
        loss=dict(
            p_mean=-1.0, p_std=1.6,   # log-normal proposal of ln(sigma_d tan t) (Alg. 1)
            tangent_c=0.1,            # c of g / (||g|| + c) (Sec. 4.2)
            warmup_steps=10000,       # H of r = min(1, step / H) (Alg. 1)
            tangent_norm="l2",        # l2 | rms | clip | none
            adaptive_weighting=True,  # learned w_phi(t) (Eq. 8) | False: w = 0, the plain mean
        ),
        guidance=dict(
            scale_min=1.0, scale_max=1.0,  # guidance scale of the teacher (and student input)
            # guidance's unconditional branch: the teacher's null label (CFG), or a diffusion stage
            network="",   # '' = the teacher's own null-label output; else a stage name ('guide')
        ),
        jvp_dtype="",                 # compute dtype of the tangent pass; '' = model.dtype
        teacher_stage="teacher",      # the diffusion stage this one starts from (and distills)
        init_from_teacher=True,       # start from the teacher's EMA (sCM App. G.2: always)
        teacher_sigma_rel=0.0,        # the teacher's post-hoc EMA of this sigma_rel (0: its own)
    )

    @classmethod
    def check_section(cls, config, where: str) -> None:
        st = config[where]
        check_proposal(config, where)
        check_adaptive_weighting(config, where)
        check(st.loss.tangent_c >= 0, f"{where}.loss.tangent_c", st.loss.tangent_c, ">= 0")
        check(st.loss.warmup_steps >= 0, f"{where}.loss.warmup_steps", st.loss.warmup_steps,
              ">= 0")
        check(st.loss.tangent_norm in TANGENT_NORMS, f"{where}.loss.tangent_norm",
              st.loss.tangent_norm, f"one of {TANGENT_NORMS}")
        check(0.0 <= st.teacher_sigma_rel < 0.28, f"{where}.teacher_sigma_rel",
              st.teacher_sigma_rel, "0 (the teacher's own EMA) or a post-hoc EMA's sigma_rel "
              "in (0, 0.28) (python -m scm_jax.posthoc_ema)")
        check(st.jvp_dtype in JVP_DTYPES, f"{where}.jvp_dtype", st.jvp_dtype,
              f"one of {JVP_DTYPES} ('' = model.dtype)")
        g = st.guidance
        check(0.0 <= g.scale_min <= g.scale_max, f"{where}.guidance",
              (g.scale_min, g.scale_max), "0 <= scale_min <= scale_max")
        if g.network:
            stages = [name for name in config if isinstance(config[name], ConfigDict)
                      and config[name].get("objective") == "diffusion"
                      and name != st.teacher_stage]
            check(g.network in stages, f"{where}.guidance.network", g.network,
                  f"'' (the teacher's own unconditional output) or a diffusion stage other "
                  f"than the teacher: one of {stages}")
        elif (g.scale_min, g.scale_max) != (1.0, 1.0):
            teacher = config.get(st.teacher_stage)
            check(config.model.num_classes > 0 and teacher is not None
                  and teacher.get("label_dropout", 0.0) > 0, f"{where}.guidance",
                  (g.scale_min, g.scale_max),
                  "1.0 unless the teacher is class-conditional and trained with label_dropout > 0")
        if g.scale_min != g.scale_max:
            check(config.model.guidance_input, "model.guidance_input",
                  config.model.guidance_input,
                  f"True when {where} samples a range of guidance scales")

    def __init__(self, stage_name, stage, model, sigma_d, platform=None):
        super().__init__(stage_name, stage, model, sigma_d, platform)
        # The tangent pass may run in its own dtype and with the fused attention+JVP kernel
        # (`model.attention_impl`); it is never differentiated.
        jvp_dtype = self.cfg.jvp_dtype or self.model_cfg.dtype
        tangent_module = self.module
        if jvp_dtype != self.model_cfg.dtype or self.model_cfg.attention_impl != "xla":
            tangent_module = build_network(self.model_cfg, dropout=self.cfg.dropout,
                                           dtype=jvp_dtype)
        self.net_tangent = bind_apply(tangent_module, train=True)

    @property
    def teacher_stage(self):
        return self.cfg.teacher_stage if (self.cfg.init_from_teacher or self.distills) else None

    @property
    def guided(self) -> bool:
        g = self.cfg.guidance
        return (g.scale_min, g.scale_max) != (1.0, 1.0)

    @property
    def guide_stage(self) -> str | None:
        """The diffusion stage whose EMA is the guided teacher's unconditional branch (None:
        the teacher's own null-label output, or no guidance)."""
        return (self.cfg.guidance.network or None) if self.distills and self.guided else None

    def conditioning(self, rng, batch) -> dict:
        """Labels, and for a guided student the guidance scales s ~ U[scale_min, scale_max]
        (sCM Sec. 7: the student takes s as an input; the teacher is guided with the same s)."""
        cond = super().conditioning(rng, batch)
        if self.model_cfg.guidance_input:
            g = self.cfg.guidance
            cond["guidance"] = rng.uniform(GUIDANCE, g.scale_min, g.scale_max)
        return cond

    def teacher_velocity(self, teacher, teacher_params):
        """(x_t, t, cond) -> dx_t/dt of the teacher, CFG-guided when the stage is (Alg. 1)."""
        g = self.cfg.guidance

        def velocity(x_t, t, cond):
            if not self.guided:
                scale = None
            elif "guidance" in cond:
                scale = cond["guidance"]
            else:
                scale = jnp.full(t.shape, g.scale_min, jnp.float32)
            return teacher.velocity(teacher_params, x_t, t, cond, scale)

        return velocity

    def loss_settings(self) -> dict:
        """The keyword arguments every consistency target function takes."""
        loss = self.cfg.loss
        return dict(sigma_d=self.sigma_d, p_mean=loss.p_mean, p_std=loss.p_std,
                    tangent_c=loss.tangent_c, warmup_steps=loss.warmup_steps,
                    tangent_norm=loss.tangent_norm)
