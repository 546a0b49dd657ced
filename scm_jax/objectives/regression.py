"""The differentiated pass every objective here shares: an adaptively weighted regression of
F_theta (EDM2 App. D; sCM Eq. 8), and the noisy inputs it is evaluated on (Alg. 1 lines 1-3).

An objective's step is two passes (sCM Sec. 5.1, "JVP rearrangement" and Alg. 1):
1. its `targets(...)`: everything that is not differentiated (t, z, x_t, the teacher, the
   discrete objective's second evaluation), returned as `Targets`;
2. `weighted_regression(...)`: F_theta at the same inputs with the same dropout key, and the
   learned log-weight w_phi(t). (sCM differentiates through its tangent JVP's primal output
   instead, `objectives.scm`, and calls `weighted_loss` with that F.)

t, the embedding inputs, g, its norm and the loss are float32 whatever the compute dtype.
Shapes: x0 [B, H, W, C]; t [B]; cond entries [B].
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from scm_jax import trigflow
from scm_jax.errors import check
from scm_jax.networks import AdaptiveWeight, needs_sigma_d
from scm_jax.objectives.base import Network, Objective
from scm_jax.objectives.randomness import TIME, NOISE, Randomness


@struct.dataclass
class Targets:
    """Inputs of the differentiated pass; all stop-gradient.

    x_scaled: [B,H,W,C] network input x_t / sigma_d; t: [B]; cond: dict of [B] arrays;
    target: [B,H,W,C], either the regression target (diffusion) or g (consistency, where the
    residual is F - stopgrad(F) - g); dropout_key: the key both passes share.
    """

    x_scaled: jax.Array
    t: jax.Array
    cond: dict
    target: jax.Array
    dropout_key: jax.Array
    consistency: bool = struct.field(pytree_node=False)


def f32(a):
    """At least float32: bf16/f16 network outputs are upcast, float64 (tests) is kept."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def bcast(a, x):
    """Per-sample [B] values reshaped to broadcast against x [B, ...]."""
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def per_sample_sq_norm(a):
    """||a_i||^2 over all non-batch axes, in float32 at least: [B, ...] -> [B]."""
    return jnp.sum(jnp.square(f32(a)), axis=tuple(range(1, a.ndim)))


def draw_noisy(rng: Randomness, x0, *, sigma_d, p_mean, p_std, time_kind=TIME, noise_kind=NOISE):
    """t from the log-normal proposal, z ~ N(0, sigma_d^2 I), x_t (Alg. 1 lines 1-3), from the
    streams `time_kind` and `noise_kind` (a second loss on the same samples names its own)."""
    # ln(sigma_d tan t) = tau ~ N(P_mean, P_std^2), in float32.
    t = trigflow.time_from_sigma(jnp.exp(p_mean + p_std * rng.normal(time_kind)), sigma_d)
    z = sigma_d * rng.normal(noise_kind, x0.shape[1:])
    return t, z, trigflow.add_noise(x0.astype(jnp.float32), z, t)


def weighted_regression(params, targets: Targets, *, net_fn, weight_fn):
    """(e^{w(t)} / D) ||residual||^2 - w(t), averaged over the batch. Returns (loss, metrics).

    Diffusion: residual = F - target. Consistency: residual = F - stopgrad(F) - g, whose value is
    -g exactly and whose gradient pushes F along +g (Alg. 1).
    params: {'net': backbone params, 'weight': w_phi params}.
    """
    F = f32(net_fn(params["net"], targets.x_scaled, targets.t, targets.cond, targets.dropout_key))
    return weighted_loss(params, F, targets, weight_fn=weight_fn)


def weighted_loss(params, F, targets: Targets, *, weight_fn):
    """`weighted_regression` given F_theta [B,H,W,C] (float32, differentiable) already computed
    at targets.x_scaled, targets.t: the sCM loss takes F from its tangent pass's primal.
    Returns (loss, metrics)."""
    if targets.consistency:
        residual = F - jax.lax.stop_gradient(F) - targets.target
    else:
        residual = F - targets.target
    w = f32(weight_fn(params["weight"], targets.t))
    d = np.prod(F.shape[1:])
    raw = per_sample_sq_norm(residual) / d
    loss = jnp.mean(jnp.exp(w) * raw - w)
    metrics = {"loss": loss, "raw_loss": jnp.mean(raw), "weight_mean": jnp.mean(w)}
    if targets.consistency:
        metrics["tangent_norm"] = jnp.mean(jnp.sqrt(per_sample_sq_norm(targets.target)))
    return loss, metrics


class RegressionObjective(Objective):
    """An objective whose differentiated pass is `weighted_regression`: the backbone 'net' and
    the adaptive weighting 'weight' (w_phi of sCM Eq. 8, fresh in every stage, no EMA), both
    trained by the stage's optimizer settings. Subclasses define `targets`.

    `<stage>.loss.adaptive_weighting` (every subclass's schema has it): True, the paper's
    choice (sCM Sec. 4.2, Eq. 8, Fig. 5b; EDM2 App. D), learns w_phi(t); False fixes w = 0, so
    the loss is the plain batch mean of ||residual||^2 / D. The 'weight' network then still
    exists (same state, same checkpoints) but is not used, so its gradient is zero.
    """

    def model_config(self, model):
        """config.model, plus `sigma_d` = config.data.sigma_d when the network's time input is
        EDM's (model.time_transform 'edm', or model.edm2_native): c_noise = ln(sigma_d tan t)
        / 4 needs the data std, which is config.data's (one value, not a second copy in
        config.model). Only then, so the model identity of every other run is unchanged."""
        model = super().model_config(model)
        if needs_sigma_d(model):
            with model.unlocked():
                model.sigma_d = self.sigma_d
        return model

    def build_networks(self) -> dict:
        weight = AdaptiveWeight(self.model_cfg.weight_channels)
        init_weight = lambda key, example: weight.init(key, example[1])["params"]  # noqa: E731
        return dict(super().build_networks(),
                    weight=Network(weight, init_weight, self.optimizer, ema=None))

    def weight_fn(self, params, t):
        """w_phi(t) [B] (sCM Eq. 8), or zeros with loss.adaptive_weighting = False."""
        if not self.cfg.loss.adaptive_weighting:
            return jnp.zeros(t.shape, jnp.promote_types(t.dtype, jnp.float32))
        return self.networks["weight"].module.apply({"params": params}, t)

    def loss(self, params, targets: Targets):
        return weighted_regression(params, targets, net_fn=self.net_train,
                                   weight_fn=self.weight_fn)


def check_adaptive_weighting(config, where: str) -> None:
    """config.<where>.loss.adaptive_weighting is a boolean (True: learned w_phi, Eq. 8)."""
    value = config[where].loss.adaptive_weighting
    check(isinstance(value, bool), f"{where}.loss.adaptive_weighting", value,
          "True (learned w_phi(t), sCM Eq. 8) or False (w = 0: the plain mean)")


def check_proposal(config, where: str) -> None:
    """The log-normal proposal ln(sigma_d tan t) ~ N(P_mean, P_std^2) of config.<where>.loss."""
    loss = config[where].loss
    check(loss.p_std > 0, f"{where}.loss.p_std", loss.p_std, "> 0")
    check(math.isfinite(loss.p_mean), f"{where}.loss.p_mean", loss.p_mean, "finite")
