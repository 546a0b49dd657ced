"""Adaptive VSD (sCM App. C): the generator's gradient against float64 finite differences of the
surrogate, the fake score's loss as the package's diffusion loss on generated samples, the
learned weighting's optimum, sCD + VSD at lambda = 0 equal to sCD. (A killed sCD + aVSD run
resumes to the uninterrupted one's parameters: tests/test_train.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scm_jax import objectives, trigflow
from scm_jax.networks import AdaptiveWeight
from scm_jax.objectives.randomness import FAKE_SCORE, Randomness
from scm_jax.objectives.vsd import avsd_loss
from tests.helpers import load_experiment, tiny_net_fn

SHAPE = (8, 8, 1)


def _config(*overrides):
    return load_experiment("digits", "variant=tiny", ["mesh.data=1", *overrides])


def test_generator_gradient_is_the_finite_difference_of_the_surrogate(x64):
    """d/de S(theta + e u) at e = 0, S = mean(e^w/D ||g_theta(z') - g_theta0(z') + Delta||^2)
    (Delta fixed), by fourth-order central differences in float64, equals <grad L_aVSD(theta0), u>: the
    stop-gradient construction gives exactly the VSD gradient, through the 1-step map."""
    net_fn, params = tiny_net_fn(dtype=jnp.float64, batch=3)
    sigma_d = 0.75
    rng = np.random.default_rng()
    latent = jnp.asarray(sigma_d * rng.normal(size=(3,) + SHAPE))
    direction = jnp.asarray(rng.normal(size=(3,) + SHAPE))
    w = jnp.asarray(rng.normal(size=(3,)))
    t_max = jnp.full((3,), trigflow.t_max(sigma_d), jnp.float64)

    def generate(p, z):
        return trigflow.consistency_fn(z, t_max, net_fn(p, z / sigma_d, t_max, {}), sigma_d)

    grad = jax.grad(lambda p: avsd_loss(generate, p, latent, direction, w)[0])(params)
    u = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    g0 = generate(params, latent)

    def surrogate(eps):
        p = jax.tree.map(lambda a, b: a + eps * b, params, u)
        r = generate(p, latent) - g0 + direction
        return jnp.mean(jnp.exp(w) * jnp.mean(jnp.square(r), axis=(1, 2, 3)))

    # Fourth-order central differences at h = 1e-5: the random network's higher derivatives are
    # large, so the truncation error is ~1e-9 relative at h = 1e-4 (and reached 1e-6 on rare
    # draws), ~1e-11 at 1e-5, where float64 round-off (~eps |S| / h) is ~1e-11 too.
    h = 1e-5
    fd = (-surrogate(2 * h) + 8 * surrogate(h) - 8 * surrogate(-h) + surrogate(-2 * h)) / (12 * h)
    analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(u)))
    np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6)
    # The value of the loss is the direction's alone (g - sg(g) = 0).
    loss, raw = avsd_loss(generate, params, latent, direction, w)
    np.testing.assert_allclose(raw, np.mean(np.square(direction), axis=(1, 2, 3)), rtol=1e-12)


def test_the_learned_weighting_at_its_optimum_makes_each_weighted_loss_one():
    """e^w a - w is smallest at e^w a = 1 (EDM2 App. D): w_psi trained on a fixed residual
    (all samples at one t) converges there."""
    weight = AdaptiveWeight(16)
    t = jnp.full((6,), 0.9)
    a = jnp.asarray(np.random.default_rng().uniform(0.5, 4.0, 6))
    params = weight.init(jax.random.PRNGKey(0), t)["params"]
    loss = lambda p: jnp.mean(jnp.exp(weight.apply({"params": p}, t)) * a  # noqa: E731
                              - weight.apply({"params": p}, t))
    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    for _ in range(400):
        params, state = step(params, state)
    w = weight.apply({"params": params}, t)
    np.testing.assert_allclose(np.exp(np.asarray(w)) * float(jnp.mean(a)), 1.0, atol=1e-3)


@pytest.fixture(scope="module")
def teacher():
    """A random digits teacher (the tiny network) as an sCD / aVSD step takes it."""
    config = _config()
    diffusion = objectives.build(config, "teacher")
    state = diffusion.init_state(jax.random.PRNGKey(7), SHAPE)
    params = jax.tree.map(lambda a: a + 0.05 * jnp.sign(a + 1e-3), state.nets["net"].params)
    return objectives.Teacher(diffusion), params


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.uniform(-1, 1, (16,) + SHAPE), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}


@pytest.mark.slow
def test_scd_plus_vsd_at_lambda_zero_is_scd_and_the_fake_loss_is_the_diffusion_loss(teacher):
    teacher_obj, teacher_params = teacher
    overrides = ["scd.loss.warmup_steps=0", "scd_vsd.loss.warmup_steps=0",
                 "scd_vsd.vsd.weight=0.0"]
    config = _config(*overrides)
    scd, vsd = objectives.build(config, "scd"), objectives.build(config, "scd_vsd")
    key = jax.random.PRNGKey(3)
    s_scd, s_vsd = scd.init_state(key, SHAPE), vsd.init_state(key, SHAPE)
    # The same student and sCD weighting in both (the aVSD state has three more networks).
    nets = dict(s_vsd.nets, net=s_scd.nets["net"], weight=s_scd.nets["weight"])
    s_vsd = s_vsd.replace(nets=nets, rng=s_scd.rng)
    batch = _batch()
    out_scd, m_scd = jax.jit(scd.make_step(teacher_obj))(s_scd, batch, teacher_params)
    out_vsd, m_vsd = jax.jit(vsd.make_step(teacher_obj))(s_vsd, batch, teacher_params)
    for name in ("net", "weight"):
        for a, b in zip(jax.tree.leaves(out_scd.nets[name]), jax.tree.leaves(out_vsd.nets[name])):
            np.testing.assert_array_equal(a, b)
    assert float(m_vsd["vsd_loss"]) > 0 and float(m_vsd["fake_loss"]) != 0
    # The fake score's term is the package's diffusion loss (objective 'diffusion', the same
    # proposal, no label dropout) of F_phi on the generator's samples, with the same draws.
    params = jax.tree.map(jnp.asarray, {n: net.params for n, net in s_vsd.nets.items()})
    v = config.scd_vsd.vsd
    diff_config = _config(f"teacher.loss.p_mean={v.fake_p_mean}",
                          f"teacher.loss.p_std={v.fake_p_std}", "teacher.label_dropout=0.0",
                          "teacher.dropout=0.0")
    diffusion = objectives.build(diff_config, "teacher")

    @jax.jit
    def both(params, batch, teacher_params):
        rng = Randomness.for_batch(jax.random.fold_in(s_vsd.rng, 0), 16)
        targets = vsd.targets(rng, batch, params, 0, teacher_obj, teacher_params)
        _, metrics = vsd.loss(params, targets)
        samples = vsd.generate(params["net"], targets.latent, targets.cond, rng.dropout_key)
        d_targets = diffusion.targets(rng.substream(FAKE_SCORE), dict(batch, image=samples),
                                      {"net": params["fake"]}, 0, None, None)
        d_loss, _ = diffusion.loss({"net": params["fake"], "weight": params["fake_weight"]},
                                   d_targets)
        return metrics, d_loss

    metrics, d_loss = both(params, batch, teacher_params)
    np.testing.assert_allclose(float(metrics["fake_loss"]), float(d_loss), rtol=1e-6)
