"""Scores generated digits against the real training split in the classifier's feature space.

Images are float [N, 8, 8, 1] in [-1, 1]; labels int [N] in 0..9. Features are the
classifier's penultimate activations [N, 128].
"""
import numpy as np

from scm_jax import files

from scm_jax.evaluation.digits_classifier import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    ClassifierParams,
    classifier_logits_and_features,
    classifier_features,
)
from scm_jax.evaluation.frechet import feature_statistics, frechet_distance
from scm_jax.evaluation.precision_recall import knn_radii, manifold_coverage


def _check_images(images, name: str = "images") -> np.ndarray:
    """Float32 copy of images [N, 8, 8, 1], rejecting wrong shapes, integer dtypes and NaN/inf."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"expected {name} of shape [N, 8, 8, 1], got {images.shape}")
    # Integer images almost always mean raw 0..16 / 0..255 pixels, not the [-1, 1] scale.
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"expected floating-point {name} in [-1, 1], got dtype {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise ValueError(f"{name} contain NaN or inf values")
    return images.astype(np.float32)


def _check_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    """int32 copy of labels [n] in 0..9."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"expected {name} of shape [{n}] to match the images, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected integer {name}, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"{name} must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int32)


class DigitsEvaluator:
    """FD, precision/recall and class-conditional accuracy of samples against real digits.

    The real side (train_images [N, 8, 8, 1], train_labels [N]) is featurized once at
    construction; its mean/covariance and k-NN radii are cached, so each `evaluate` costs one
    pass of the classifier over the samples plus an [M, N] distance computation.
    """

    def __init__(
        self,
        train_images: np.ndarray,
        train_labels: np.ndarray,
        classifier_params: ClassifierParams,
        *,
        k: int = 3,
    ):
        train_images = _check_images(train_images, "train_images")
        self.train_labels = _check_labels(train_labels, train_images.shape[0], "train_labels")
        self.params = classifier_params
        self.k = int(k)
        self.train_features = classifier_features(self.params, np.clip(train_images, -1.0, 1.0))
        self.train_mu, self.train_cov = feature_statistics(self.train_features)
        self.train_radii = knn_radii(self.train_features, self.k)

    def evaluate(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """Scores samples images [M, 8, 8, 1] (M > k), optionally generated for labels [M].

        Values outside [-1, 1] are clipped first, as they would be when saving the samples as
        pictures. Returns {'fd', 'precision', 'recall', 'accuracy'} as floats; 'accuracy' (the
        fraction of samples the classifier assigns to their label) is None without labels.
        """
        images = _check_images(images)
        m = images.shape[0]
        if m <= self.k:
            raise ValueError(f"need more than k={self.k} images for k-NN radii, got {images.shape}")
        if labels is not None:
            labels = _check_labels(labels, m)

        logits, features = classifier_logits_and_features(self.params, np.clip(images, -1.0, 1.0))
        mu, cov = feature_statistics(features)
        fd = frechet_distance(self.train_mu, self.train_cov, mu, cov)
        precision = manifold_coverage(features, self.train_features, self.train_radii)
        recall = manifold_coverage(self.train_features, features, knn_radii(features, self.k))
        accuracy = None
        if labels is not None:
            accuracy = float(np.mean(logits.argmax(axis=-1) == labels))
        return {"fd": fd, "precision": precision, "recall": recall, "accuracy": accuracy}

    def evaluate_npz(self, path: str) -> dict:
        """`evaluate` on an .npz file with 'images' [M, 8, 8, 1] and optionally 'labels' [M]."""
        if not files.exists(path):
            raise FileNotFoundError(f"no samples file at {path!r}")
        data = files.load_npz(path)
        if "images" not in data:
            raise ValueError(f"{path!r} has no 'images' array (keys: {sorted(data)})")
        images, labels = data["images"], data.get("labels")
        return self.evaluate(images, labels)
