"""Digits data (split, resumable batches, host sharding), EMA profiles and LR schedules."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scm_jax import ema, optimizers
from scm_jax.errors import ConfigError
from scm_jax.data import DigitsBatches, load_digits_splits


def test_digits_split_is_deterministic_disjoint_and_scaled():
    a, b = load_digits_splits(297), load_digits_splits(297)
    assert a["train_images"].shape == (1500, 8, 8, 1) and a["holdout_images"].shape == (297, 8, 8, 1)
    np.testing.assert_array_equal(a["train_images"], b["train_images"])
    assert a["train_images"].min() == -1.0 and a["train_images"].max() == 1.0
    train_rows = {r.tobytes() for r in a["train_images"]}
    assert sum(r.tobytes() in train_rows for r in a["holdout_images"]) < 5  # duplicates in the set
    assert set(np.unique(a["train_labels"])) == set(range(10))
    with pytest.raises(ValueError, match="holdout"):
        load_digits_splits(0)


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    split = load_digits_splits(297)
    make = lambda **kw: DigitsBatches(split["train_images"], split["train_labels"],  # noqa: E731
                                      batch_size=100, seed=3, **kw)
    first, second = make(), make()
    np.testing.assert_array_equal(first.indices(7), second.indices(7))   # resume = same batch
    epoch = np.concatenate([first.indices(s) for s in range(15)])
    assert sorted(epoch) == list(range(1500))
    assert not np.array_equal(first.indices(0), first.indices(15))      # a new permutation
    hosts = [make(process_index=i, process_count=4) for i in range(4)]
    parts = [h.indices(9) for h in hosts]
    np.testing.assert_array_equal(np.concatenate(parts), first.indices(9))
    with pytest.raises(ValueError, match="divisible"):
        make(process_count=3)


def test_power_ema_exponent_matches_its_relative_std():
    for sigma_rel in np.random.uniform(0.01, 0.25, 5):
        gamma = ema.power_ema_exponent(sigma_rel)
        # The averaging profile is p(x) ~ x^gamma on [0, 1]; its std is sigma_rel (EDM2 Eq. 3).
        x = np.linspace(0, 1, 200001)
        p = x**gamma / np.trapezoid(x**gamma, x)
        mean = np.trapezoid(x * p, x)
        std = np.sqrt(np.trapezoid((x - mean) ** 2 * p, x))
        np.testing.assert_allclose(std, sigma_rel, rtol=1e-3)
    with pytest.raises(ValueError, match="sigma_rel"):
        ema.power_ema_exponent(0.5)


def test_ema_weights_and_update():
    assert float(ema.ema_weight("power", 0.05, 0, 64)) == 1.0          # first step copies params
    # Against float64 at fresh steps up to 10^7: float32's relative precision, where forming
    # beta = (1 - 1/t)^(gamma + 1) in float32 first would be off by up to ~6% at t = 1e6.
    rng = np.random.default_rng()
    steps = np.concatenate([[1, 99, 999_999], rng.integers(1, 10_000_000, 20)])
    for sigma_rel in (0.05, rng.uniform(0.01, 0.25)):
        gamma = ema.power_ema_exponent(sigma_rel)
        want = -np.expm1((gamma + 1) * np.log1p(-1 / (steps.astype(np.float64) + 1)))
        got = np.array([float(ema.ema_weight("power", sigma_rel, int(s), 64)) for s in steps])
        np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(ema.ema_weight("halflife", 500_000, 5, 512),
                               1 - 0.5 ** (512 / 500_000), rtol=1e-6)
    out = ema.update_ema({"a": jnp.ones(3)}, {"a": jnp.zeros(3)}, 0.25)
    np.testing.assert_allclose(out["a"], 0.75)
    with pytest.raises(ValueError, match="ema.kind"):
        ema.ema_weight("linear", 1.0, 0, 1)


def _edm2_learning_rate(cur_nimg, batch_size, ref_lr, ref_batches, rampup_mimg):
    """EDM2's `learning_rate_schedule` (training/training_loop.py), transcribed: the image
    count drives both the inverse-sqrt decay and the ramp-up."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_mimg > 0:
        lr *= min(cur_nimg / (rampup_mimg * 1e6), 1)
    return lr


def test_schedule_is_edm2s_formula_with_the_absolute_step():
    rng = np.random.default_rng()
    batch, t_ref, warmup = 2048, int(rng.integers(100, 1000)), int(rng.integers(50, 5000))
    lr = float(rng.uniform(1e-4, 1e-2))
    sched = optimizers.learning_rate_schedule(optimizers.default_config(
        lr=lr, schedule="inv_sqrt", t_ref=t_ref, warmup_steps=warmup))
    steps = np.unique(np.concatenate([rng.integers(0, 20 * max(t_ref, warmup), 50),
                                      [0, 1, warmup - 1, warmup, warmup + 1, t_ref, 4 * t_ref]]))
    for step in steps:
        want = _edm2_learning_rate(step * batch, batch, lr, t_ref, warmup * batch / 1e6)
        np.testing.assert_allclose(float(sched(step)), want, rtol=2e-6, err_msg=f"step {step}")
    constant = optimizers.learning_rate_schedule(optimizers.default_config(lr=1.0, warmup_steps=10))
    np.testing.assert_allclose([constant(0), constant(5), constant(20)], [0.0, 0.5, 1.0], rtol=1e-6)


def test_optimizer_builds_and_names_bad_values():
    opt = optimizers.build_optimizer(optimizers.default_config(name="radam", eps=1e-8))
    state = opt.init({"w": jnp.ones(2)})
    updates, _ = opt.update({"w": jnp.ones(2)}, state)
    assert np.all(np.isfinite(updates["w"]))
    with pytest.raises(ConfigError, match="optimizer.name = 'sgdx'"):
        optimizers.build_optimizer(optimizers.default_config(name="sgdx"))
    with pytest.raises(ConfigError, match="schedule"):
        optimizers.learning_rate_schedule(optimizers.default_config(schedule="cosine"))
    with pytest.raises(ConfigError, match=r"scd\.optimizer\.lr"):
        optimizers.validate(optimizers.default_config(lr=0.0), "scd.optimizer")
    with pytest.raises(ConfigError, match="unknown optimizer keys"):
        optimizers.default_config(learning_rate=1.0)


def test_ema_settings_are_checked_by_name():
    ema.validate(ema.default_config(kind="halflife", value=5e5), "sct.ema")
    with pytest.raises(ConfigError, match=r"scd\.ema\.value = 0\.5"):
        ema.validate(ema.default_config(value=0.5), "scd.ema")
    with pytest.raises(ConfigError, match=r"teacher\.ema\.kind"):
        ema.validate(ema.default_config(kind="linear"), "teacher.ema")
