"""The embedded dataset: scikit-learn's 1797 real 8x8 handwritten digits (10 classes).

It ships inside scikit-learn, so the default experiment needs no download. Pixels 0..16 are
mapped to [-1, 1] (x / 8 - 1); images are float32 [N, 8, 8, 1], labels int32 [N]. The split is
deterministic: a fixed permutation (seed 0) puts the first `holdout` images in the held-out split
that gives the evaluation's floor (real data vs real data).

Batches are a pure function of (seed, step): global sample i = step * batch + j comes from epoch
e = i // N under the permutation of rng([seed, e]). A run resumes at the exact data position from
its step alone, and every host can slice its share of the same global batch.
"""
import numpy as np

from scm_jax.errors import ConfigError

NUM_DIGITS = 1797
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10


def load_digits_splits(holdout: int = 297):
    """Returns dict(train_images, train_labels, holdout_images, holdout_labels)."""
    from sklearn.datasets import load_digits

    if not 0 < holdout < NUM_DIGITS:
        raise ConfigError(f"data.holdout must be in (0, {NUM_DIGITS}), got {holdout}")
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    labels = digits.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(NUM_DIGITS)
    held, train = perm[:holdout], perm[holdout:]
    return dict(train_images=images[train], train_labels=labels[train],
                holdout_images=images[held], holdout_labels=labels[held])


class DigitsBatches:
    """Deterministic, resumable batches of the train split.

    `batch(step)` returns this host's rows of global batch `step`:
    dict(image=[B/P, 8, 8, 1] float32, label=[B/P] int32) with P = process_count.
    """

    def __init__(self, images, labels, *, batch_size, seed, process_index=0, process_count=1):
        if batch_size % process_count:
            raise ConfigError(f"batch_size {batch_size} is not divisible by {process_count} hosts")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.images))}
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        n = len(self.images)
        local = self.batch_size // self.process_count
        start = step * self.batch_size + self.process_index * local
        glob = np.arange(start, start + local)
        out = np.empty(local, np.int64)
        for epoch in np.unique(glob // n):
            sel = glob // n == epoch
            out[sel] = self._perm(int(epoch))[glob[sel] % n]
        return out

    def batch(self, step: int) -> dict:
        idx = self.indices(step)
        return dict(image=self.images[idx], label=self.labels[idx])
