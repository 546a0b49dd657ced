"""Adaptive variational score distillation (aVSD; sCM App. C), alone or added to sCD.

The generator is the consistency model's 1-step map (sCM App. C; Table 5's t_max)
    g_theta(z') = f_theta(z', t_max) = cos(t_max) z' - sin(t_max) sigma_d F_theta(z'/sigma_d, t_max),
z' ~ N(0, sigma_d^2 I). Five networks train in one step, each with its own optimizer:

    net          the generator / CM (EMA kept), from the teacher's EMA (sCM App. G.2)
    weight       w_phi(t) of the sCD term (sCM Eq. 8)
    fake         F_phi: a TrigFlow diffusion model of the generator's samples (no EMA), from
                 the teacher's EMA [paper silent; the natural start: it equals the teacher's
                 score before the generator moves]
    fake_weight  the adaptive weighting of F_phi's diffusion loss [paper silent: EDM2's, as
                 every diffusion loss here]
    vsd_weight   w_psi(t), the learned weighting of L_aVSD

    L = scd_weight * L_sCM(theta, phi) + lambda * L_aVSD(theta, psi) + L_Diff(F_phi)

    L_aVSD = E[(e^{w_psi(t)} / D) ||g(z') - sg(g(z')) + F_pre(x_t/sigma_d, t) - sg(F_phi)(x_t/sigma_d, t)||^2
               - w_psi(t)],   x_t = cos t sg(g(z')) + sin t z,   ln(sigma_d tan t) ~ N(0.4, 2.0),

whose gradient in theta is the VSD gradient cos^2 t / (sigma_d sin t) (F_pre - F_phi)^T dg/dtheta
up to the learned weighting (App. C: the score of a TrigFlow model F is -(cos t sigma_d F +
sin t x_t) / (sigma_d^2 sin t)); L_Diff is the diffusion loss (Eq. 4, EDM2 weighting) of F_phi on
x0 = sg(g(z')) with its own proposal N(-0.8, 1.6). F_pre is the teacher, classifier-free guided
at the student's scale as in sCD. One phi update per theta update (Table 5), simultaneously: the
generator's term sees F_phi before this step's update.

Choices where the paper is silent (each a key of the section): the VSD term and the fake
score's loss draw their own z', t and noise (per-sample streams), not the sCD term's; F_phi
takes the same inputs as the student (labels and the guidance scale); `scd_weight` = 0 is aVSD
alone (the `vsd` stage), 1 is sCD + aVSD (`scd_vsd`).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from scm_jax import optimizers, trigflow
from scm_jax.errors import check
from scm_jax.networks import AdaptiveWeight, bind_apply, build_network, init_backbone
from scm_jax.objectives.base import Network
from scm_jax.objectives.consistency import extend
from scm_jax.objectives.diffusion import diffusion_targets
from scm_jax.objectives.randomness import FAKE_SCORE, VSD_LATENT, VSD_NOISE, VSD_TIME
from scm_jax.objectives.regression import (Targets, check_proposal, draw_noisy, f32,
                                           per_sample_sq_norm, weighted_regression)
from scm_jax.objectives.scm import SCM, scm_targets


@struct.dataclass
class VSDTargets:
    """Everything the differentiated pass needs, all stop-gradient.

    scm: the sCD term's targets (None when scd_weight = 0); latent: z' [B, ...] of the generator;
    cond: its conditioning; t: [B] the VSD times; direction: F_pre - F_phi^- [B, ...] at x_t;
    dropout_key: the generator pass's (the same in `targets` and `loss`, so g - sg(g) is 0);
    fake: the fake score's diffusion targets on x0 = sg(g(z')).
    """

    scm: Targets | None
    latent: jax.Array
    cond: dict
    t: jax.Array
    direction: jax.Array
    dropout_key: jax.Array
    fake: Targets


def avsd_loss(generate, params, latent, direction, w):
    """L_aVSD of one (micro)batch: mean((e^w / D) ||g(z') - sg(g(z')) + direction||^2 - w).

    generate(params, latent) -> g [B, ...]; direction = F_pre - F_phi^- [B, ...] (stop-gradient);
    w = w_psi(t) [B]. The value of g - sg(g) is 0, so the residual is the direction and the
    gradient in the generator's params is (2 e^w / D) direction^T dg/dparams (App. C's VSD
    gradient, weighted). Returns (loss, per-sample ||residual||^2 / D [B]).
    """
    g = generate(params, latent)
    residual = g - jax.lax.stop_gradient(g) + direction
    raw = per_sample_sq_norm(residual) / np.prod(g.shape[1:])
    return jnp.mean(jnp.exp(w) * raw - w), raw


class AdaptiveVSD(SCM):
    """aVSD (`scd_weight` = 0) or sCD + lambda aVSD (`scd_weight` = 1); always distills."""

    name = "avsd"
    SCHEMA = extend(SCM.SCHEMA,
                    tangent="teacher",   # aVSD distills: always 'teacher'
                    scd_weight=1.0,      # the sCD term's weight: 0 = aVSD alone, 1 = sCD + aVSD
                    vsd=dict(
        weight=1.0,                  # lambda_VSD (Table 5: 1.0)
        p_mean=0.4, p_std=2.0,       # L_aVSD's proposal of ln(sigma_d tan t) (Table 5)
        fake_p_mean=-0.8, fake_p_std=1.6,   # L_Diff(phi)'s proposal (Table 5)
        fake_dropout=0.0,            # F_phi's dropout (Table 5: 0% S, 10% M..XXL)
        fake_lr=0.0,                 # F_phi's learning rate; 0 = the stage's (Table 5: the CM lr)
    ))
    IDENTITY_KEYS = ()

    @classmethod
    def check_section(cls, config, where: str) -> None:
        super().check_section(config, where)
        st = config[where]
        v = st.vsd
        check(st.tangent == "teacher", f"{where}.tangent", st.tangent,
              "'teacher': aVSD distills the teacher")
        check(st.scd_weight >= 0, f"{where}.scd_weight", st.scd_weight,
              ">= 0 (0: aVSD alone, 1: sCD + aVSD)")
        check(v.weight >= 0, f"{where}.vsd.weight", v.weight, ">= 0")
        check(v.p_std > 0 and v.fake_p_std > 0, f"{where}.vsd", (v.p_std, v.fake_p_std),
              "p_std > 0 and fake_p_std > 0")
        check(np.isfinite(v.p_mean) and np.isfinite(v.fake_p_mean), f"{where}.vsd",
              (v.p_mean, v.fake_p_mean), "finite p_mean and fake_p_mean")
        check(0.0 <= v.fake_dropout < 1.0, f"{where}.vsd.fake_dropout", v.fake_dropout,
              "in [0, 1)")
        check(v.fake_lr >= 0, f"{where}.vsd.fake_lr", v.fake_lr, ">= 0 (0: the stage's lr)")
        check_proposal(config, where)

    def build_networks(self) -> dict:
        nets = super().build_networks()
        v = self.cfg.vsd
        plain = self.model_cfg.copy_and_resolve_references()
        with plain.unlocked():
            # Differentiated (its own loss): no JVP kernel, the gradient pass's attention.
            plain.attention_impl = self.differentiated_attention_impl
        self.fake_module = build_network(plain, dropout=v.fake_dropout)
        self.fake_train = bind_apply(self.fake_module, train=True)
        self.fake_eval = bind_apply(self.fake_module, train=False)
        fake_opt = self.optimizer
        if v.fake_lr > 0:
            cfg = self.cfg.optimizer.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.lr = float(v.fake_lr)
            fake_opt = optimizers.build_optimizer(cfg)
        channels = self.model_cfg.weight_channels

        def init_fake(key, example):
            x, t, cond = example
            return init_backbone(self.fake_module, key, x, t, cond.get("y"),
                                 cond.get("guidance"))

        def init_weight(key, example):
            return AdaptiveWeight(channels).init(key, example[1])["params"]

        nets["fake"] = Network(self.fake_module, init_fake, fake_opt, ema=None,
                               project=nets["net"].project)
        nets["fake_weight"] = Network(AdaptiveWeight(channels), init_weight, fake_opt, ema=None)
        nets["vsd_weight"] = Network(AdaptiveWeight(channels), init_weight, self.optimizer,
                                     ema=None)
        return nets

    @property
    def teacher_initialized(self) -> tuple:
        return ("net", "fake")

    # --- The generator ----------------------------------------------------------------------
    def generate(self, params, latent, cond, dropout_key, net_fn=None):
        """g(z') = f(z', t_max) (float32): the CM's 1-step map of latents z' [B, ...]."""
        net_fn = net_fn or self.net_train
        t = jnp.full(latent.shape[:1], trigflow.t_max(self.sigma_d), jnp.float32)
        F = f32(net_fn(params, latent / self.sigma_d, t, cond, dropout_key))
        return trigflow.consistency_fn(latent, t, F, self.sigma_d)

    def targets(self, rng, batch, params, step, teacher, teacher_params) -> VSDTargets:
        v, sigma_d = self.cfg.vsd, self.sigma_d
        cond = self.conditioning(rng, batch)
        velocity = self.teacher_velocity(teacher, teacher_params)
        scm = None
        if self.cfg.scd_weight > 0:
            scm = scm_targets(rng, batch["image"], cond, net_fn=self.net_tangent,
                              params=params["net"], step=step, teacher=velocity,
                              prior_weighting=self.cfg.loss.prior_weighting,
                              **self.loss_settings())
        shape = batch["image"].shape[1:]
        latent = sigma_d * rng.normal(VSD_LATENT, shape)
        x0 = self.generate(params["net"], latent, cond, rng.dropout_key)
        # The VSD term at x_t = cos t g + sin t z (F_pre from the guided teacher, F_phi^-).
        t, _, x_t = draw_noisy(rng, x0, sigma_d=sigma_d, p_mean=v.p_mean, p_std=v.p_std,
                               time_kind=VSD_TIME, noise_kind=VSD_NOISE)
        F_pre = velocity(x_t, t, cond) / sigma_d
        F_fake = f32(self.fake_eval(params["fake"], x_t / sigma_d, t, cond))
        # The fake score's own diffusion targets on the same (stop-gradient) samples.
        fake = diffusion_targets(rng.substream(FAKE_SCORE), x0, cond, sigma_d=sigma_d,
                                 p_mean=v.fake_p_mean, p_std=v.fake_p_std)
        return jax.lax.stop_gradient(VSDTargets(scm, latent, cond, t, F_pre - F_fake,
                                                rng.dropout_key, fake))

    def loss(self, params, targets: VSDTargets):
        metrics, total = {}, 0.0
        if targets.scm is not None:
            scd, m = weighted_regression(params, targets.scm, net_fn=self.net_train,
                                         weight_fn=self.weight_fn)
            metrics.update(m)
            total = self.cfg.scd_weight * scd
        w = f32(self.networks["vsd_weight"].module.apply({"params": params["vsd_weight"]},
                                                         targets.t))
        vsd, raw = avsd_loss(
            lambda p, z: self.generate(p, z, targets.cond, targets.dropout_key), params["net"],
            targets.latent, targets.direction, w)
        fake, fake_m = weighted_regression(
            {"net": params["fake"], "weight": params["fake_weight"]}, targets.fake,
            net_fn=self.fake_train,
            weight_fn=lambda p, t: self.networks["fake_weight"].module.apply({"params": p}, t))
        total = total + self.cfg.vsd.weight * vsd + fake
        metrics.update(vsd_loss=vsd, vsd_raw=jnp.mean(raw), fake_loss=fake,
                       fake_raw=fake_m["raw_loss"],
                       vsd_direction_norm=jnp.mean(jnp.sqrt(per_sample_sq_norm(targets.direction))))
        metrics["loss"] = total
        return total, metrics
