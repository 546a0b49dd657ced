"""The frozen diffusion model a distillation objective queries: F_pretrain of sCM Alg. 1."""
from scm_jax import guidance
from scm_jax.objectives.regression import f32


class Teacher:
    """dx_t/dt = sigma_d F_pretrain(x_t / sigma_d, t) of a trained diffusion stage, optionally
    classifier-free guided (sCM Sec. 7: the IN512 sCD teacher).

    Built from the teacher stage's objective; its parameters (the teacher's EMA) are an
    argument of every call, so the jitted step takes them as an input with their own sharding.
    """

    def __init__(self, objective):
        self.net_eval = objective.net_eval
        self.sigma_d = objective.sigma_d
        self.null_label = objective.model_cfg.num_classes   # the label CFG dropout trained

    def velocity(self, params, x_t, t, cond, scale=None):
        """x_t [B, ...], t [B], cond {'y': [B]} -> dx_t/dt [B, ...] (float32).

        scale: None (no guidance) or the per-sample CFG scale [B]. The teacher sees labels only:
        a guidance scale in `cond` is an input of the student alone.
        """
        x = x_t / self.sigma_d
        y = cond.get("y")
        if scale is None or y is None:
            F = self.net_eval(params, x, t, {"y": y} if y is not None else {})
        else:
            F = guidance.guided(lambda xx, tt, yy: self.net_eval(params, xx, tt, {"y": yy}),
                                y, self.null_label, scale)(x, t)
        return self.sigma_d * f32(F)
