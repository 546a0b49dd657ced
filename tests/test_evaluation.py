"""Tests for scm_jax.evaluation: FD and precision/recall against closed forms, the digits
classifier (accuracy, determinism, serialization) and the end-to-end evaluator."""
import time

import jax
import numpy as np
import pytest
import scipy.stats
import sklearn.datasets

from scm_jax.evaluation import (
    DigitsEvaluator,
    classifier_features,
    classifier_predict,
    feature_statistics,
    frechet_distance,
    load_classifier,
    load_or_train_classifier,
    precision_recall,
    save_classifier,
    train_classifier,
)


def _digits_split():
    """(train_x, train_y, holdout_x, holdout_y): the project's fixed 1500 / 297 split."""
    d = sklearn.datasets.load_digits()
    images = (d.images.astype(np.float32) / 8 - 1).reshape(-1, 8, 8, 1)
    labels = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(labels))
    holdout, train = perm[:297], perm[297:]
    return images[train], labels[train], images[holdout], labels[holdout]


# ----------------------------------------------------------------------------- frechet


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    mu, cov = feature_statistics(x)
    assert mu.dtype == np.float64 and cov.shape == (4, 4)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    ref = (x - x.mean(0)).T.astype(np.float64) @ (x - x.mean(0)).astype(np.float64) / 49
    np.testing.assert_allclose(cov, ref, rtol=1e-5)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_commuting_covariances():
    rng = np.random.default_rng(3)
    q = scipy.stats.ortho_group.rvs(5, random_state=4)
    a, b = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
    cov1, cov2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, cov1, mu2, cov2), expected, rtol=1e-6)


def test_frechet_self_zero_and_symmetric():
    rng = np.random.default_rng(5)
    s1 = feature_statistics(rng.normal(size=(200, 8)))
    s2 = feature_statistics(rng.normal(1.0, 2.0, size=(150, 8)))
    assert frechet_distance(*s1, *s1) < 1e-8
    d12, d21 = frechet_distance(*s1, *s2), frechet_distance(*s2, *s1)
    assert d12 > 1.0
    np.testing.assert_allclose(d12, d21, rtol=1e-6)


def test_frechet_trace_term_equals_scipy_sqrtm_of_the_product():
    """tr sqrtm(cov1 cov2) by the symmetric eigen route = scipy's sqrtm of the (non-symmetric)
    product, the reference FID implementations' route, on random full-rank covariances."""
    import scipy.linalg

    from scm_jax.evaluation.frechet import trace_sqrt_product

    rng = np.random.default_rng(7)
    for dim in (3, 40):
        a, b = rng.normal(size=(3 * dim, dim)), rng.normal(size=(2 * dim, dim)) @ rng.normal(
            size=(dim, dim))
        c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        reference = np.trace(scipy.linalg.sqrtm(c1 @ c2)).real
        np.testing.assert_allclose(trace_sqrt_product(c1, c2), reference, rtol=1e-10)


def test_frechet_singular_covariance_is_finite():
    # Fewer samples than features: a rank-deficient covariance (zero eigenvalues) stays finite.
    s = feature_statistics(np.random.default_rng(6).normal(size=(5, 20)))
    d = frechet_distance(*s, *s)
    assert np.isfinite(d) and d < 1e-2


def test_frechet_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(4,\)|\(4,\).*\(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="features of shape"):
        feature_statistics(np.zeros(5))


# ----------------------------------------------------------------------- precision/recall


def test_precision_recall_identical_sets():
    x = np.random.default_rng(7).normal(size=(100, 5))
    assert precision_recall(x, x.copy(), k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_far_apart_clusters():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(80, 3)), rng.normal(100.0, 1.0, size=(60, 3))
    assert precision_recall(real, fake, k=3) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_hand_example_1d():
    # k=1. Real 0,1,2,3 all have radius 1, covering [-1, 4]: fakes 0.5, 0.7 inside, 10 not.
    # Fake radii: 0.5 -> 0.2, 0.7 -> 0.2, 10 -> 9.3 (ball [0.7, 19.3]): reals 1, 2, 3 inside;
    # 0 is 0.5 from the nearest fake ball centre with radius 0.2, so outside.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [0.7], [10.0]])
    pr = precision_recall(real, fake, k=1)
    assert pr["precision"] == pytest.approx(2 / 3)
    assert pr["recall"] == pytest.approx(3 / 4)


def test_precision_recall_hand_example_2d():
    # k=2 on the unit square's corners: every radius is 1 (the two edge neighbours).
    real = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Fake radii (2nd NN among fakes): 2.06, 1.12, 2.06; the first fake ball covers all corners.
    fake = np.array([[0.5, 0.5], [1.5, 0.5], [2.5, 0.0]])
    pr = precision_recall(real, fake, k=2)
    assert pr["precision"] == pytest.approx(2 / 3)  # (2.5, 0) is 1.5 from (1, 0)
    assert pr["recall"] == pytest.approx(1.0)


def test_precision_recall_k_too_large():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="k < N"):
        precision_recall(x, np.ones((10, 2)), k=3)
    with pytest.raises(ValueError, match="k < N"):
        precision_recall(np.ones((10, 2)), x, k=3)


# ----------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def digits():
    return _digits_split()


@pytest.fixture(scope="module")
def trained(digits):
    train_x, train_y, _, _ = digits
    start = time.perf_counter()
    params = train_classifier(train_x, train_y, seed=0)
    seconds = time.perf_counter() - start
    print(f"\nclassifier training took {seconds:.1f}s")
    return params


@pytest.mark.slow
def test_classifier_holdout_accuracy(digits, trained):
    _, _, hold_x, hold_y = digits
    acc = float(np.mean(classifier_predict(trained, hold_x) == hold_y))
    print(f"\nclassifier held-out accuracy {acc:.4f}")
    assert acc >= 0.95
    feats = classifier_features(trained, hold_x[:7])
    assert feats.shape == (7, 128) and feats.dtype == np.float32


def test_classifier_training_is_deterministic(digits):
    train_x, train_y, hold_x, _ = digits
    p1 = train_classifier(train_x, train_y, seed=3, steps=20)
    p2 = train_classifier(train_x, train_y, seed=3, steps=20)
    p3 = train_classifier(train_x, train_y, seed=4, steps=20)
    leaves1, leaves2 = jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)
    assert all(np.array_equal(a, b) for a, b in zip(leaves1, leaves2, strict=True))
    assert not all(
        np.array_equal(a, b) for a, b in zip(leaves1, jax.tree_util.tree_leaves(p3), strict=True)
    )


def test_classifier_save_load_round_trip(digits, trained, tmp_path):
    _, _, hold_x, _ = digits
    path = str(tmp_path / "sub" / "clf.msgpack")
    save_classifier(trained, path)
    assert not (tmp_path / "sub" / "clf.msgpack.tmp").exists()
    loaded = load_classifier(path)
    np.testing.assert_array_equal(
        classifier_features(loaded, hold_x), classifier_features(trained, hold_x)
    )
    # An existing file is reused, not retrained: bogus training data would fail otherwise.
    reused = load_or_train_classifier(path, np.zeros((0, 8, 8, 1)), np.zeros(0, np.int32))
    np.testing.assert_array_equal(
        classifier_features(reused, hold_x[:5]), classifier_features(trained, hold_x[:5])
    )


def test_load_classifier_errors_name_the_path(trained, tmp_path):
    missing = str(tmp_path / "missing.msgpack")
    with pytest.raises(FileNotFoundError, match="missing.msgpack"):
        load_classifier(missing)

    # Same keys, wrong shapes: from_bytes alone would accept this.
    wrong_shape = jax.tree_util.tree_map(lambda a: np.zeros(a.shape + (1,), a.dtype), trained)
    path = str(tmp_path / "wrong_shape.msgpack")
    save_classifier(wrong_shape, path)
    with pytest.raises(ValueError, match="wrong_shape.msgpack"):
        load_classifier(path)

    path = str(tmp_path / "wrong_keys.msgpack")
    save_classifier({"params": {"Dense_0": {"kernel": np.zeros((3, 3), np.float32)}}}, path)
    with pytest.raises(ValueError, match="wrong_keys.msgpack"):
        load_classifier(path)

    path = tmp_path / "garbage.msgpack"
    path.write_bytes(b"not msgpack at all")
    with pytest.raises(ValueError, match="garbage.msgpack"):
        load_classifier(str(path))


# ------------------------------------------------------------------------------ evaluator


@pytest.fixture(scope="module")
def evaluator(digits, trained):
    train_x, train_y, _, _ = digits
    return DigitsEvaluator(train_x, train_y, trained, k=3)


def test_evaluator_real_beats_noise_and_shuffled(digits, evaluator):
    _, _, hold_x, hold_y = digits
    rng = np.random.default_rng(9)
    real = evaluator.evaluate(hold_x, hold_y)
    noise = evaluator.evaluate(rng.uniform(-1, 1, hold_x.shape).astype(np.float32))
    flat = hold_x.reshape(len(hold_x), -1)
    shuffled = np.stack([row[rng.permutation(64)] for row in flat]).reshape(hold_x.shape)
    shuffled_scores = evaluator.evaluate(shuffled)
    print(f"\nFD real {real['fd']:.3f} noise {noise['fd']:.3f} "
          f"shuffled {shuffled_scores['fd']:.3f}")
    assert set(real) == {"fd", "precision", "recall", "accuracy"}
    assert 10 * real["fd"] < noise["fd"]
    assert 10 * real["fd"] < shuffled_scores["fd"]
    assert noise["accuracy"] is None


def test_evaluator_accuracy(digits, evaluator):
    _, _, hold_x, hold_y = digits
    assert evaluator.evaluate(hold_x, hold_y)["accuracy"] >= 0.95
    permuted = np.random.default_rng(10).permutation(hold_y)
    assert evaluator.evaluate(hold_x, permuted)["accuracy"] < 0.25


def test_evaluator_precision_recall(digits, evaluator):
    _, _, hold_x, _ = digits
    real = evaluator.evaluate(hold_x)
    assert real["precision"] > 0.5 and real["recall"] > 0.5
    noise_x = np.random.default_rng(11).uniform(-1, 1, hold_x.shape).astype(np.float32)
    noise = evaluator.evaluate(noise_x)
    # Not exactly 0: outlying real digits have large k-NN balls that catch a few noise
    # features (measured ~0.05 precision, ~0.01-0.06 recall vs ~0.9 for real digits).
    assert noise["precision"] < 0.15 and noise["recall"] < 0.15


def test_evaluator_clips_out_of_range_values(digits, evaluator):
    _, _, hold_x, _ = digits
    overshoot = np.where(hold_x > 0, 3.0, -3.0).astype(np.float32)
    clipped = np.clip(overshoot, -1, 1)
    assert evaluator.evaluate(overshoot) == evaluator.evaluate(clipped)


def test_evaluator_rejects_bad_inputs(digits, evaluator):
    _, _, hold_x, hold_y = digits
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\], got \(10, 8, 8\)"):
        evaluator.evaluate(hold_x[:10, :, :, 0])
    with pytest.raises(ValueError, match=r"labels of shape \[10\]"):
        evaluator.evaluate(hold_x[:10], hold_y[:9])
    with pytest.raises(ValueError, match="dtype uint8"):
        evaluator.evaluate(np.zeros((10, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        evaluator.evaluate(np.full((10, 8, 8, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="more than k=3"):
        evaluator.evaluate(hold_x[:3])


def test_evaluate_npz(digits, evaluator, tmp_path):
    _, _, hold_x, hold_y = digits
    path = tmp_path / "samples.npz"
    np.savez(path, images=hold_x, labels=hold_y)
    assert evaluator.evaluate_npz(str(path)) == evaluator.evaluate(hold_x, hold_y)
    np.savez(path, images=hold_x)
    assert evaluator.evaluate_npz(str(path))["accuracy"] is None
    np.savez(path, pictures=hold_x)
    with pytest.raises(ValueError, match="no 'images'"):
        evaluator.evaluate_npz(str(path))
