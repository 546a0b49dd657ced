"""Scanned blocks (`model.scan_blocks`): the same network as the unrolled one (initial values,
forward, JVP and gradient, with and without remat), the same parameter count, FSDP over the
stacked weights with the layer axis whole, EDM2's forced weight normalization per block, and
checkpoints that restore across the two layouts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import checkpoint, configs, objectives, sharding
from scm_jax.data import data_shape
from scm_jax.networks import ddpmpp, dit, edm2, init_backbone
from scm_jax.networks.scan import convert_like, is_scanned_tree
from tests.helpers import load_experiment

unbox = nn.meta.unbox

# Tiny networks with runs to scan: three blocks per level (EDM2, DDPM++), three DiT blocks.
NETS = {
    "edm2": (lambda **kw: edm2.EDM2UNet(model_channels=8, channel_mult=(1, 2), num_blocks=3,
                                        attn_resolutions=(4,), channels_per_head=8,
                                        noise_channels=8, emb_channels=16, num_classes=5,
                                        dropout=0.1, **kw), (2, 8, 8, 3)),
    "ddpmpp": (lambda **kw: ddpmpp.DDPMPP(channels=8, channel_mult=(1, 2), num_blocks=3,
                                          attn_resolutions=(4,), num_heads=2, noise_channels=8,
                                          emb_channels=16, num_classes=5, dropout=0.1, **kw),
               (2, 8, 8, 3)),
    "dit": (lambda **kw: dit.DiT(hidden_size=32, depth=3, num_heads=2, patch_size=2,
                                 noise_channels=16, num_classes=5, dropout=0.1, **kw),
            (2, 8, 8, 4)),
}
# The runs each layout must have (EDM2 and DDPM++: the same names).
UNET_RUNS = {"enc_8x8_block0to2", "enc_4x4_block1to2", "dec_4x4_block0to2", "dec_8x8_block1to3"}
RUNS = {"edm2": UNET_RUNS, "ddpmpp": UNET_RUNS, "dit": {"block0to2"}}


def _inputs(shape, seed=1):
    kx, kt, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kx, shape), jax.random.uniform(kt, shape[:1], minval=0.1,
                                                             maxval=1.5),
            jax.random.randint(ky, shape[:1], 0, 6))


def _perturbed(params, seed):
    """Every weight moved off its initial value (zero-initialized layers hide no path)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [p + 0.2 * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module", params=sorted(NETS))
def pair(request):
    name = request.param
    make, shape = NETS[name]
    x, t, y = _inputs(shape)
    unrolled, scanned = make(), make(scan_blocks=True)
    p_unrolled = unbox(init_backbone(unrolled, jax.random.PRNGKey(0), x, t, y))
    p_scanned = unbox(init_backbone(scanned, jax.random.PRNGKey(0), x, t, y))
    return name, make, unrolled, scanned, p_unrolled, p_scanned, (x, t, y)


@pytest.mark.slow
def test_scanned_network_starts_from_the_same_values_with_the_same_count(pair):
    name, _, _, _, p_unrolled, p_scanned, _ = pair
    assert RUNS[name] <= set(p_scanned) and not is_scanned_tree(p_unrolled)
    count = lambda p: sum(a.size for a in jax.tree.leaves(p))  # noqa: E731
    assert count(p_scanned) == count(p_unrolled)
    back = convert_like(p_scanned, p_unrolled)
    jax.tree.map(np.testing.assert_array_equal, back, p_unrolled)
    again = convert_like(p_unrolled, p_scanned)
    jax.tree.map(np.testing.assert_array_equal, again, p_scanned)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "block"])
def test_forward_jvp_and_gradient_equal_the_unrolled_network(pair, remat):
    name, make, unrolled, _, p_unrolled, _, (x, t, y) = pair
    scanned = make(scan_blocks=True, remat=remat)
    p_u = _perturbed(p_unrolled, seed=3)
    p_s = convert_like(p_u, unbox(jax.eval_shape(
        lambda: scanned.init(jax.random.PRNGKey(0), x, t, y))["params"]))

    def f(module, params, x, t):
        return module.apply({"params": params}, x, t, y)

    out_u, out_s = f(unrolled, p_u, x, t), f(scanned, p_s, x, t)
    assert float(jnp.abs(out_u).max()) > 1e-2
    np.testing.assert_allclose(out_s, out_u, rtol=2e-5, atol=2e-5)

    dx, dt = jax.random.normal(jax.random.PRNGKey(5), x.shape), jnp.array([0.7, -0.4])
    _, tan_u = jax.jvp(lambda x, t: f(unrolled, p_u, x, t), (x, t), (dx, dt))
    _, tan_s = jax.jvp(lambda x, t: f(scanned, p_s, x, t), (x, t), (dx, dt))
    np.testing.assert_allclose(tan_s, tan_u, rtol=2e-5, atol=2e-5)

    # The gradient through the scan (remat inside its body) is the unrolled gradient, stacked.
    w = jax.random.normal(jax.random.PRNGKey(6), x.shape)
    loss = lambda module: lambda p: jnp.sum(w * f(module, p, x, t))  # noqa: E731
    g_u = jax.grad(loss(unrolled))(p_u)
    g_s = convert_like(jax.grad(loss(scanned))(p_s), p_u)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_u))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
                 g_s, g_u)


def test_dropout_runs_inside_the_scan(pair):
    """Training mode draws dropout in every scanned block (masks differ per block)."""
    _, _, _, scanned, _, p_scanned, (x, t, y) = pair
    apply = lambda k: scanned.apply({"params": p_scanned}, x, t, y, train=True,  # noqa: E731
                                    rngs={"dropout": jax.random.PRNGKey(k)})
    p = _perturbed(p_scanned, seed=4)
    a, b = (scanned.apply({"params": p}, x, t, y, train=True,
                          rngs={"dropout": jax.random.PRNGKey(k)}) for k in (0, 1))
    assert float(jnp.abs(a - b).max()) > 0
    assert apply(0).shape == x.shape


def test_fsdp_splits_stacked_weights_as_unrolled_ones_with_the_layer_axis_whole(pair):
    name, _, unrolled, scanned, _, _, (x, t, y) = pair
    mesh = sharding.make_mesh(configs.ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    rules = sharding.logical_rules(configs.ml_collections.ConfigDict(dict(rules=None)))
    boxed = lambda m: jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, t, y))  # noqa
    spec_u = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(boxed(unrolled), mesh, rules))
    spec_s = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(boxed(scanned), mesh, rules))
    run = sorted(RUNS[name])[0]
    first = f"{run.split('block')[0]}block{run.split('block')[1].split('to')[0]}"
    pairs = jax.tree_util.tree_flatten_with_path(spec_s["params"][run]["layer"])[0]
    sharded = 0
    for path, spec in pairs:
        one = spec_u["params"][first]
        for entry in path:
            one = one[entry.key]
        assert spec[0] is None and tuple(spec[1:]) == tuple(one)
        sharded += sharding.FSDP_AXIS in tuple(spec)
    assert sharded   # some weight of the run is split over fsdp


def test_forced_weight_normalization_projects_each_scanned_block():
    make, shape = NETS["edm2"]
    x, t, y = _inputs(shape)
    unrolled = make()
    p_u = _perturbed(unbox(init_backbone(unrolled, jax.random.PRNGKey(0), x, t, y)), seed=7)
    scanned_shapes = unbox(jax.eval_shape(lambda: make(scan_blocks=True).init(
        jax.random.PRNGKey(0), x, t, y))["params"])
    p_s = convert_like(p_u, scanned_shapes)
    projected = convert_like(edm2.project_params(p_s), p_u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 projected, edm2.project_params(p_u))


def _stage(scan: bool):
    """The IN512 DiT runlocal sCT stage (three blocks so that there is a run), either layout."""
    config = load_experiment("imagenet512", "variant=runlocal,backbone=dit,stage=sct",
                             [f"model.scan_blocks={scan}", "model.depth=3"])
    return config, objectives.build(config, "sct")


def test_a_checkpoint_restores_in_the_other_layout(tmp_path):
    config, unrolled_obj = _stage(False)
    _, scanned_obj = _stage(True)
    shape = data_shape(config.data)
    state = unrolled_obj.init_state(jax.random.PRNGKey(0), shape)
    state = state.replace(nets=dict(state.nets, net=state.nets["net"].replace(
        ema=_perturbed(state.nets["net"].ema, seed=9))))
    store = checkpoint.CheckpointStore(tmp_path / "sct", async_save=False)
    store.save(4, state, {"epoch": 1})
    store.wait()

    abstract, _ = scanned_obj.abstract_state(shape)
    restored, data = store.restore(abstract)
    assert data == {"epoch": 1} and is_scanned_tree(restored.nets["net"].params)
    back = convert_like(restored, state)
    jax.tree.map(np.testing.assert_array_equal, back, state)

    # Another stage's EMA (the teacher's, for a student) too, from the same files.
    subtree = {"nets": {"net": {"ema": abstract.nets["net"].ema}}}
    ema = store.restore_subtree(subtree, 4)["nets"]["net"]["ema"]
    jax.tree.map(np.testing.assert_array_equal, convert_like(ema, state.nets["net"].ema),
                 state.nets["net"].ema)
    store.close()


@pytest.mark.slow
def test_scm_loss_evaluates_a_scanned_network_once(pair):
    """The sCM loss differentiates its tangent JVP's primal (`scm.scm_loss`): the same gradient
    as the two-pass form (tangent JVP at stop-gradient parameters, then a second forward), and
    on a scanned network, where XLA cannot merge two loops, the 4/3 FLOP bound of one forward
    shared between the tangent and gradient passes (sCM Sec. 5.1) plus 10%, where the two-pass
    form pays a second forward (5/3). FLOPs of the compiled CPU programs, every loop trip
    counted (`step_cost.flops_of`)."""
    from scm_jax.networks import bind_apply
    from scm_jax.objectives.randomness import Randomness
    from scm_jax.objectives.regression import weighted_regression
    from scm_jax.objectives.scm import scm_inputs, scm_loss, scm_targets
    from scm_jax.step_cost import flops_of

    _, _, _, scanned, _, p_scanned, (x0, _, y) = pair
    net_fn = bind_apply(scanned, train=True)
    params = {"net": _perturbed(p_scanned, seed=7), "weight": jnp.float32(0.3)}
    weight_fn = lambda p, t: p * jnp.cos(t)  # noqa: E731
    rng = Randomness.for_batch(jax.random.PRNGKey(8), x0.shape[0])
    cond = {"y": y}
    draw = dict(step=3, sigma_d=0.5, p_mean=-0.4, p_std=1.4, warmup_steps=10)
    settings = dict(sigma_d=0.5, tangent_c=0.1, tangent_norm="l2")

    def one_pass(params):
        inputs = scm_inputs(rng, x0, cond, **draw)
        return scm_loss(params, inputs, net_fn=net_fn, weight_fn=weight_fn, **settings)

    def two_pass(params):
        targets = scm_targets(rng, x0, cond, net_fn=net_fn, params=params["net"],
                              p_mean=draw["p_mean"], p_std=draw["p_std"], step=draw["step"],
                              warmup_steps=draw["warmup_steps"], **settings)
        return weighted_regression(params, targets, net_fn=net_fn, weight_fn=weight_fn)

    def teacher(params):  # one forward + backward of the same network
        t = jnp.full(x0.shape[:1], 0.6)
        return jnp.sum(net_fn(params["net"], x0, t, cond, rng.dropout_key) ** 2)

    (l1, m1), g1 = jax.value_and_grad(one_pass, has_aux=True)(params)
    (l2, m2), g2 = jax.value_and_grad(two_pass, has_aux=True)(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(m1["tangent_norm"], m2["tangent_norm"], rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g2))
    assert scale > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
                 g1, g2)

    flops = {name: flops_of(jax.jit(jax.grad(fn, has_aux=fn is not teacher)).lower(params)
                            .compile())
             for name, fn in (("one", one_pass), ("two", two_pass), ("teacher", teacher))}
    one, two = flops["one"] / flops["teacher"], flops["two"] / flops["teacher"]
    assert one <= 4 / 3 * 1.1, flops
    assert two > one * 1.1, flops
