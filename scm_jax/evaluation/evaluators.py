"""The scorer an experiment's evaluation uses, chosen by its `eval` and `data` sections.

    scorer = from_config(config.eval, config.data, mesh, eval_dir=..., log=print)
    scores = scorer.score(generate, num, batch_size, labels=labels, state_path=...)

- digits (`config.eval.features == ()`): `DigitsScorer`: FD, precision / recall and
  class-conditional accuracy in the features of the package's digits classifier, plus the FD of
  the first `holdout` samples (comparable with the held-out real floor, which it also reports).
- every other dataset: `scorer.FeatureScorer`: FID and FD-DINOv2 against `config.eval.reference`
  with the feature networks of `config.eval.features`, the samples of latent datasets decoded by
  the SD-VAE first (`config.eval.vae`), streamed and resumable.

Both take `generate(chunk) -> samples [batch, ...]` in the models' range ([-1, 1] pixels, or
normalized latents), the same global batch on every process, and answer the same protocol:
`metric` (the score every row is compared to the teacher's by), `baseline_rows()` (rows scored
before any model, e.g. digits' held-out real data) and `summary()` (what the results file
records of the scorer).
"""
import time

import numpy as np

from scm_jax.evaluation import features as features_lib
from scm_jax.evaluation import reference as reference_lib
from scm_jax.evaluation.scorer import FeatureScorer


class DigitsScorer:
    """The digits experiment's scores; holds its (small) sample sets in memory."""

    metric = "fd"

    def __init__(self, ev, data, eval_dir, *, log=print, save: bool = True):
        """ev: config.eval; data: config.data (its `holdout` split is the real floor)."""
        from scm_jax.data import load_digits_splits
        from scm_jax.evaluation.digits_classifier import (classifier_predict,
                                                          load_or_train_classifier)
        from scm_jax.evaluation.evaluator import DigitsEvaluator

        splits = load_digits_splits(data.holdout)
        start = time.time()
        clf = load_or_train_classifier(eval_dir / "digits_classifier.msgpack",
                                       splits["train_images"], splits["train_labels"], seed=0,
                                       save=save,
                                       **({"steps": ev.classifier_steps} if ev.classifier_steps
                                          else {}))
        self.classifier_accuracy = float(np.mean(
            classifier_predict(clf, splits["holdout_images"]) == splits["holdout_labels"]))
        log(f"[eval] digits classifier: held-out accuracy {self.classifier_accuracy:.4f} "
            f"({time.time() - start:.0f}s)")
        self.evaluator = DigitsEvaluator(splits["train_images"], splits["train_labels"], clf)
        self.holdout = (splits["holdout_images"], splits["holdout_labels"])

    @property
    def small_n(self) -> int:
        return len(self.holdout[0])

    def floor(self) -> dict:
        """The held-out real split scored like a model: the best a model can do here."""
        scores = self.evaluator.evaluate(*self.holdout)
        return dict(scores, fd_small=scores["fd"])

    def baseline_rows(self) -> list:
        """The held-out real split's row, first in the table."""
        return [dict(id="data", model="data (held-out)", nfe=0, guidance=1.0, **self.floor())]

    def summary(self) -> dict:
        return dict(classifier_holdout_accuracy=self.classifier_accuracy, small_n=self.small_n)

    def score(self, generate, num: int, batch_size: int, *, labels=None, state_path=None,
              log=None, sink=None, wants_images=lambda chunk: True) -> dict:
        chunks = [np.asarray(generate(i)) for i in range(-(-num // batch_size))]
        images = np.clip(np.concatenate(chunks)[:num], -1.0, 1.0)
        if sink is not None:
            sink(0, images)
        scores = self.evaluator.evaluate(images, labels)
        n = self.small_n
        small = self.evaluator.evaluate(images[:n], None if labels is None else labels[:n])
        return dict(scores, fd_small=small["fd"], num_samples=num)


def latent_decoder(ev, data):
    """(decode(params, latents) -> images in [-1, 1], params) for latent datasets (`data`, a
    config's data section; the SD-VAE of `ev.vae`), else (None, None)."""
    if data.name != "imagenet512_latents":
        return None, None
    import jax.numpy as jnp

    from scm_jax.data.latents import denormalize_latents
    from scm_jax.networks.vae import AutoencoderKL, load_vae_params

    v = ev.vae
    vae = AutoencoderKL(block_out_channels=tuple(v.block_out_channels),
                        layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups)
    params = load_vae_params(v.weights, vae)
    sigma_d = float(data.sigma_d)

    def decode(p, latents):
        z = denormalize_latents(latents.astype(jnp.float32), sigma_d)
        return jnp.clip(vae.apply({"params": p}, z, method=AutoencoderKL.decode), -1.0, 1.0)

    return decode, params


def feature_scorer(ev, data, mesh) -> FeatureScorer:
    """The FID / FD-DINOv2 scorer of `ev` (config.eval) for samples of `data` (config.data) on
    `mesh` (weights and reference loaded)."""
    reference = reference_lib.load(ev.reference)
    networks = features_lib.load(ev)
    decode, decode_params = latent_decoder(ev, data)
    featurize = features_lib.featurizer(networks, mesh, decode, decode_params)
    return FeatureScorer(networks, reference, featurize, pr_samples=ev.pr_samples)


def from_config(ev, data, mesh, *, eval_dir, log=print, primary: bool = True):
    """DigitsScorer for the digits experiment, else the FeatureScorer of `ev` (config.eval);
    `data` is config.data."""
    if data.name == "digits":
        return DigitsScorer(ev, data, eval_dir, log=log, save=primary)
    return feature_scorer(ev, data, mesh)
