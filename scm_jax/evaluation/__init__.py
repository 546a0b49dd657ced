"""Sample-quality metrics.

- The paper's: FID (Inception-v3, `inception.py`) and FD-DINOv2 (DINOv2 ViT-L/14,
  `dinov2.py`) with weights from the user's files (`weights.py`, `torch_pickle.py`,
  `weight_conversion.py`), streamed feature statistics (`statistics.py`), reference statistics
  (`reference.py`, `dataset_reference.py`), and the streaming scorer (`scorer.py`).
- The digits experiment's: Frechet distance, precision / recall and class-conditional accuracy
  in the features of a small digits CNN (`digits_classifier.py`, `evaluator.py`).
- `evaluators.from_config` picks one for a config's eval and data sections; `settings.py`
  owns the `eval` section.
"""
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
from scm_jax.evaluation.statistics import FeatureMoments
from scm_jax.evaluation.precision_recall import knn_radii, manifold_coverage, precision_recall

__all__ = [
    "ClassifierParams",
    "DigitsCNN",
    "DigitsEvaluator",
    "FeatureMoments",
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
