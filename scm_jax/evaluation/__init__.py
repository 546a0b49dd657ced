"""Sample-quality metrics for the digits experiments: Frechet distance, improved precision /
recall and class-conditional accuracy, all in the feature space of a small digits CNN."""
from scm_jax.evaluation.digits_classifier import (
    ClassifierParams,
    DigitsCNN,
    classifier_features,
    classifier_logits_and_features,
    classifier_predict,
    load_classifier,
    load_or_train_classifier,
    save_classifier,
    train_classifier,
)
from scm_jax.evaluation.evaluator import DigitsEvaluator
from scm_jax.evaluation.frechet import feature_statistics, frechet_distance
from scm_jax.evaluation.precision_recall import knn_radii, manifold_coverage, precision_recall

__all__ = [
    "ClassifierParams",
    "DigitsCNN",
    "DigitsEvaluator",
    "classifier_features",
    "classifier_logits_and_features",
    "classifier_predict",
    "feature_statistics",
    "frechet_distance",
    "knn_radii",
    "load_classifier",
    "load_or_train_classifier",
    "manifold_coverage",
    "precision_recall",
    "save_classifier",
    "train_classifier",
]
