"""SD-VAE (networks/vae.py), latent normalization and dataset (data/latents.py), encoder script.

A reduced VAE (two levels, 8/16 channels, 4 groups) runs through the same code; the full
sd-vae-ft-mse structure is checked abstractly with `jax.eval_shape`.
"""
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from scm_jax.data import latent_encoder as enc
from scm_jax.data import latents as lat
from scm_jax.networks import vae as V

SMALL = V.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
RES = 16                      # small images; the small VAE downsamples 2x -> 8x8x4 latents
LATENT = (RES // 2, RES // 2, 4)


def _random_params(vae, seed=0):
    """Random numpy params of `vae`'s shapes (no init to compile); biases and norm affines are
    non-trivial so that every converted tensor matters."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        if path[-1].key == "kernel":   # fan-in scaling keeps activations O(1)
            return rng.normal(0, np.prod(x.shape[:-1]) ** -0.5, x.shape)
        return (path[-1].key == "scale") + 0.1 * rng.normal(size=x.shape)

    return jax.tree_util.tree_map_with_path(lambda p, x: leaf(p, x).astype(np.float32),
                                            V.vae_param_shapes(vae))


@pytest.fixture(scope="module")
def params():
    return _random_params(SMALL)


@pytest.fixture(scope="module")
def encode_fn(params):
    return jax.jit(lambda x: SMALL.apply({"params": params}, x, method=V.AutoencoderKL.encode))


@pytest.fixture(scope="module")
def decode_fn(params):
    return jax.jit(lambda z: SMALL.apply({"params": params}, z, method=V.AutoencoderKL.decode))


def _images(n, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (n, RES, RES, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------ VAE


def test_full_size_structure_matches_sd_vae_ft_mse():
    shapes = V.vae_param_shapes()
    # diffusers: AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse").num_parameters()
    assert sum(x.size for x in jax.tree.leaves(shapes)) == V.SD_VAE_NUM_PARAMS == 83_653_863
    expected = V.expected_diffusers_shapes()
    assert len(expected) == 248   # tensors in the published diffusion_pytorch_model.safetensors
    known = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "encoder.down_blocks.3.resnets.1.norm2.weight": (512,),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
        "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: expected[k] for k in known} == known
    assert not any("downsamplers" in k for k in expected if k.startswith("encoder.down_blocks.3"))
    # The saver's keys and shapes are exactly the loader's, in both attention key styles.
    new = jax.eval_shape(V.diffusers_state_dict, shapes)
    assert {k: tuple(v.shape) for k, v in new.items()} == expected
    old = jax.eval_shape(lambda p: V.diffusers_state_dict(p, attention_keys="old"), shapes)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old and len(old) == 248
    assert not any(".to_q." in k or ".to_out." in k for k in old)
    # 8x downsampling of 512x512 images into 4 channels, and back.
    vae, x = V.AutoencoderKL(), jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
    mean, std = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method=vae.encode),
                               shapes, x)
    assert mean.shape == std.shape == (2, 64, 64, 4)
    out = jax.eval_shape(lambda p, z: vae.apply({"params": p}, z, method=vae.decode), shapes, mean)
    assert out.shape == (2, 512, 512, 3)


@pytest.mark.parametrize("attention_keys", ["new", "old"])
def test_save_load_round_trip(params, tmp_path, attention_keys):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    V.save_vae_params_diffusers(params, path, attention_keys=attention_keys)
    keys = set(load_file(path))
    assert ("encoder.mid_block.attentions.0.query.weight" in keys) == (attention_keys == "old")
    loaded = V.load_vae_params(tmp_path, SMALL)   # a directory holding the file works too
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert a.dtype == np.float32 and np.array_equal(a, b)


def test_encode_decode_shapes_and_determinism(params, encode_fn, decode_fn):
    x = _images(3, seed=1)
    mean, std = encode_fn(x)
    assert mean.shape == std.shape == (3, *LATENT)
    assert np.all(np.asarray(std) > 0)
    recon = decode_fn(mean)
    assert recon.shape == x.shape and recon.dtype == jnp.float32
    np.testing.assert_array_equal(recon, decode_fn(encode_fn(x)[0]))
    np.testing.assert_allclose(jax.jit(SMALL.apply)({"params": params}, x), recon, rtol=1e-6,
                               atol=1e-6)
    # Per-example: GroupNorm and attention never mix batch rows.
    np.testing.assert_allclose(encode_fn(x[1:2])[0], mean[1:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 2"):
        SMALL.apply({"params": params}, x[:, :15], method=V.AutoencoderKL.encode)


def _conv_ref(x, w, b, stride=1, pad=((1, 1), (1, 1))):
    """NHWC input, PyTorch OIHW weight: explicit sum over the kernel taps in float64."""
    x = np.pad(x.astype(np.float64), ((0, 0), *pad, (0, 0)))
    kh, kw = w.shape[2:]
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[0]))
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, dy:dy + stride * ho:stride, dx:dx + stride * wo:stride, :]
            out += np.einsum("bhwi,oi->bhwo", patch, w[:, :, dy, dx].astype(np.float64))
    return out + b


def test_conversion_against_pytorch_layout_numpy():
    """Random PyTorch-layout tensors -> Flax; conv, strided conv and Linear outputs equal a numpy
    computation that uses the PyTorch-layout tensors directly."""
    rng = np.random.default_rng(3)
    state = {k: rng.normal(size=s).astype(np.float32) * 0.3
             for k, s in V.expected_diffusers_shapes(SMALL).items()}
    params = V.params_from_diffusers(state, SMALL)
    x = _images(2, seed=4)
    _, inter = jax.jit(lambda p, x: SMALL.apply(
        {"params": p}, x, method=V.AutoencoderKL.encode, capture_intermediates=True,
        mutable=["intermediates"]))(params, x)
    enc_ = inter["intermediates"]["encoder"]
    out = lambda *path: np.asarray(  # noqa: E731
        __import__("functools").reduce(lambda d, k: d[k], path, enc_)["__call__"][0])
    tol = dict(rtol=1e-4, atol=1e-4)
    # 3x3 conv, padding 1.
    np.testing.assert_allclose(out("conv_in"), _conv_ref(
        x, state["encoder.conv_in.weight"], state["encoder.conv_in.bias"]), **tol)
    # Downsample: one zero row/column at the bottom/right, stride 2 (diffusers padding=0).
    h = out("down_blocks_0", "resnets_0")
    np.testing.assert_allclose(out("down_blocks_0", "downsamplers_0"), _conv_ref(
        h, state["encoder.down_blocks.0.downsamplers.0.conv.weight"],
        state["encoder.down_blocks.0.downsamplers.0.conv.bias"], stride=2,
        pad=((0, 1), (0, 1))), **tol)
    # Linear: y = x W^T + b with the PyTorch [out, in] weight.
    y = out("mid_block", "attentions_0", "group_norm")
    q = out("mid_block", "attentions_0", "to_q")
    w, b = (state[f"encoder.mid_block.attentions.0.to_q.{n}"] for n in ("weight", "bias"))
    np.testing.assert_allclose(q.reshape(y.shape), y @ w.T.astype(np.float64) + b, **tol)


def test_load_errors(params, tmp_path):
    missing = tmp_path / "nowhere" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*stabilityai/sd-vae-ft-mse"):
        V.load_vae_params(missing, SMALL)
    state = {k: np.asarray(v) for k, v in V.diffusers_state_dict(params).items()}

    renamed = dict(state)
    renamed["encoder.conv_inn.weight"] = renamed.pop("encoder.conv_in.weight")
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match=r"(?s)1 missing keys.*encoder\.conv_in\.weight.*"
                                         r"1 unexpected keys.*encoder\.conv_inn\.weight"):
        V.load_vae_params(tmp_path / "renamed.safetensors", SMALL)

    wrong = dict(state)
    wrong["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.weight: got \(3, 8, 1, 1\), "
                                         r"expected \(3, 8, 3, 3\)"):
        V.load_vae_params(tmp_path / "wrong.safetensors", SMALL)
    # The full-size loader names the mismatch too (a small file is not sd-vae-ft-mse).
    with pytest.raises(ValueError, match="wrong shapes"):
        V.params_from_diffusers(state)

    # LDM-converted files store attention projections as 1x1 convs [C, C, 1, 1]: accepted.
    ldm = {k: (v[:, :, None, None] if ".attentions." in k and v.ndim == 2 else v)
           for k, v in state.items()}
    loaded = V.params_from_diffusers(ldm, SMALL)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ normalization


def test_latent_normalization(x64):
    mu, sigma = np.array([1.56, -0.695, 0.483, 0.729]), np.array([5.27, 5.91, 4.21, 4.31])
    np.testing.assert_array_equal(lat.LATENT_MEAN, mu)
    np.testing.assert_array_equal(lat.LATENT_STD, sigma)
    z = np.random.default_rng(5).normal(0, 5, (3, 4, 4, 4))
    for sigma_d in (0.5, 1.3):
        ref = np.stack([(z[..., c] - mu[c]) * sigma_d / sigma[c] for c in range(4)], -1)
        x = lat.normalize_latents(z, sigma_d)
        assert x.dtype == np.float64
        np.testing.assert_allclose(x, ref, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(lat.denormalize_latents(x, sigma_d), z, rtol=1e-13, atol=1e-13)
        xj = lat.normalize_latents(jnp.asarray(z), sigma_d)
        assert xj.dtype == jnp.float64
        np.testing.assert_allclose(xj, ref, rtol=1e-13, atol=1e-15)
        x32 = lat.normalize_latents(z.astype(np.float32), sigma_d)
        assert x32.dtype == np.float32   # float32 batches stay float32
        np.testing.assert_allclose(x32, ref, rtol=1e-5, atol=1e-6)
    # The paper's constants map mu_c to 0 and mu_c + sigma_c to sigma_d.
    np.testing.assert_allclose(lat.normalize_latents(lat.LATENT_MEAN + lat.LATENT_STD), 0.5,
                               rtol=1e-6)


def test_decode_for_eval(params, decode_fn):
    x = np.random.default_rng(6).normal(0, 1.5, (3, *LATENT)).astype(np.float32)
    images = lat.decode_for_eval(params, x, vae=SMALL)
    ref = decode_fn(lat.denormalize_latents(x))
    assert float(jnp.abs(ref).max()) > 1.0   # the clip is exercised
    np.testing.assert_allclose(images, np.clip(ref, -1, 1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ encoding and the dataset

N, HOST_BATCH, SHARD_BATCHES = 36, 8, 2   # each of 2 hosts: 18 images = batches 8, 8, 2


def _host_batches(p, log=None):
    """Host p's ordered pass: labels are global example ids, so every test can track examples."""
    ids = np.arange(p * N // 2, (p + 1) * N // 2)
    images = _images(N, seed=7)
    for i in range(0, len(ids), HOST_BATCH):
        if log is not None:
            log.append(i)
        sel = ids[i:i + HOST_BATCH]
        yield dict(image=images[sel], label=sel.astype(np.int32))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, params):
    """Two simulated hosts encode into one directory through the CLI's padded, sharded fn."""
    out = str(tmp_path_factory.mktemp("latents"))
    encode_fn = enc.make_encode_fn(SMALL, params, HOST_BATCH)
    calls = []
    counting = lambda x: calls.append(len(x)) or encode_fn(x)  # noqa: E731
    kw = dict(shard_batches=SHARD_BATCHES, process_count=2, settings=dict(batch_size=16),
              metadata=dict(vae=dict(file="vae.safetensors")), log=lambda m: None)
    assert enc.encode_batches(_host_batches(0), counting, out, process_index=0, **kw) is None
    with pytest.raises(FileNotFoundError, match="scm_jax.encode_latents"):
        lat.read_index(out)   # one host done: not readable yet
    index = enc.encode_batches(_host_batches(1), counting, out, process_index=1, **kw)
    assert calls == [8, 8, 2] * 2
    return out, index, encode_fn


def test_encode_writes_index_and_raw_posterior(encoded, encode_fn):
    out, index, _ = encoded
    assert index == lat.read_index(out)
    assert index["num_examples"] == N and index["latent_shape"] == list(LATENT)
    assert index["image_size"] == [RES, RES]
    assert [s["name"] for s in index["shards"]] == [
        "p00000-s000000", "p00000-s000001", "p00001-s000000", "p00001-s000001"]
    assert [s["count"] for s in index["shards"]] == [16, 2, 16, 2]
    assert index["normalization"]["mean"] == lat.LATENT_MEAN.tolist()
    assert index["vae"]["file"] == "vae.safetensors" and index["settings"]["batch_size"] == 16
    source = lat.LatentSource(out)
    mean, std = encode_fn(_images(N, seed=7))
    for i in (0, 17, 18, 35):
        ex = source[i]
        assert ex["label"] == i
        np.testing.assert_allclose(ex["mean"], mean[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ex["std"], std[i], rtol=1e-4, atol=1e-6)
    # Memory-mapped, not loaded.
    assert isinstance(np.load(os.path.join(out, "p00000-s000000", "mean.npy"), mmap_mode="r"),
                      np.memmap)


def test_encoder_resumes_and_refuses_other_settings(encoded, tmp_path, params):
    out, _, encode_fn = encoded
    calls = []
    counting = lambda x: calls.append(len(x)) or encode_fn(x)  # noqa: E731

    def crashing(p):   # dies after its third batch, i.e. inside shard 1
        for i, batch in enumerate(_host_batches(p)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    kw = dict(shard_batches=SHARD_BATCHES, process_count=1, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_batches(crashing(0), counting, str(tmp_path), **kw)
    assert sorted(os.listdir(tmp_path)) == ["encode_config.json", "p00000-s000000"]
    calls.clear()
    index = enc.encode_batches(_host_batches(0), counting, str(tmp_path), **kw)
    assert calls == [2]   # shard 0 skipped: only the last (partial) batch is encoded again
    assert index["num_examples"] == N // 2
    for shard in ("p00000-s000000", "p00000-s000001"):
        for name in lat.ARRAYS:
            a, b = (np.load(os.path.join(d, shard, f"{name}.npy")) for d in (tmp_path, out))
            np.testing.assert_array_equal(a, b)
    calls.clear()   # a finished process does not even read its data again
    seen = []
    enc.encode_batches(_host_batches(0, log=seen), counting, str(tmp_path), **kw)
    assert calls == [] and seen == []
    with pytest.raises(ValueError, match="shard_batches"):
        enc.encode_batches(_host_batches(0), counting, str(tmp_path), shard_batches=3,
                           process_count=1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        enc.encode_batches([dict(image=np.full((1, RES, RES, 3), 255.0), label=[0])], counting,
                           str(tmp_path / "other"), log=lambda m: None)


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_latent_dataset(encoded):
    out = encoded[0]
    cfg = lat.latent_data_config(path=out, resolution=RES, sample_posterior=False, num_threads=2)
    source = lat.LatentSource(out)
    batches = _take(lat.build_latent_batches(cfg, batch_size=12, seed=0), 6)   # two epochs
    assert batches[0]["image"].shape == (12, *LATENT) and batches[0]["image"].dtype == np.float32
    assert batches[0]["label"].dtype == np.int32
    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels[:N]) == sorted(labels[N:]) == list(range(N))   # each epoch: every example
    assert not np.array_equal(labels[:N], labels[N:])                     # reshuffled per epoch
    assert not np.array_equal(labels[:N], np.arange(N))
    for b in batches[:2]:
        for x, y in zip(b["image"], b["label"]):
            np.testing.assert_allclose(x, lat.normalize_latents(source[y]["mean"]), rtol=1e-6)

    # Deterministic given the seed; another seed, another order.
    again = _take(lat.build_latent_batches(cfg, batch_size=12, seed=0), 6)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = next(lat.build_latent_batches(cfg, batch_size=12, seed=1))
    assert not np.array_equal(other["label"], batches[0]["label"])

    # Two hosts: disjoint contiguous halves of the single-host global batch (where
    # make_array_from_process_local_data puts each process's rows).
    hosts = [_take(lat.build_latent_batches(cfg, batch_size=12, seed=0, process_index=p,
                                            process_count=2), 6) for p in (0, 1)]
    for step, full in enumerate(batches):
        h0, h1 = hosts[0][step], hosts[1][step]
        assert h0["image"].shape == (6, *LATENT)
        assert not set(h0["label"]) & set(h1["label"])
        np.testing.assert_array_equal(full["label"][:6], h0["label"])
        np.testing.assert_array_equal(full["label"][6:], h1["label"])
        np.testing.assert_array_equal(full["image"][6:], h1["image"])


def test_latent_dataset_resume_and_posterior_samples(encoded):
    out = encoded[0]
    cfg = lat.latent_data_config(path=out, resolution=RES, num_threads=2)
    assert cfg.sample_posterior   # the default
    it = lat.build_latent_batches(cfg, batch_size=8, seed=3)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 5)   # crosses the epoch boundary (36 examples)
    resumed = lat.build_latent_batches(cfg, batch_size=8, seed=3)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 5)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])

    # z = mean + std * eps: eps is standard normal, fresh for each epoch.
    source = lat.LatentSource(out)
    batches = _take(lat.build_latent_batches(cfg, batch_size=12, seed=0), 6)
    eps, first = [], {}
    for b in batches:
        for x, y in zip(b["image"], b["label"]):
            ex = source[y]
            eps.append((lat.denormalize_latents(x) - ex["mean"]) / ex["std"])
            if y in first:
                assert not np.allclose(first[y], x)
            first[y] = x
    eps = np.stack(eps)
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    # ... and keyed by the global stream position, so a host sees the same samples as one host.
    host1 = next(lat.build_latent_batches(cfg, batch_size=12, seed=0, process_index=1,
                                          process_count=2))
    np.testing.assert_array_equal(host1["image"], batches[0]["image"][6:])


def test_latent_dataset_errors(tmp_path, encoded):
    out = encoded[0]
    cfg = lat.latent_data_config(path=str(tmp_path / "absent"), resolution=RES)
    with pytest.raises(FileNotFoundError, match=r"(?s)absent.*python -m scm_jax\.encode_"):
        lat.build_latent_batches(cfg, batch_size=4, seed=0)
    cfg = lat.latent_data_config(path=out, resolution=RES, num_threads=1)
    with pytest.raises(ValueError, match="not in"):
        lat.build_latent_batches(cfg, batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="imagenet512_latents"):
        lat.build_latent_batches(lat.latent_data_config(name="digits", path=out), batch_size=4,
                                 seed=0)
    with pytest.raises(ValueError, match=r"resolution = 512 but .* 16x16 images"):
        lat.build_latent_batches(lat.latent_data_config(path=out), batch_size=4, seed=0)
    state = lat.build_latent_batches(cfg, batch_size=4, seed=0).get_state()
    with pytest.raises(ValueError, match="batch_size=4 but this pipeline has batch_size=8"):
        lat.build_latent_batches(cfg, batch_size=8, seed=0).set_state(state)


def test_cli_wiring(monkeypatch, tmp_path, params):
    """encode_imagenet (the CLI's body) against a stand-in for scm_jax.data.images."""
    seen = {}

    def image_data_config(name, **kw):
        seen["config"] = (name, kw)
        return types.SimpleNamespace(name=name, **kw)

    def build_image_batches(config, **kw):
        seen["batches"] = kw
        return _host_batches(0)

    fake = types.ModuleType("scm_jax.data.images")
    fake.image_data_config, fake.build_image_batches = image_data_config, build_image_batches
    monkeypatch.setitem(sys.modules, "scm_jax.data.images", fake)
    # `from scm_jax.data.images import ...` reads the package attribute once the real module has
    # been imported by another test: replace that too.
    import scm_jax.data

    monkeypatch.setattr(scm_jax.data, "images", fake, raising=False)
    V.save_vae_params_diffusers(params, tmp_path / "vae.safetensors", attention_keys="old")
    index = enc.encode_imagenet(vae_path=str(tmp_path / "vae.safetensors"),
                                out=str(tmp_path / "out"), data_dir="/tfds", batch_size=8,
                                shard_batches=2, vae=SMALL, log=lambda m: None)
    assert seen["config"] == ("imagenet512", dict(data_dir="/tfds", split="train", num_workers=0))
    assert seen["batches"] == dict(batch_size=8, seed=0, shuffle=False, num_epochs=1,
                                   process_index=0, process_count=1, drop_remainder=False)
    assert index["num_examples"] == N // 2 and len(index["settings"]["vae_sha256"]) == 64
    np.testing.assert_array_equal(
        lat.LatentSource(str(tmp_path / "out"))[3]["label"], 3)
