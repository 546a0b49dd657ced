"""Continuous-time consistency models: sCT and sCD (sCM Sec. 4-5, Eq. 6-8, Alg. 1).

    L_sCM = E[ (e^{w_phi(t)} / D) || F_theta(x_t/sigma_d, t) - F_theta^-(x_t/sigma_d, t) - g ||^2
               - w_phi(t) ],
    g = cos(t) df^-/dt = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),

normalized as g / (||g|| + c), with r = min(1, step / H) the tangent warm-up. dx_t/dt is the
single-sample estimate cos(t) z - sin(t) x0 (sCT, `tangent='data'`) or the teacher's PF-ODE
sigma_d F_pretrain(x_t/sigma_d, t), guided on IN512 (sCD, `tangent='teacher'`). theta^- is
stop_gradient(theta), never an EMA.

One network evaluation per sample (`scm_loss`): the JVP's primal output is F_theta itself,
differentiated, and F^- under stop_gradient. (`scm_targets` is the two-pass form, a JVP at
stop-gradient parameters before the differentiated forward, kept for aVSD and for a tangent
pass in its own dtype, `jvp_dtype`.)
"""
import jax
import jax.numpy as jnp
from flax import struct

from scm_jax import trigflow
from scm_jax.errors import check
from scm_jax.objectives.consistency import (ConsistencyObjective, extend, normalize_tangent,
                                            warmup_ratio)
from scm_jax.objectives.randomness import Randomness
from scm_jax.objectives.regression import Targets, bcast, draw_noisy, f32, weighted_loss

TANGENTS = ("data", "teacher")
PRIOR_WEIGHTINGS = ("paper", "uniform")


def scm_tangent(net_fn, params, x_t, t, dxdt, cond, dropout_key, *, sigma_d, warmup_ratio,
                prior_weighting="paper", jvp_rearranged=True):
    """g = cos(t) df^-/dt with tangent warmup, via the rearranged JVP (sCM Sec. 5.1, Alg. 1).

    One `jax.jvp` of F^- at primal (x_t/sigma_d, t) with tangents (cos t sin t dx_t/dt,
    cos t sin t sigma_d) returns F^- and sigma_d cos t sin t dF^-/dt (sigma_d is already inside
    the result, not multiplied again). Then
        g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt).
    `params` must already be stop-gradient. Returns (F^- [B,...], g [B,...]) in float32.
    prior_weighting='uniform' replaces w(t) = 1/(sigma_d tan t) of Eq. 8 by 1, i.e. multiplies
    g by sigma_d tan t.

    jvp_rearranged=False is the un-rearranged form, for ablations: the JVP takes the tangents
    (dx_t/dt, sigma_d) and returns sigma_d dF^-/dt itself (grad_u F^- dx_t/dt + d_t F^- sigma_d
    with u = x_t / sigma_d), which is multiplied by cos t sin t only after the JVP. The same g in
    exact arithmetic; in the tangent pass's dtype its intermediate tangents are 1/(cos t sin t)
    times larger, which overflows float16 near t = 0 and t = pi/2 (Sec. 5.1). True (the
    rearranged JVP) is the paper's choice.
    """
    cs = bcast(jnp.cos(t) * jnp.sin(t), x_t)
    fn = lambda x, tt: net_fn(params, x, tt, cond, dropout_key)  # noqa: E731
    if jvp_rearranged:
        F_minus, dF = jax.jvp(fn, (x_t / sigma_d, t),
                              (cs * dxdt, jnp.cos(t) * jnp.sin(t) * sigma_d))
    else:
        F_minus, dF_dt = jax.jvp(fn, (x_t / sigma_d, t),
                                 (dxdt.astype(x_t.dtype), jnp.full_like(t, sigma_d)))
        dF = cs * f32(dF_dt)
    F_minus = f32(F_minus)
    cos_t = bcast(jnp.cos(t), x_t)
    g = -jnp.square(cos_t) * (sigma_d * F_minus - dxdt)
    g = g - warmup_ratio * (cs * x_t + f32(dF))
    if prior_weighting == "uniform":
        g = g * bcast(sigma_d * jnp.tan(t), x_t)
    return F_minus, g


@struct.dataclass
class TangentInputs:
    """What the sCM loss takes besides the parameters; all stop-gradient.

    x_t: [B,H,W,C]; t: [B]; cond: dict of [B] arrays; dxdt: [B,H,W,C] dx_t/dt (the data
    estimate, sCT, or the teacher's PF-ODE, sCD); dropout_key: the one key of the step's network
    evaluation; warmup: [] the tangent warm-up ratio r.
    """

    x_t: jax.Array
    t: jax.Array
    cond: dict
    dxdt: jax.Array
    dropout_key: jax.Array
    warmup: jax.Array


def scm_inputs(rng: Randomness, x0, cond, *, step, sigma_d, p_mean, p_std, warmup_steps,
               teacher=None) -> TangentInputs:
    """t, x_t and dx_t/dt (Alg. 1 lines 1-4): sCT (teacher=None: dx/dt = cos t z - sin t x0)
    or sCD (teacher: a function (x_t, t, cond) -> dx_t/dt, guided where the stage is)."""
    t, z, x_t = draw_noisy(rng, x0, sigma_d=sigma_d, p_mean=p_mean, p_std=p_std)
    if teacher is None:
        dxdt = trigflow.velocity_target(x0.astype(jnp.float32), z, t)
    else:
        dxdt = teacher(x_t, t, cond)
    return jax.lax.stop_gradient(TangentInputs(x_t, t, cond, dxdt, rng.dropout_key,
                                               warmup_ratio(step, warmup_steps)))


def scm_loss(params, inputs: TangentInputs, *, net_fn, weight_fn, sigma_d, tangent_c,
             tangent_norm="l2", prior_weighting="paper", jvp_rearranged=True):
    """The sCM loss (Eq. 8) with one network evaluation: the tangent pass's JVP at the live
    parameters, whose primal output F_theta(x_t/sigma_d, t) is the differentiated F and, under
    stop_gradient, F^- (theta^- = stopgrad(theta), Alg. 1), and whose tangent gives g, also
    stop-gradient. The gradient is that of `scm_targets` + `weighted_regression`; computing F
    once matters where the network's blocks are scanned (`model.scan_blocks`): XLA merges two
    identical unrolled forwards, never two loops. Reverse mode through the JVP never
    differentiates its tangent: the transpose of everything g depends on is dropped as unused
    (and the fused attention kernel takes stop-gradient inputs). Returns (loss, metrics)."""
    F, g = scm_tangent(net_fn, params["net"], inputs.x_t, inputs.t, inputs.dxdt, inputs.cond,
                       inputs.dropout_key, sigma_d=sigma_d, warmup_ratio=inputs.warmup,
                       prior_weighting=prior_weighting, jvp_rearranged=jvp_rearranged)
    g = jax.lax.stop_gradient(normalize_tangent(g, kind=tangent_norm, c=tangent_c))
    targets = Targets(inputs.x_t / sigma_d, inputs.t, inputs.cond, g, inputs.dropout_key,
                      consistency=True)
    return weighted_loss(params, F, targets, weight_fn=weight_fn)


def scm_targets(rng: Randomness, x0, cond, *, net_fn, params, step, sigma_d, p_mean, p_std,
                tangent_c, warmup_steps, tangent_norm="l2", prior_weighting="paper",
                jvp_rearranged=True, teacher=None) -> Targets:
    """Targets of sCT (teacher=None: dx/dt = cos t z - sin t x0) or sCD (Alg. 1) for
    `weighted_regression`: the tangent JVP at stop-gradient parameters, apart from the
    differentiated pass (aVSD's sCM term; `scm_loss` is the one-evaluation form).

    teacher: a function (x_t, t, cond) -> dx_t/dt for sCD. jvp_rearranged: see `scm_tangent`.
    """
    inputs = scm_inputs(rng, x0, cond, step=step, sigma_d=sigma_d, p_mean=p_mean, p_std=p_std,
                        warmup_steps=warmup_steps, teacher=teacher)
    _, g = scm_tangent(net_fn, jax.lax.stop_gradient(params), inputs.x_t, inputs.t, inputs.dxdt,
                       cond, inputs.dropout_key, sigma_d=sigma_d, warmup_ratio=inputs.warmup,
                       prior_weighting=prior_weighting, jvp_rearranged=jvp_rearranged)
    g = normalize_tangent(g, kind=tangent_norm, c=tangent_c)
    return jax.lax.stop_gradient(Targets(inputs.x_t / sigma_d, inputs.t, cond, g,
                                         inputs.dropout_key, consistency=True))


class SCM(ConsistencyObjective):
    """sCT (`tangent='data'`) and sCD (`tangent='teacher'`)."""

    name = "scm"
    SCHEMA = extend(ConsistencyObjective.SCHEMA,
                    tangent="data",   # the tangent's source: 'data' (sCT) | 'teacher' (sCD)
                    loss=dict(
        prior_weighting="paper",   # paper: w(t) = 1/(sigma_d tan t) | uniform
        jvp_rearranged=True,       # the rearranged JVP (Sec. 5.1, paper) | False: un-rearranged
    ))
    IDENTITY_KEYS = ("tangent",)

    @classmethod
    def check_section(cls, config, where: str) -> None:
        super().check_section(config, where)
        st = config[where]
        check(st.tangent in TANGENTS, f"{where}.tangent", st.tangent,
              "'data' (sCT) or 'teacher' (sCD)")
        check(st.loss.prior_weighting in PRIOR_WEIGHTINGS, f"{where}.loss.prior_weighting",
              st.loss.prior_weighting, f"one of {PRIOR_WEIGHTINGS}")
        check(isinstance(st.loss.jvp_rearranged, bool), f"{where}.loss.jvp_rearranged",
              st.loss.jvp_rearranged, "True (the rearranged JVP, sCM Sec. 5.1) or False")

    def loss_settings(self) -> dict:
        """The consistency settings, plus `jvp_rearranged` (sCM's tangent only: the discrete
        objective's finite difference has no JVP)."""
        return dict(super().loss_settings(), jvp_rearranged=self.cfg.loss.jvp_rearranged)

    @property
    def distills(self) -> bool:
        return self.cfg.tangent == "teacher"

    @property
    def shares_primal(self) -> bool:
        """True when the loss evaluates the network once (`scm_loss`): the tangent pass runs in
        the model's dtype, so its primal is the differentiated forward. With its own
        `jvp_dtype` the tangent pass is a second network evaluation (`scm_targets`)."""
        return (self.cfg.jvp_dtype or self.model_cfg.dtype) == self.model_cfg.dtype

    def targets(self, rng, batch, params, step, teacher, teacher_params):
        velocity = self.teacher_velocity(teacher, teacher_params) if self.distills else None
        cond = self.conditioning(rng, batch)
        settings = self.loss_settings()
        if self.shares_primal:
            return scm_inputs(rng, batch["image"], cond, step=step, teacher=velocity,
                              **{k: settings[k] for k in ("sigma_d", "p_mean", "p_std",
                                                          "warmup_steps")})
        return scm_targets(rng, batch["image"], cond, net_fn=self.net_tangent,
                           params=params["net"], step=step, teacher=velocity,
                           prior_weighting=self.cfg.loss.prior_weighting, **settings)

    def loss(self, params, targets):
        if not self.shares_primal:
            return super().loss(params, targets)
        settings = self.loss_settings()
        return scm_loss(params, targets, net_fn=self.net_tangent, weight_fn=self.weight_fn,
                        prior_weighting=self.cfg.loss.prior_weighting,
                        **{k: settings[k] for k in ("sigma_d", "tangent_c", "tangent_norm",
                                                    "jvp_rearranged")})
