"""The sCM Sec. 4 / 5.1 stabilizer switches, one check per knob: each switches what it claims.

    model.time_transform        'identity' | 'edm'         (Sec. 4.1, Eq. 7)
    model.time_embedding        'positional' | 'fourier'   (Sec. 4.1, Fig. 4)
    model.modulation            'adn' | 'adagn'            (Sec. 4.1)
    <stage>.loss.adaptive_weighting   True | False         (Eq. 8, Fig. 5b)
    <stage>.loss.jvp_rearranged       True | False         (Sec. 5.1, sCM stages)

(tangent_norm, warmup_steps and jvp_dtype are tested with the objectives.)
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scm_jax import config_checks, configs, objectives
from scm_jax.errors import ConfigError
from scm_jax.networks import (NON_IDENTITY_KEYS, AdaptiveWeight, UNet, bind_apply, layers,
                              validate_model_config)
from scm_jax.objectives.regression import (Targets, check_adaptive_weighting, per_sample_sq_norm,
                                           weighted_regression)
from scm_jax.objectives.scm import scm_tangent
from tests.helpers import load_experiment

SD = 0.75
SHAPE = (3, 8, 8, 1)


def _tiny(dtype=jnp.float32, **kw):
    return UNet(channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
                noise_channels=8, emb_channels=16, dtype=dtype, **kw)


def _inputs(dtype, seed=0, lo=0.2, hi=1.4):
    kx, kt = jax.random.split(jax.random.PRNGKey(seed))
    return (jax.random.normal(kx, SHAPE, dtype),
            jax.random.uniform(kt, SHAPE[:1], dtype, lo, hi))


def _structure(params):
    return jax.tree.structure(params), [p.shape for p in jax.tree.leaves(params)]


def _param_structure(module, x, t):
    """The parameter tree's structure and shapes, from a trace (nothing compiled or run)."""
    return _structure(jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t)["params"])


def _random_params(module, x, t, seed=0, scale=0.3, dtype=jnp.float32):
    """Random normal parameters of the module's shapes (no zero-initialized layer hides a
    path), without compiling its init."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, p.shape, dtype)
                                     for k, p in zip(keys, leaves)])


def _apply(module):
    return jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))


def _output_as_params_net(params, x, t, cond, key=None):
    """A 'network' whose output is its parameter tensor: F = params."""
    return jnp.broadcast_to(params, x.shape)


def _digits(**model):
    """The tiny digits config with extra config.model entries (the experiment has none of
    these keys: absent means the paper's choice)."""
    config = load_experiment("digits", "variant=tiny")
    with config.model.unlocked():
        for key, value in model.items():
            config.model[key] = value
    return config


def test_time_transform_edm_is_the_identity_network_at_log_sigma_over_4(x64):
    x, t = _inputs(jnp.float64)
    identity = _tiny(jnp.float64)
    edm = _tiny(jnp.float64, time_transform="edm", sigma_d=SD)
    params = _random_params(identity, x, t, seed=1, dtype=jnp.float64)
    assert _param_structure(edm, x, t) == _structure(params)
    out_edm = _apply(edm)(params, x, t)
    c_noise = jnp.log(SD * jnp.tan(t)) / 4          # EDM's ln(sigma) / 4, sigma = sigma_d tan t
    run_identity = _apply(identity)
    np.testing.assert_allclose(out_edm, run_identity(params, x, c_noise), rtol=1e-12,
                               atol=1e-12)
    assert not np.allclose(out_edm, run_identity(params, x, t))
    with pytest.raises(ValueError, match="needs sigma_d"):
        jax.eval_shape(_tiny(jnp.float64, time_transform="edm").init, jax.random.PRNGKey(0), x, t)

    # sigma_d reaches the network from config.data through the objectives' model section, and
    # only for 'edm' (every other run's model identity is unchanged).
    config = _digits(time_transform="edm")
    config_checks.validate(config)
    for stage in ("teacher", "scd"):
        module = objectives.build(config, stage).module
        assert (module.time_transform, module.sigma_d) == ("edm", config.data.sigma_d)
    assert "sigma_d" not in objectives.build(_digits(), "scd").model_cfg


def test_time_embedding_fourier_is_fixed_and_changes_the_output():
    x, t = _inputs(jnp.float32)
    positional, fourier = _tiny(), _tiny(time_embedding="fourier")
    params = _random_params(positional, x, t, seed=2)
    assert _param_structure(fourier, x, t) == _structure(params)
    assert not np.allclose(_apply(fourier)(params, x, t), _apply(positional)(params, x, t),
                           atol=1e-3)
    # Fixed frequencies: two builds of the embedding, traced separately, agree exactly.
    builds = [layers.ConditioningEmbedding(16, 8, time_embedding="fourier") for _ in range(2)]
    emb_params = builds[0].init(jax.random.PRNGKey(3), t)
    first, second = (jax.jit(lambda p, c, m=m: m.apply(p, c))(emb_params, t) for m in builds)
    np.testing.assert_array_equal(first, second)
    # The formula, with frequencies N(0, 16^2) drawn once from a fixed numpy seed.
    c = jnp.asarray([-0.3, 0.1, 0.9], jnp.float32)
    f = np.random.default_rng(layers.FOURIER_SEED).standard_normal(4) * 16.0
    angles = 2 * np.pi * np.outer(np.asarray(c, np.float64), f)
    np.testing.assert_allclose(layers.fourier_embedding(c, 8),
                               np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-4)
    # Scale 16: |d emb/dc| far above the positional embedding's bound of 1 (Fig. 4).
    jac = jax.jacfwd(lambda v: layers.fourier_embedding(v, 64))(c)
    assert float(jnp.max(jnp.abs(jac))) > 10.0


def test_modulation_adagn_formula_and_adn_param_shapes():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(1.0, 3.0, (2, 4, 4, 16)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
    adagn = layers.AdaptiveDoubleNorm(groups=4, modulation="adagn")
    adn = layers.AdaptiveDoubleNorm(groups=4)
    params = adagn.init(jax.random.PRNGKey(0), h, emb)
    assert _structure(params) == _structure(adn.init(jax.random.PRNGKey(0), h, emb))
    # numpy reference: GroupNorm without affine, then h (1 + s) + b, no pixel norm.
    hn = np.asarray(h, np.float64).reshape(2, 4, 4, 4, 4)
    hn = ((hn - hn.mean(axis=(1, 2, 4), keepdims=True))
          / np.sqrt(hn.var(axis=(1, 2, 4), keepdims=True) + 1e-6)).reshape(h.shape)
    dense = jax.tree.map(np.asarray, params["params"]["affine"])
    s, b = np.split(np.asarray(emb, np.float64) @ dense["kernel"] + dense["bias"], 2, axis=-1)
    expected = hn * (1 + s)[:, None, None] + b[:, None, None]
    np.testing.assert_allclose(adagn.apply(params, h, emb), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(adn.apply(params, h, emb), expected, atol=1e-2)
    # In the U-Net: the same parameter tree as ADN's.
    x, t = _inputs(jnp.float32)
    assert _param_structure(_tiny(modulation="adagn"), x, t) == _param_structure(_tiny(), x, t)


def test_adaptive_weighting_off_is_the_plain_mean_and_freezes_w_phi():
    base = load_experiment("digits", "variant=tiny")
    stages = configs.training_stages(base)
    assert all(base[s].loss.adaptive_weighting is True for s in stages)
    off = load_experiment("digits", "variant=tiny",
                          [f"{s}.loss.adaptive_weighting=false" for s in stages])
    config_checks.validate(off)

    # The objectives' weighted regression (`RegressionObjective.loss`) with their own w_phi
    # (`weight_fn`), a diffusion and a consistency stage; F is a parameter tensor here.
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    F0 = jax.random.normal(k1, (4, 8, 8, 1))
    t = jnp.linspace(0.3, 1.3, 4)
    for stage, consistency in (("teacher", False), ("scd", True)):
        targets = Targets(jnp.zeros_like(F0), t, {}, jax.random.normal(k2, F0.shape), k3,
                          consistency=consistency)
        residual = -targets.target if consistency else F0 - targets.target
        mean_raw = float(jnp.mean(per_sample_sq_norm(residual) / 64))
        for on, config in ((True, base), (False, off)):
            objective = objectives.build(config, stage)
            weight = AdaptiveWeight(config.model.weight_channels)
            # A nonzero w_phi, so the weighting (when on) changes the loss.
            w_params = jax.tree.map(lambda p: p + 0.3, weight.init(k3, t)["params"])
            (loss, _), grads = jax.value_and_grad(
                lambda p: weighted_regression(
                    p, targets, net_fn=_output_as_params_net, weight_fn=objective.weight_fn),
                has_aux=True)({"net": F0, "weight": w_params})
            w_grads = [float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["weight"])]
            if on:
                assert abs(float(loss) - mean_raw) > 1e-3 and max(w_grads) > 0.0
            else:
                np.testing.assert_allclose(float(loss), mean_raw, rtol=1e-6)
                assert max(w_grads) == 0.0


def test_jvp_rearranged_off_equals_it_in_float64(x64):
    module = _tiny(jnp.float64)
    x_t, t = _inputs(jnp.float64, seed=5, lo=0.05, hi=1.52)
    params = _random_params(module, x_t, t, seed=3, dtype=jnp.float64)
    net_fn = bind_apply(module, train=False)
    dxdt = SD * jax.random.normal(jax.random.PRNGKey(4), SHAPE, jnp.float64)
    tangent = jax.jit(lambda r: scm_tangent(net_fn, params, x_t, t, dxdt, {}, None, sigma_d=SD,
                                            warmup_ratio=0.7, jvp_rearranged=r),
                      static_argnums=0)
    F_a, g_a = tangent(True)
    F_b, g_b = tangent(False)
    np.testing.assert_array_equal(F_a, F_b)
    np.testing.assert_allclose(g_b, g_a, rtol=1e-9, atol=1e-12)
    # Threaded from the sCM stages' config (not the discrete objective's: no JVP there).
    config = load_experiment("digits", "variant=tiny", ["sct.loss.jvp_rearranged=false"])
    config_checks.validate(config)
    assert objectives.build(config, "sct").loss_settings()["jvp_rearranged"] is False
    assert objectives.build(config, "scd").loss_settings()["jvp_rearranged"] is True
    assert "jvp_rearranged" not in config.dscd.loss


def test_jvp_rearranged_off_overflows_float16_near_the_ends():
    """Sec. 5.1: with EDM's time transform (d c_noise/dt = 1/(4 sin t cos t)) and float16
    activations, the un-rearranged JVP's tangents overflow near t = 0 and t = pi/2; the
    rearranged one scales them by cos t sin t first and stays finite."""
    module = _tiny(jnp.float16, time_transform="edm", sigma_d=SD)
    x_t = jax.random.normal(jax.random.PRNGKey(6), SHAPE, jnp.float32)
    t = jnp.asarray([1e-6, 0.5, np.pi / 2 - 1e-6], jnp.float32)
    params = _random_params(module, x_t, t, seed=7)
    net_fn = bind_apply(module, train=False)
    dxdt = SD * jax.random.normal(jax.random.PRNGKey(8), SHAPE, jnp.float32)
    tangent = jax.jit(lambda r: scm_tangent(net_fn, params, x_t, t, dxdt, {}, None, sigma_d=SD,
                                            warmup_ratio=1.0, jvp_rearranged=r)[1],
                      static_argnums=0)
    finite = lambda g: np.isfinite(np.asarray(g)).all(axis=(1, 2, 3))  # noqa: E731
    assert finite(tangent(True)).all()
    np.testing.assert_array_equal(finite(tangent(False)), [False, True, False])


def test_stabilizer_values_are_validated():
    for key, value, allowed in [("time_transform", "log", "identity"),
                                ("time_embedding", "sinusoid", "positional"),
                                ("modulation", "film", "adagn")]:
        with pytest.raises(ConfigError, match=rf"model\.{key} = '{value}'.*{allowed}"):
            config_checks.validate(_digits(**{key: value}))
    config_checks.validate(_digits(time_transform="edm", time_embedding="fourier", modulation="adagn"))
    for key in ("time_transform", "time_embedding", "modulation"):
        assert key not in NON_IDENTITY_KEYS
    # The loss switches are booleans: the loader and the checks reject anything else.
    for stage, key in (("teacher", "adaptive_weighting"), ("scd", "jvp_rearranged")):
        with pytest.raises(ConfigError, match="expected a boolean"):
            load_experiment("digits", "variant=tiny", [f"{stage}.loss.{key}=maybe"])
    bad = ml_collections.ConfigDict(dict(s=dict(loss=dict(adaptive_weighting="no"))))
    with pytest.raises(ConfigError, match=r"s\.loss\.adaptive_weighting = 'no'"):
        check_adaptive_weighting(bad, "s")


def test_non_default_switches_are_unet_only():
    config = load_experiment("cifar10", "variant=runlocal", ["model.modulation=adagn"])
    with pytest.raises(ConfigError, match=r"model\.modulation = 'adagn' is supported by the "
                                          r"'unet' backbone only"):
        validate_model_config(config.model)
    for key, value in (("time_transform", "edm"), ("time_embedding", "fourier")):
        config = load_experiment("cifar10", "variant=runlocal")
        with config.model.unlocked():
            config.model[key] = value
        with pytest.raises(ConfigError, match=rf"model\.{key} = '{value}' is supported by the "
                                              r"'unet' backbone only"):
            validate_model_config(config.model)
    # The paper's choices, and the backbone's own modulations, stay valid.
    config = load_experiment("cifar10", "variant=runlocal", ["model.modulation=additive"])
    with config.model.unlocked():
        config.model.time_transform, config.model.time_embedding = "identity", "positional"
    validate_model_config(config.model)


def test_checkpoints_from_before_the_switches_existed_still_load(tmp_path):
    """A record without the switches means the paper's choices: it matches a config at the
    defaults, and a switched architecture is refused by name."""
    from scm_jax import checkpoint as ckpt
    from scm_jax import stage_identity

    config = load_experiment("digits", "variant=tiny")
    objective = objectives.build(config, "teacher")
    record = stage_identity.stage_record(config, objective)
    old = json.loads(json.dumps(record))
    for key in ("time_transform", "time_embedding", "modulation"):
        del old["identity"]["model"][key]
    stage_identity.write_record(str(tmp_path), old)
    stage_identity.check_stage_config(str(tmp_path), record)
    switched = load_experiment("digits", "variant=tiny", ["model.modulation=adagn"])
    with pytest.raises(ckpt.CheckpointMismatchError, match="model.modulation = 'adn' there"):
        stage_identity.check_stage_config(
            str(tmp_path), stage_identity.stage_record(switched, objectives.build(switched,
                                                                                  "teacher")))
