"""`stage=eval`, the reference statistics and the sampling command on the paper datasets'
runlocal configs, with random-weight feature networks the tests write (the real Inception-v3
architecture, DINOv2 at its tiny width, a tiny SD-VAE): mock CIFAR-10 (TFDS mock data) and
ImageNet 512 latents. Models are checkpoints of freshly initialized networks written directly
(training is tested elsewhere); what is tested is sampling, decoding, features, statistics,
scoring, resumption and the files written.
"""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from scm_jax import checkpoint as ckpt

from scm_jax import stage_identity
from scm_jax import evaluate, objectives
from scm_jax import sample as sample_cmd
from scm_jax.data import data_shape
from scm_jax import sharding
from scm_jax.evaluation import dataset_reference, dinov2, features, inception
from scm_jax.evaluation import reference as ref_lib
from scm_jax.evaluation.statistics import FeatureMoments
from tests.helpers import load_experiment


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random Inception-v3 (converted .npz) and tiny DINOv2 (a raw hub state dict) files."""
    root = tmp_path_factory.mktemp("weights")
    np.savez(root / "inception.npz", **inception.convert_state_dict(inception.random_state_dict()))
    np.savez(root / "dinov2.npz", **dinov2.random_state_dict("tiny", seed=1))
    return root


def _with_weights(config, weights):
    config.eval.inception_weights = str(weights / "inception.npz")
    config.eval.dinov2_weights = str(weights / "dinov2.npz")
    return config


def _fake_checkpoint(config, stage, workdir, seed=0):
    """A checkpoint of `stage` holding a freshly initialized state, as training writes one."""
    objective = objectives.build(config, stage)
    shape = data_shape(config.data)
    state = jax.jit(lambda key: objective.init_state(key, shape))(jax.random.PRNGKey(seed))
    directory = stage_identity.stage_dir(config, stage, str(workdir))
    store = ckpt.CheckpointStore(directory, async_save=False)
    store.save(config[stage].steps, state, {"batches": 0}, force=True)
    store.close()
    stage_identity.write_record(directory, stage_identity.stage_record(config, objective))


@pytest.mark.slow
def test_cifar10_reference_statistics_and_evaluation(weights, tmp_path):
    config = _with_weights(load_experiment("cifar10", "variant=runlocal"), weights)
    config.eval.update(consistency_steps=(1, 2), num_samples=8)
    config.model.channel_mult = (1,)   # one resolution level: a quarter of the compile time
    out = tmp_path / "ref.npz"
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=20):
        # Interrupted after 2 of 3 batches, then resumed: the same as one pass.
        mesh = sharding.make_mesh(config.mesh)
        assert dataset_reference.compute(config.eval, config.data, mesh, out, batch_size=8,
                                         save_every=1, max_batches=2, log=lambda m: None) is None
        assert (tmp_path / "ref.npz.partial.npz").exists()
        ref = dataset_reference.compute(config.eval, config.data, mesh, out, batch_size=8,
                                        log=lambda m: None)
        assert not (tmp_path / "ref.npz.partial.npz").exists()
        # The same statistics straight from the images.
        from scm_jax.data.images import build_image_batches

        images = np.concatenate([b["image"] for b in build_image_batches(
            dataset_reference.image_config(config.data), batch_size=4, seed=0, shuffle=False,
            num_epochs=1, drop_remainder=False)])
    assert images.shape == (20, 16, 16, 3) and ref.num_images == 20
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(4, 1), ("data", "fsdp"))
    featurize = features.featurizer(features.load(config.eval), mesh)
    feats, pixels = featurize(images, with_images=True)
    assert pixels.dtype == np.uint8 and pixels.shape == (20, 16, 16, 3)
    loaded = ref_lib.load(out)
    for name in ("inception", "dinov2"):
        mu, sigma = FeatureMoments(feats[name].shape[1]).add(feats[name]).mean_cov()
        np.testing.assert_allclose(loaded.stats[name][0], mu, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(loaded.stats[name][1], sigma, rtol=1e-3, atol=1e-5)
    assert loaded.features["inception"].shape == (8, 2048)   # eval.pr_samples real vectors

    # stage=eval: the teacher with its solver, sCD at 1 and 2 steps, against it.
    config.eval.reference = str(out)
    workdir = tmp_path / "run"
    for i, stage in enumerate(("teacher", "scd")):
        _fake_checkpoint(config, stage, workdir, seed=i)
    lines = []
    results = evaluate.evaluate_all(config, str(workdir), log=lines.append)
    ids = [r["id"] for r in results["rows"]]
    assert ids == ["teacher_3", "scd_1", "scd_2"]
    for r in results["rows"]:
        assert r["fid"] > 0 and r["fd_dinov2"] > 0 and 0 <= r["precision"] <= 1
        assert r["num_samples"] == 8 and np.isfinite(r["fid_vs_teacher"])
        assert (workdir / "eval" / f"{r['id']}.png").exists()
    assert "| model | NFE | guidance | FID |" in lines[-1]
    # Re-running skips the finished rows.
    again = []
    assert evaluate.evaluate_all(config, str(workdir), log=again.append)["rows"] == \
        results["rows"]
    assert sum("done before" in line for line in again) == 3


@pytest.mark.slow
def test_imagenet512_latents_guided_evaluation_and_sampling_command(weights, tmp_path):
    """Latent samples decoded by a (tiny) SD-VAE, a guidance sweep for the guided student and
    the CFG teacher, an EDM2-style reference, and `python -m scm_jax.sample`."""
    from scm_jax.networks.vae import AutoencoderKL, save_vae_params_diffusers

    config = _with_weights(load_experiment("imagenet512", "variant=runlocal"), weights)
    config.eval.update(consistency_steps=(2,), num_samples=8)
    config.model.channel_mult = (1,)   # one level (with attention at 8x8): compile time
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    vae_params = vae.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))["params"]
    save_vae_params_diffusers(vae_params, str(tmp_path / "vae.safetensors"))
    config.eval.vae.update(weights=str(tmp_path / "vae.safetensors"), block_out_channels=(8, 8, 8, 8),
                           layers_per_block=1, norm_num_groups=4)
    rng = np.random.default_rng(0)
    stats = {}
    for key, dim in (("fid", 2048), ("fd_dinov2", 64)):
        f = rng.normal(size=(3 * dim, dim))
        stats[key] = dict(mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    import pickle

    (tmp_path / "img512.pkl").write_bytes(pickle.dumps(stats))
    config.eval.reference = str(tmp_path / "img512.pkl")
    config.eval.save_samples = True
    workdir = tmp_path / "run"
    _fake_checkpoint(config, "teacher", workdir)
    _fake_checkpoint(config, "scd", workdir, seed=1)
    config.pipeline = ("teacher", "scd")
    results = evaluate.evaluate_all(config, str(workdir), log=lambda m: None)
    assert [(r["id"], r["guidance"]) for r in results["rows"]] == [
        ("teacher_3", 1.0), ("teacher_3_g1.5", 1.5), ("scd_2", 1.0), ("scd_2_g1.5", 1.5)]
    for r in results["rows"]:
        assert r["fid"] > 0 and r["fd_dinov2"] > 0 and "precision" not in r   # no real features
    chunks = sorted((workdir / "samples" / "scd_2_g1.5").iterdir())
    with np.load(chunks[0]) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (8, 64, 64, 3)
        assert f["labels"].tolist() == list(range(8))
    assert len(chunks) == 1

    # With EDM2's guidance (guide=xs), the teacher's guided rows take their unconditional
    # branch from the guiding network's EMA, in rows of their own.
    guided = load_experiment("imagenet512", "variant=runlocal,guide=xs")
    guided.eval, guided.model.channel_mult = config.eval, (1,)
    _fake_checkpoint(guided, "guide", workdir, seed=2)
    lines = []
    rows = evaluate.evaluate_all(guided, str(workdir), stages=("teacher",),
                                 log=lines.append)["rows"]
    assert [(r["id"], r.get("guided_by")) for r in rows] == [
        ("teacher_3", None), ("teacher_3_g1.5_byguide", "guide")]
    assert any("guided by the network of stage guide" in line for line in lines)
    assert rows[1]["fid"] > 0 and rows[1]["fid"] != results["rows"][1]["fid"]

    # The sampling command: a decoded grid and the arrays, from the guided student.
    assert sample_cmd.main(["sample", "--config=experiments/imagenet512.py:variant=runlocal",
                            f"--workdir={workdir}", "--stage=scd", "--steps=2", "--num=5",
                            "--labels=207,360", "--guidance=1.3", f"--out={tmp_path / 'g.npz'}",
                            "--config.model.channel_mult=(1,)",
                            f"--config.eval.vae.weights={tmp_path / 'vae.safetensors'}",
                            "--config.eval.vae.block_out_channels=8,8,8,8",
                            "--config.eval.vae.layers_per_block=1",
                            "--config.eval.vae.norm_num_groups=4"]) == 0
    with np.load(tmp_path / "g.npz") as f:
        assert f["samples"].shape == (5, 8, 8, 4) and f["labels"].tolist() == [207, 360] * 2 + [207]
        assert f["images"].shape == (5, 64, 64, 3)
    assert sample_cmd.main(["sample", "--config=experiments/imagenet512.py:variant=runlocal",
                            f"--workdir={workdir}", "--stage=teacher", "--steps=2", "--num=4",
                            "--config.model.channel_mult=(1,)", f"--out={tmp_path / 'g.png'}"]) == 0
    assert (tmp_path / "g.png").stat().st_size > 100


def test_sampling_command_errors_are_one_line(tmp_path, capsys):
    base = ["sample", "--config=experiments/digits.py:variant=tiny", f"--workdir={tmp_path}",
            f"--out={tmp_path / 'x.png'}"]
    assert sample_cmd.main(base + ["--stage=scd"]) == 2
    assert "no scd checkpoint found" in capsys.readouterr().err
    assert sample_cmd.main(base + ["--stage=nope"]) == 2
    assert "--stage='nope' is invalid" in capsys.readouterr().err
    assert sample_cmd.main(base[:-1] + ["--stage=scd", f"--out={tmp_path / 'x.jpg'}"]) == 2
    assert "expected a .png or .npz" in capsys.readouterr().err
    config = load_experiment("digits", "variant=tiny")
    with pytest.raises(ValueError, match="--labels='12' is invalid"):
        sample_cmd.parse_labels("12", 4, config.model.num_classes)


def test_missing_feature_weights_and_reference_are_named(tmp_path):
    config = load_experiment("cifar10", "variant=runlocal")
    from scm_jax.errors import MissingInputError

    with pytest.raises(MissingInputError, match="pt_inception-2015-12-05"):
        features.load(config.eval)
    config.eval.features = ("dinov2",)
    with pytest.raises(MissingInputError, match="dinov2_vitl14_pretrain.pth"):
        features.load(config.eval)
    with pytest.raises(MissingInputError, match="ref_stats"):
        ref_lib.load(config.eval.reference)
    config.eval.features = ("inception", "clip")
    with pytest.raises(ValueError, match="config.eval.features"):
        features.validate(config.eval)
