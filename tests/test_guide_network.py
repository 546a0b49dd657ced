"""EDM2's guidance with a separate guiding network (Karras et al. 2024, Sec. 5): the guided sCD
teacher's unconditional branch from another diffusion stage (`guidance.network`; the presets'
`guide=xs`), its value against the hand computation, its config checks, and the import of an
EDM2 guiding pickle beside the teacher's (`import_teacher --guide_pkl`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import config_checks, objectives, stage_restore, train
from scm_jax.errors import ConfigError
from scm_jax.import_teacher import import_edm2_teacher
from scm_jax.networks.edm2_names import params_from_edm2
from scm_jax import edm2_pickle
from tests import edm2_format
from tests.helpers import load_experiment, tiny_latents
from tests.test_import_teacher import KWARGS

# EDM2's constructor arguments of the runlocal guide (8 channels, unconditional; the preset's
# noise and embedding widths 16 and 32 are EDM2's channel_mult_noise 2 and channel_mult_emb 4).
GUIDE_KWARGS = dict(KWARGS, model_channels=8, label_dim=0, channel_mult_noise=2,
                    channel_mult_emb=4)


def _config(tmp_path=None, arg="variant=runlocal,teacher=edm2,guide=xs", *overrides):
    config = load_experiment("imagenet512", arg, list(overrides))
    config_checks.validate(config)
    if tmp_path is not None:
        config.data.path = str(tmp_path / "latents")
    return config


def _random_ema(objective, seed):
    state = objective.init_state(jax.random.PRNGKey(seed), (8, 8, 4))
    # Fresh EMA values, not the initialization's zeros (zero-initialized output layers)
    leaves, tree = jax.tree.flatten(state.nets["net"].ema)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("arg", ["variant=runlocal,teacher=edm2,guide=xs",
                                 "variant=runlocal,guide=xs"])
def test_the_guided_teacher_is_the_guide_plus_w_times_the_difference(arg):
    config = _config(None, arg)
    student = objectives.build(config, "scd")
    assert student.guide_stage == "guide"
    net_obj, guide_obj = objectives.build(config, "teacher"), objectives.build(config, "guide")
    assert guide_obj.model_cfg.num_classes == 0 and guide_obj.model_cfg.channels == 8
    seed = int(np.random.default_rng().integers(1 << 20))
    net, guide = _random_ema(net_obj, seed), _random_ema(guide_obj, seed + 1)
    teacher = objectives.Teacher(net_obj, guide_obj)
    params = teacher.pack(net, guide)
    assert teacher.net_params(params) is net

    rng = np.random.default_rng(seed)
    b, sd = 6, float(config.data.sigma_d)
    x_t = jnp.asarray(sd * rng.standard_normal((b, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.05, 1.5, b), jnp.float32)
    y = jnp.asarray(rng.integers(0, 1000, b))
    w = jnp.asarray(rng.uniform(1.0, 2.0, b), jnp.float32)
    got = np.asarray(teacher.velocity(params, x_t, t, {"y": y}, w), np.float64)

    # By hand, in float64 from each network's own output: D_w = D_g + w (D_c - D_g) in F.
    F_c = np.asarray(net_obj.net_eval(net, x_t / sd, t, {"y": y}), np.float64)
    F_g = np.asarray(guide_obj.net_eval(guide, x_t / sd, t, {}), np.float64)
    w64 = np.asarray(w, np.float64)[:, None, None, None]
    expected = sd * (F_g + w64 * (F_c - F_g))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # The guide is not the teacher's own null-label output (CFG): the test can tell them apart.
    F_null = np.asarray(net_obj.net_eval(net, x_t / sd, t, {"y": jnp.full_like(y, 1000)}))
    cfg = sd * (F_null + w64 * (F_c - F_null))
    assert np.abs(cfg - expected).max() > 100 * 1e-5 * np.abs(expected).max()
    # Scale 1 is the conditional teacher exactly; the guide's parameters are an input.
    one = teacher.velocity(params, x_t, t, {"y": y}, jnp.ones((b,), jnp.float32))
    np.testing.assert_allclose(np.asarray(one), sd * F_c, rtol=0, atol=1e-6 * np.abs(F_c).max())
    with pytest.raises(ValueError, match="guiding network"):
        teacher.pack(net)


def test_sampling_with_a_guiding_network_is_the_same_combination():
    from scm_jax import evaluate, sampling

    config = _config(None)
    assert evaluate.guide_stage_for(config, "teacher") == "guide"
    assert evaluate.guide_stage_for(_config(None, "variant=runlocal"), "teacher") is None
    net_obj, guide_obj = objectives.build(config, "teacher"), objectives.build(config, "guide")
    seed = int(np.random.default_rng().integers(1 << 20))
    params = dict(net=_random_ema(net_obj, seed), guide=_random_ema(guide_obj, seed + 1))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.1, 1.5, 3), jnp.float32)
    y = jnp.asarray(rng.integers(0, 1000, 3))
    F = sampling.conditioned(net_obj.net_eval, params, y, num_classes=1000, scale=1.7,
                             guide=(guide_obj.net_eval, False))(x, t)
    F_c = np.asarray(net_obj.net_eval(params["net"], x, t, {"y": y}), np.float64)
    F_g = np.asarray(guide_obj.net_eval(params["guide"], x, t, {}), np.float64)
    expected = F_g + 1.7 * (F_c - F_g)
    np.testing.assert_allclose(np.asarray(F), expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())
    # The teacher's velocity (sCD) and the sampler's F are the same guidance.
    teacher = objectives.Teacher(net_obj, guide_obj)
    sd = float(config.data.sigma_d)
    v = teacher.velocity(teacher.pack(params["net"], params["guide"]), x * sd, t, {"y": y},
                         jnp.full((3,), 1.7, jnp.float32))
    np.testing.assert_allclose(np.asarray(v) / sd, np.asarray(F), rtol=0,
                               atol=1e-6 * np.abs(expected).max())


def test_guide_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="guide 'xs' for imagenet64"):
        load_experiment("imagenet64", "variant=runlocal,guide=xs")
    with pytest.raises(ConfigError, match="guide 'xl'"):
        _config(None, "variant=runlocal,guide=xl")
    with pytest.raises(ConfigError, match=r"scd.guidance.network.*'sct'.*one of \['guide'\]"):
        _config(None, "variant=runlocal,guide=xs", "scd.guidance.network=sct")
    with pytest.raises(ConfigError, match="guide.label_dropout.*unconditional"):
        _config(None, "variant=runlocal,guide=xs", "guide.label_dropout=0.1")
    with pytest.raises(ConfigError, match="guide.model.channels"):
        _config(None, "variant=runlocal,guide=xs", "guide.model.channels=-4")
    with pytest.raises(ConfigError, match="has no 'channels' width"):
        config_checks.validate(load_experiment("imagenet512", "variant=runlocal,backbone=dit",
                                         ["teacher.model.channels=8"]))
    # Without a guiding network the guided teacher still needs label dropout (CFG).
    with pytest.raises(ConfigError, match="label_dropout > 0"):
        _config(None, "variant=runlocal", "teacher.label_dropout=0.0")
    _config(None, "variant=runlocal,guide=xs", "teacher.label_dropout=0.0")


def _pickle(tmp_path, name, kwargs, seed):
    path = tmp_path / f"{name}.pkl"
    edm2_format.write_edm2_pickle(path, edm2_format.random_edm2_params(
        kwargs, np.random.default_rng(seed)), kwargs)
    return path


@pytest.mark.slow
def test_an_imported_guiding_network_is_restored_and_scd_distills_with_it(tmp_path):
    tiny_latents(tmp_path / "latents")
    config = _config(tmp_path)
    seed = int(np.random.default_rng().integers(1 << 20))
    pkl = _pickle(tmp_path, "net", KWARGS, seed)
    guide_pkl = _pickle(tmp_path, "gnet", GUIDE_KWARGS, seed + 1)
    workdir = tmp_path / "run"

    # A guiding pickle of another width: refused before anything is written (teacher included).
    wrong = _pickle(tmp_path, "wide", dict(GUIDE_KWARGS, model_channels=16,
                                           channel_mult_noise=1, channel_mult_emb=2), seed)
    with pytest.raises(ConfigError, match=r"stage guide: config.guide.model.channels = 8 where "
                                          r"the pickle has 16 \(--config.guide.model.channels"):
        import_edm2_teacher(config, str(pkl), str(workdir), guide_pkl=str(wrong),
                            log=lambda m: None)
    assert not workdir.exists()
    # A guiding pickle for a config whose students name no guiding stage: one line.
    with pytest.raises(ConfigError, match="names none"):
        import_edm2_teacher(_config(tmp_path, "variant=runlocal,teacher=edm2"), str(pkl),
                            str(workdir), guide_pkl=str(guide_pkl), log=lambda m: None)

    lines = []
    import_edm2_teacher(config, str(pkl), str(workdir), guide_pkl=str(guide_pkl),
                        log=lines.append)
    assert "guide checkpoint" in lines[-1] and (workdir / "guide" / "config.json").exists()
    guide_obj = objectives.build(config, "guide")
    guide, step = stage_restore.restore_stage_ema(config, "guide", str(workdir))
    assert step == config.guide.steps
    expected = params_from_edm2(edm2_pickle.load(guide_pkl).params,
                                guide_obj.networks["net"].module)
    for a, b in zip(jax.tree.leaves(guide), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The pipeline's guide stage is complete; sCD distills the teacher guided by it.
    resumed = train.train_stage(config, "guide", str(workdir), log=lines.append)
    assert int(resumed.step) == config.guide.steps
    config.scd.sample_every = -1
    state = train.train_stage(config, "scd", str(workdir), log=lines.append)
    assert int(state.step) == config.scd.steps
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.nets))
