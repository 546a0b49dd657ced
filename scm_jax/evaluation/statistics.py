"""Feature statistics accumulated in a stream: the mean and covariance a Frechet distance needs
(Heusel et al. 2017), without holding 50,000 feature vectors.

    moments = FeatureMoments(2048)
    for features in batches:            # [b, 2048] each
        moments.add(features)
    mu, sigma = moments.mean_cov()      # [2048], [2048, 2048], float64

Sums are float64: n, sum_i f_i [F] and sum_i f_i f_i^T [F, F]. The covariance is the unbiased
(sum f f^T - n mu mu^T) / (n - 1), equal to `np.cov` of all the rows up to float64 rounding.
`merge` adds another accumulator (another process's, another chunk's); `state()` /
`from_state()` are what a resumable evaluation saves.
"""
import numpy as np


class FeatureMoments:
    """Running first and second moments of feature vectors of dimension `dim`."""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, features) -> "FeatureMoments":
        """Adds features [b, dim] (any float dtype; b may be 0)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [b, {self.dim}], got {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError("features contain NaN or inf (non-finite samples or weights?)")
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        return self

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        """Adds another accumulator of the same dimension (in place; returns self)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [dim], unbiased covariance [dim, dim]), float64; needs count >= 2."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have "
                             f"{self.count}")
        mu = self.total / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (cov + cov.T) / 2   # exactly symmetric, whatever the summation order

    def state(self, prefix: str = "") -> dict:
        """Arrays that `from_state` rebuilds this accumulator from (keys start with prefix)."""
        return {f"{prefix}count": np.int64(self.count), f"{prefix}total": self.total,
                f"{prefix}outer": self.outer}

    @classmethod
    def from_state(cls, state: dict, prefix: str = "") -> "FeatureMoments":
        total = np.asarray(state[f"{prefix}total"], np.float64)
        out = cls(total.shape[0])
        out.count = int(state[f"{prefix}count"])
        out.total = total.copy()
        out.outer = np.asarray(state[f"{prefix}outer"], np.float64).copy()
        if out.outer.shape != (out.dim, out.dim):
            raise ValueError(f"saved moments {prefix!r} are inconsistent: total {total.shape}, "
                             f"outer {out.outer.shape}")
        return out
