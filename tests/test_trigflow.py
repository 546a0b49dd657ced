"""TrigFlow math (sCM Sec. 3, Eq. 5, 23, 26, 29, 30) against closed forms and finite differences."""
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import trigflow


def _rand(shape, seed=None):
    return jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30) if seed is None else seed),
                             shape, jnp.float64)


def test_velocity_is_the_time_derivative_of_x_t(x64):
    x0, z = _rand((4, 8, 8, 1)), _rand((4, 8, 8, 1))
    t = jnp.asarray(np.random.uniform(0.1, 1.4, 4))
    h = 1e-6
    fd = (trigflow.add_noise(x0, z, t + h) - trigflow.add_noise(x0, z, t - h)) / (2 * h)
    np.testing.assert_allclose(trigflow.velocity_target(x0, z, t), fd, rtol=1e-7, atol=1e-9)


def test_consistency_fn_boundary_and_exact_denoiser(x64):
    """f(x, 0) = x; with F = v/sigma_d (the true velocity) f recovers x0 exactly."""
    sd = 0.5
    x0, z = _rand((3, 4, 4, 1)) * sd, _rand((3, 4, 4, 1)) * sd
    t = jnp.asarray(np.random.uniform(0.1, 1.5, 3))
    x_t = trigflow.add_noise(x0, z, t)
    F = trigflow.velocity_target(x0, z, t) / sd
    np.testing.assert_allclose(trigflow.consistency_fn(x_t, t, F, sd), x0, atol=1e-12)
    np.testing.assert_array_equal(trigflow.consistency_fn(x_t, jnp.zeros(3), F, sd), x_t)
    # ddim_step to 0 is the same map; to any s < t it lands on the same straight path.
    s = t / 2
    np.testing.assert_allclose(trigflow.ddim_step(x_t, t, s, F, sd), trigflow.add_noise(x0, z, s),
                               atol=1e-12)
    np.testing.assert_allclose(trigflow.edm_denoiser_to_F(x_t, t, x0, sd), F, rtol=1e-9)


def test_edm_conversions_round_trip(x64):
    sd = 0.5
    sigma = jnp.asarray(np.exp(np.random.uniform(-5, 4, 5)))
    t = trigflow.time_from_sigma(sigma, sd)
    np.testing.assert_allclose(trigflow.sigma_from_time(t, sd), sigma, rtol=1e-12)
    x0, eps = _rand((5, 2, 2, 1)), _rand((5, 2, 2, 1))
    x_sigma = x0 + sigma[:, None, None, None] * eps
    x_t = trigflow.edm_to_trigflow_x(x_sigma, sigma, sd)
    # Eq. 30: x_t = cos t x0 + sin t z with z = sigma_d eps.
    np.testing.assert_allclose(x_t, trigflow.add_noise(x0, sd * eps, t), atol=1e-12)
    np.testing.assert_allclose(trigflow.trigflow_to_edm_x(x_t, t, sd), x_sigma, rtol=1e-10)


def test_general_schedule_conversion(x64):
    """Eq. 29: a VP-style x' = alpha x0 + sigma eps maps onto TrigFlow's x_t."""
    sd = 0.7
    alpha, sigma = jnp.asarray([0.9, 0.3]), jnp.asarray([0.4, 0.95])
    x0, eps = _rand((2, 3, 3, 1)), _rand((2, 3, 3, 1))
    x_prime = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    x_t, t = trigflow.schedule_to_trigflow(x_prime, alpha, sigma, sd)
    np.testing.assert_allclose(x_t, trigflow.add_noise(x0, sd * eps, t), atol=1e-12)


def test_time_proposal_and_constants():
    t = trigflow.sample_time(jax.random.PRNGKey(0), (200000,), -1.0, 1.6, 0.5)
    tau = np.log(0.5 * np.tan(np.asarray(t, np.float64)))
    assert abs(tau.mean() + 1.0) < 0.02 and abs(tau.std() - 1.6) < 0.02
    assert t.dtype == jnp.float32 and float(t.min()) > 0 and float(t.max()) < np.pi / 2
    np.testing.assert_allclose(trigflow.t_max(0.5), np.arctan(160.0), rtol=1e-6)
    np.testing.assert_allclose(trigflow.log_snr(jnp.asarray(np.pi / 4)), 0.0, atol=1e-6)
