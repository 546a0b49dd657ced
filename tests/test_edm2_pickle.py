"""Tests for scm_jax.edm2_pickle: EDM2's network pickles read without torch and without running
the code they embed. The pickles are written by tests/edm2_format.py, which names exactly the
globals EDM2's own pickles name."""
import builtins
import collections
import os
import pickle
import sys

import numpy as np
import pytest

from scm_jax import edm2_pickle
from scm_jax.errors import MissingInputError, UserError
from tests.edm2_format import random_edm2_params, write_edm2_pickle

# Tiny sizes: 16x16 latents of 4 channels, two levels (16x16, 8x8), attention at 8x8.
GIVEN = dict(img_resolution=16, img_channels=4, label_dim=10, model_channels=16,
             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=8)
# EDM2's defaults (training/networks_edm2.py) for the arguments a test leaves out.
EDM2_DEFAULTS = dict(use_fp16=True, sigma_data=0.5, logvar_channels=128, channel_mult_noise=None,
                     channel_mult_emb=None, label_balance=0.5, concat_balance=0.5,
                     resample_filter=[1, 1], dropout=0, res_balance=0.3, attn_balance=0.3,
                     clip_act=256)
NETWORK_CLASSES = ("Block", "MPConv", "MPFourier", "Precond", "UNet")


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")   # shown when a test fails
    return np.random.default_rng(seed)


def _random_kwargs(rng, **overrides) -> dict:
    """GIVEN plus a few arguments of Precond, UNet and Block drawn at random."""
    drawn = dict(sigma_data=float(rng.uniform(0.2, 1.0)), concat_balance=float(rng.uniform()),
                 dropout=float(rng.uniform(0, 0.5)), res_balance=float(rng.uniform()))
    return {**GIVEN, **drawn, **overrides}


def _network_file(tmp_path, rng, **write_kwargs):
    kwargs = _random_kwargs(rng)
    params = random_edm2_params(kwargs, rng)
    path = tmp_path / "network-snapshot.pkl"
    write_edm2_pickle(path, params, kwargs, **write_kwargs)
    return path, params, kwargs


@pytest.mark.parametrize("protocol, top_level, label_dim", [
    (4, "snapshot", 10), (3, "snapshot", 10), (4, "precond", 10), (4, "snapshot", 0)])
def test_round_trip(tmp_path, rng, protocol, top_level, label_dim):
    kwargs = _random_kwargs(rng, label_dim=label_dim)
    params = random_edm2_params(kwargs, rng)
    path = tmp_path / "net.pkl"
    write_edm2_pickle(path, params, kwargs, top_level=top_level, protocol=protocol)
    net = edm2_pickle.load(path)

    assert list(net.params) == list(params)   # names, in state_dict() order
    for name, value in params.items():
        loaded = net.params[name]
        assert loaded.dtype == np.float32 and loaded.shape == value.shape, name
        np.testing.assert_array_equal(loaded, value.astype(np.float16).astype(np.float32), name)
    assert net.kwargs == {**EDM2_DEFAULTS, **kwargs}
    assert net.kwargs["res_balance"] != EDM2_DEFAULTS["res_balance"]   # given, not defaulted
    assert ("unet.emb_label.weight" in net.params) == bool(label_dim)
    extra = ("EDM2Loss", "StabilityVAEEncoder") if top_level == "snapshot" else ()
    assert net.class_names == tuple(sorted(NETWORK_CLASSES + extra))
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torch_utils", "dnnlib")]


def test_names_and_shapes_follow_edm2(rng):
    params = random_edm2_params(_random_kwargs(rng), rng)
    shapes = {name: value.shape for name, value in params.items()}
    cemb = 32   # model_channels * max(channel_mult)
    assert shapes["unet.emb_fourier.freqs"] == (16,)
    assert shapes["unet.emb_noise.weight"] == (cemb, 16)
    assert shapes["unet.emb_label.weight"] == (cemb, 10)
    assert shapes["unet.enc.16x16_conv.weight"] == (16, 5, 3, 3)
    assert shapes["unet.enc.8x8_down.conv_res0.weight"] == (16, 16, 3, 3)
    assert shapes["unet.enc.8x8_block0.conv_skip.weight"] == (32, 16, 1, 1)
    assert shapes["unet.enc.8x8_block0.attn_qkv.weight"] == (96, 32, 1, 1)
    assert shapes["unet.dec.8x8_in0.attn_proj.weight"] == (32, 32, 1, 1)
    assert "unet.dec.8x8_in1.attn_qkv.weight" not in shapes
    assert shapes["unet.dec.8x8_block1.conv_res0.weight"] == (32, 48, 3, 3)   # 32 + skip 16
    assert shapes["unet.dec.16x16_up.emb_linear.weight"] == (32, cemb)
    assert shapes["unet.dec.16x16_block1.emb_gain"] == ()
    assert shapes["unet.out_conv.weight"] == (4, 16, 3, 3)
    assert shapes["logvar_linear.weight"] == (1, 128)
    assert len(params) == 63


@pytest.mark.parametrize("top_level", ["snapshot", "precond"])
def test_embedded_source_is_never_run(tmp_path, rng, top_level):
    marker = tmp_path / "module_src_ran"
    source = f"open({str(marker)!r}, 'w').write('ran')\n"
    path, params, _ = _network_file(tmp_path, rng, source=source, top_level=top_level)
    net = edm2_pickle.load(path)
    assert not marker.exists()
    assert set(net.params) == set(params)
    exec(compile(source, "<module_src>", "exec"), {})   # the source does write when run
    assert marker.exists()


def test_embedded_source_is_never_compiled(tmp_path, rng):
    path, params, _ = _network_file(tmp_path, rng, source="def broken(:\n")
    assert set(edm2_pickle.load(path).params) == set(params)


@pytest.mark.parametrize("top_level", ["snapshot", "precond"])
@pytest.mark.parametrize("call", ["os.system", "builtins.eval", "collections.Counter"])
def test_unexpected_global_is_refused(tmp_path, rng, top_level, call):
    marker = tmp_path / "payload_ran"
    func, args = {
        "os.system": (os.system, (f"touch {marker}",)),
        "builtins.eval": (builtins.eval, (f"open({str(marker)!r}, 'w')",)),
        "collections.Counter": (collections.Counter, ("abc",)),
    }[call]
    named = f"{func.__module__}.{func.__qualname__}"   # what pickle writes: posix.system, ...
    path, _, _ = _network_file(tmp_path, rng, extra_globals={"payload": (func, args)},
                               top_level=top_level)
    with pytest.raises(edm2_pickle.TorchFileError) as err:
        edm2_pickle.load(path)
    message = str(err.value)
    assert message.startswith(f"refusing global {named} in {str(path)!r}: not part of an EDM2")
    assert "\n" not in message
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    assert not marker.exists()


def test_missing_file(tmp_path):
    path = tmp_path / "absent.pkl"
    with pytest.raises(MissingInputError, match=f"not found at {str(path)!r}"):
        edm2_pickle.load(path)


@pytest.mark.parametrize("content, expected", [
    ({"state_dict": {"w": [1.0]}}, "found a dict with the keys ['state_dict']; expected a dict "
                                   "whose 'ema' is EDM2's persistent Precond"),
    ({"ema": [1, 2]}, "its 'ema' is a list; expected EDM2's persistent Precond"),
    ([1, 2, 3], "found a list; expected"),
])
def test_not_a_network_pickle(tmp_path, content, expected):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(edm2_pickle.TorchFileError) as err:
        edm2_pickle.load(path)
    message = str(err.value)
    assert message.startswith(f"cannot read {str(path)!r} as an EDM2 network pickle: ")
    assert expected in message and "\n" not in message


def test_truncated_or_foreign_file(tmp_path, rng):
    path, _, _ = _network_file(tmp_path, rng)
    data = path.read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[:int(rng.integers(len(data) // 4, len(data) - 16))])
    foreign = tmp_path / "foreign.pkl"
    foreign.write_bytes(rng.bytes(256))
    for bad in (cut, foreign):
        with pytest.raises(edm2_pickle.TorchFileError) as err:
            edm2_pickle.load(bad)
        assert str(err.value).startswith(f"cannot read {str(bad)!r} as an EDM2 network pickle")
        assert "\n" not in str(err.value)


def test_numpy_values_of_either_numpy_name(tmp_path, rng):
    """The encoder's arrays and a numpy scalar, named numpy.core (numpy 1.x, as the published
    pickles) and as this numpy names them."""
    for legacy_numpy in (True, False):
        path, params, _ = _network_file(
            tmp_path, rng, extra_entries={"seed": np.float32(rng.uniform())},
            legacy_numpy=legacy_numpy)
        names = b"numpy.core.multiarray" in path.read_bytes()
        assert names == legacy_numpy or np.__version__.startswith("1.")
        assert set(edm2_pickle.load(path).params) == set(params)


def test_allowed_globals():
    assert set(edm2_pickle.ALLOWED_GLOBALS) == {
        "collections.OrderedDict", "builtins.set", "dnnlib.util.EasyDict",
        "torch_utils.persistence._reconstruct_persistent_obj",
        "torch.nn.modules.container.ModuleDict", "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
        "torch.storage._load_from_bytes", "numpy.ndarray", "numpy.dtype",
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
