"""The frozen diffusion model a distillation objective queries: F_pretrain of sCM Alg. 1."""
import jax.numpy as jnp

from scm_jax import guidance
from scm_jax.objectives.regression import f32


class Teacher:
    """dx_t/dt = sigma_d F_pretrain(x_t / sigma_d, t) of a trained diffusion stage, optionally
    guided (sCM Sec. 7: the IN512 sCD teacher).

    Built from the teacher stage's objective, and from a guiding stage's when the unconditional
    branch of guidance is another network (EDM2, Karras et al. 2024, Sec. 5: a conditional
    network guided by a small unconditional one, D_w = D_g + w (D_c - D_g)); without one,
    guidance is classifier-free, the same network's null-label output. The parameters are an
    argument of every call, so the jitted step takes them as an input with their own sharding:
    the teacher's EMA, or {'net': teacher EMA, 'guide': guiding EMA} with a guiding network.
    """

    def __init__(self, objective, guide=None):
        self.net_eval = objective.net_eval
        self.sigma_d = objective.sigma_d
        self.null_label = objective.model_cfg.num_classes   # the label CFG dropout trained
        self.guide_eval = guide.net_eval if guide is not None else None
        # A conditional guiding network (EDM2's autoguidance) sees the labels too.
        self.guide_conditional = guide is not None and guide.model_cfg.num_classes > 0

    @property
    def has_guide(self) -> bool:
        return self.guide_eval is not None

    def pack(self, net_params, guide_params=None):
        """The parameter tree `velocity` takes (see the class docstring)."""
        if self.has_guide != (guide_params is not None):
            raise ValueError("the guiding network's parameters are given exactly when the "
                             "teacher has a guiding network")
        return dict(net=net_params, guide=guide_params) if self.has_guide else net_params

    def net_params(self, params):
        """The teacher network's EMA within `params` (what a student starts from)."""
        return params["net"] if self.has_guide else params

    def velocity(self, params, x_t, t, cond, scale=None):
        """x_t [B, ...], t [B], cond {'y': [B]} -> dx_t/dt [B, ...] (float32).

        scale: None (no guidance) or the per-sample guidance scale [B]. The teacher sees labels
        only: a guidance scale in `cond` is an input of the student alone. Guidance combines
        F, which is the same as combining the denoisers: at fixed (x_t, t) the TrigFlow
        denoiser is affine in F with the same coefficients for both networks (sCM Eq. 23).
        """
        x = x_t / self.sigma_d
        y = cond.get("y")
        net = self.net_params(params)
        labelled = {"y": y} if y is not None else {}
        if scale is None:
            F = self.net_eval(net, x, t, labelled)
        elif self.has_guide:
            F_cond = self.net_eval(net, x, t, labelled)
            F_guide = self.guide_eval(params["guide"], x, t,
                                      labelled if self.guide_conditional else {})
            F = guidance.classifier_free_guidance(F_cond, F_guide, jnp.asarray(scale))
        elif y is None:
            F = self.net_eval(net, x, t, {})
        else:
            F = guidance.guided(lambda xx, tt, yy: self.net_eval(net, xx, tt, {"y": yy}),
                                y, self.null_label, scale)(x, t)
        return self.sigma_d * f32(F)
