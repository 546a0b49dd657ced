"""The paper-standard scoring pieces on small data: streaming feature statistics (and their
merge across processes), reference-statistics files in our, EDM's and EDM2's formats, the
multistep sampler, and the streaming scorer's FID and resumption."""
import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import files, sampling, trigflow
from scm_jax.errors import MissingInputError
from scm_jax.evaluation import FeatureMoments, frechet_distance, precision_recall
from scm_jax.evaluation import reference as ref_lib
from scm_jax.evaluation.features import FeatureNetwork
from scm_jax.evaluation.scorer import FeatureScorer


def test_streaming_moments_equal_numpy_and_merge_like_one_process():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(257, 6)) @ rng.normal(size=(6, 6))
    whole = FeatureMoments(6)
    for start in range(0, 257, 50):           # uneven chunks, one of 7 rows
        whole.add(x[start:start + 50].astype(np.float32))
    mu, cov = whole.mean_cov()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-9)
    assert np.array_equal(cov, cov.T)
    # Two "processes" each see half the rows; merging equals one process that saw all.
    a, b = FeatureMoments(6).add(x32[:100]), FeatureMoments(6).add(x32[100:])
    merged = a.merge(b).mean_cov()
    np.testing.assert_allclose(merged[1], cov, rtol=1e-12)
    # A saved state restores the same accumulator.
    again = FeatureMoments.from_state(whole.state("p/"), "p/")
    assert again.count == 257 and np.array_equal(again.outer, whole.outer)
    with pytest.raises(ValueError, match=r"shape \[b, 6\]"):
        whole.add(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        whole.add(np.full((1, 6), np.nan))


def _stats(seed, dim):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(40, dim))
    return f.mean(0), np.cov(f, rowvar=False)


def test_reference_files_in_all_three_formats(tmp_path):
    inc, dino = _stats(1, 8), _stats(2, 4)
    feats = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
    ours = tmp_path / "ref.npz"
    ref_lib.save(ours, ref_lib.Reference(stats=dict(inception=inc, dinov2=dino),
                                         features=dict(inception=feats), num_images=40,
                                         dataset="cifar10:train@32"))
    got = ref_lib.load(ours)
    assert got.num_images == 40 and got.dataset == "cifar10:train@32"
    np.testing.assert_array_equal(got.require("dinov2")[1], dino[1])
    np.testing.assert_array_equal(got.features["inception"], feats)
    # EDM: an npz with mu and sigma of the Inception features.
    np.savez(tmp_path / "cifar10-32x32.npz", mu=inc[0], sigma=inc[1])
    edm = ref_lib.load(tmp_path / "cifar10-32x32.npz")
    np.testing.assert_array_equal(edm.require("inception")[0], inc[0])
    with pytest.raises(MissingInputError, match="no 'dinov2' statistics"):
        edm.require("dinov2")
    # EDM2: a pickled dict of numpy arrays.
    (tmp_path / "img512.pkl").write_bytes(pickle.dumps(
        {"fid": dict(mu=inc[0], sigma=inc[1]), "fd_dinov2": dict(mu=dino[0], sigma=dino[1])}))
    edm2 = ref_lib.load(tmp_path / "img512.pkl")
    np.testing.assert_array_equal(edm2.require("dinov2")[1], dino[1])
    # A pickle that would run code is refused; a missing file names ref_stats.
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fid": print}))
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        ref_lib.load(tmp_path / "evil.pkl")
    with pytest.raises(MissingInputError, match="ref_stats"):
        ref_lib.load(tmp_path / "absent.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a reference statistics file"):
        ref_lib.load(tmp_path / "other.npz")


def test_multistep_sampler_is_the_one_and_two_step_sampler_at_m_1_and_2():
    sigma_d = 0.5
    assert sampling.multistep_times(sigma_d, 1) == (trigflow.t_max(sigma_d),)
    assert sampling.multistep_times(sigma_d, 2, 0.9) == (trigflow.t_max(sigma_d), 0.9)
    t4 = sampling.multistep_times(sigma_d, 4)
    np.testing.assert_allclose(t4[1:], [1.1, 1.1 * 2 / 3, 1.1 / 3])
    assert sampling.multistep(sigma_d, 2) == sampling.two_step(sigma_d)
    assert sampling.multistep(sigma_d, 1) == sampling.one_step(sigma_d)
    # Sampling: a nonlinear stand-in network; M = 1, 2 reproduce the explicit samplers.
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3))
    net = lambda p, x, t, cond: jnp.tanh(x @ w) * jnp.cos(t)[:, None, None, None] + p  # noqa: E731
    labels = jnp.zeros((4,), jnp.int32)
    key = jax.random.PRNGKey(2)
    for m, explicit in ((1, sampling.one_step(sigma_d)), (2, sampling.two_step(sigma_d))):
        a = sampling.sampler(net, (2, 2, 3), sigma_d, sampling.multistep(sigma_d, m))(
            0.1, key, labels)
        b = sampling.sampler(net, (2, 2, 3), sigma_d, explicit)(0.1, key, labels)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="steps >= 1"):
        sampling.multistep_times(sigma_d, 0)


class _Interrupt(Exception):
    pass


def test_feature_scorer_streams_scores_and_resumes(tmp_path):
    """FID from streamed chunks equals the Frechet distance of all features at once; an
    evaluation interrupted mid-way resumes from its saved chunks to the same scores."""
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 5))
    fake_all = rng.normal(0.3, 1.1, size=(103, 5)).astype(np.float32)
    reference = ref_lib.Reference(
        stats=dict(inception=(real.mean(0), np.cov(real, rowvar=False))),
        features=dict(inception=real[:60]))
    net = FeatureNetwork("inception", "fid", 5, None, None)

    def featurize(chunk, with_images=False):
        return {"inception": chunk}, None

    def generate(i, stop_at=None):
        if i == stop_at:
            raise _Interrupt
        out = np.zeros((10, 5), np.float32)
        rows = fake_all[i * 10:(i + 1) * 10]
        out[:len(rows)] = rows
        return out

    scorer = FeatureScorer([net], reference, featurize, pr_samples=50, save_every=3)
    straight = scorer.score(generate, 103, 10)
    mu, cov = fake_all.astype(np.float64).mean(0), np.cov(fake_all.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(straight["fid"], frechet_distance(*reference.stats["inception"],
                                                                 mu, cov), rtol=1e-9)
    assert straight == dict(straight, **precision_recall(real[:60], fake_all[:50], k=3))
    state = tmp_path / "row.partial.npz"
    with pytest.raises(_Interrupt):
        scorer.score(lambda i: generate(i, stop_at=7), 103, 10, state_path=state)
    assert int(files.load_npz(state)["chunks_done"]) == 6
    lines = []
    resumed = scorer.score(lambda i: generate(i, stop_at=2), 103, 10, state_path=state,
                           log=lines.append)
    assert "resuming at sample 60" in lines[0]
    assert resumed == straight
