"""The TrigFlow diffusion objective: the teacher (sCM Sec. 3, Eq. 4; EDM2 App. D).

    L_Diff = E_{x0, z, t} [ (e^{w_phi(t)} / D) || F_theta(x_t / sigma_d, t) - v_t / sigma_d ||^2
                             - w_phi(t) ],   v_t = cos(t) z - sin(t) x0,

with ln(sigma_d tan t) ~ N(P_mean, P_std^2). The squared error in F equals EDM2's weighting
lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 of the denoiser error rewritten in
TrigFlow, so w_phi(t) plays the role of EDM2's -logvar. Label dropout trains the null label
(index num_classes) that classifier-free guidance uses.

A diffusion stage may build a smaller or unconditional version of config.model (its `model`
section): EDM2's guiding network (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Sec. 5: a conditional network guided by a small unconditional
one, D_w = D_u + w (D_c - D_u)) is such a stage, distilled beside the teacher by a guided sCD
stage whose `guidance.network` names it.
"""
import jax.numpy as jnp

from scm_jax import trigflow
from scm_jax.errors import ConfigError, check
from scm_jax.objectives.randomness import LABEL_DROP, Randomness
from scm_jax.objectives.regression import (RegressionObjective, Targets, check_adaptive_weighting,
                                           check_proposal, draw_noisy)


def diffusion_targets(rng: Randomness, x0, cond, *, sigma_d, p_mean, p_std) -> Targets:
    """x_t / sigma_d and the regression target v_t / sigma_d (Eq. 4)."""
    t, z, x_t = draw_noisy(rng, x0, sigma_d=sigma_d, p_mean=p_mean, p_std=p_std)
    target = trigflow.velocity_target(x0.astype(jnp.float32), z, t) / sigma_d
    return Targets(x_t / sigma_d, t, cond, target, rng.dropout_key, consistency=False)


class Diffusion(RegressionObjective):
    """A TrigFlow diffusion model (the teacher of sCD and the initialization of every CM)."""

    name = "diffusion"
    sampler = "ode"
    SCHEMA = dict(
        label_dropout=0.0,                        # p(null label), for classifier-free guidance
        loss=dict(p_mean=-1.0, p_std=1.6,         # ln(sigma_d tan t) ~ N(P_mean, P_std^2)
                  adaptive_weighting=True),       # learned w_phi(t) (EDM2) | False: w = 0
        # This stage's network where it differs from config.model (e.g. EDM2's guiding network):
        model=dict(channels=0,                    # base width; 0 = config.model.channels
                   num_classes=-1),               # -1 = config.model's; 0 = unconditional
    )

    @classmethod
    def check_section(cls, config, where: str) -> None:
        st = config[where]
        check(0.0 <= st.label_dropout < 1.0, f"{where}.label_dropout", st.label_dropout,
              "in [0, 1)")
        check_proposal(config, where)
        check_adaptive_weighting(config, where)
        own = st.model
        check(own.channels >= 0, f"{where}.model.channels", own.channels,
              "a width > 0, or 0 for config.model.channels")
        if own.channels and "channels" not in config.model:
            raise ConfigError(f"config.{where}.model.channels = {own.channels!r} is invalid: "
                              f"the {config.model.name!r} backbone has no 'channels' width; "
                              f"expected 0")
        check(own.num_classes >= -1, f"{where}.model.num_classes", own.num_classes,
              "-1 (config.model's), 0 (unconditional) or a class count")
        if own.num_classes == 0 and st.label_dropout > 0:
            raise ConfigError(f"config.{where}.label_dropout = {st.label_dropout!r} is invalid "
                              f"for an unconditional network ({where}.model.num_classes = 0): "
                              f"expected 0.0")

    def model_config(self, model):
        """config.model with this stage's own width and classes (`model` section); a diffusion
        model never takes a guidance-scale input: only a guided student does (sCM Sec. 7), and
        it starts from this model with that input zero-initialized."""
        model = super().model_config(model)
        own = self.cfg.model
        with model.unlocked():
            model.guidance_input = False
            if own.channels:
                model.channels = own.channels
            if own.num_classes >= 0:
                model.num_classes = own.num_classes
        return model

    def conditioning(self, rng: Randomness, batch) -> dict:
        cond = super().conditioning(rng, batch)
        if "y" in cond and self.cfg.label_dropout > 0:
            null = rng.bernoulli(LABEL_DROP, self.cfg.label_dropout)
            cond["y"] = jnp.where(null, self.model_cfg.num_classes, cond["y"])
        return cond

    def targets(self, rng, batch, params, step, teacher, teacher_params) -> Targets:
        loss = self.cfg.loss
        return diffusion_targets(rng, batch["image"], self.conditioning(rng, batch),
                                 sigma_d=self.sigma_d, p_mean=loss.p_mean, p_std=loss.p_std)
