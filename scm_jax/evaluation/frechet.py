"""Frechet distance between Gaussians fitted to feature sets (the FID formula).

Shapes: features are [N, F]; statistics are a mean [F] and a covariance [F, F], all float64.
"""
import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (float64) of features [N, F], N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"expected features of shape [N, F], got {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {features.shape}")
    mu = features.mean(axis=0)
    cov = np.cov(features, rowvar=False)
    return mu, np.atleast_2d(cov)


def _check_stats(mu1, cov1, mu2, cov2):
    """Raises ValueError naming all four shapes unless they are [F], [F, F], [F], [F, F]."""
    f = mu1.shape[0] if mu1.ndim == 1 else None
    ok = (
        f is not None
        and mu2.shape == (f,)
        and cov1.shape == (f, f)
        and cov2.shape == (f, f)
    )
    if not ok:
        raise ValueError(
            "expected mu1 [F], cov1 [F, F], mu2 [F], cov2 [F, F] with one F; got "
            f"mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}"
        )


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (eigenvalues below 0 from round-off -> 0)."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr sqrtm(cov1 cov2) for covariances (symmetric positive semi-definite) [F, F].

    cov1 cov2 is similar to S cov2 S with S = cov1^(1/2) (S^-1 (S S cov2) S), which is
    symmetric PSD, so the eigenvalues of cov1 cov2 are real, non-negative and those of S cov2 S,
    and tr sqrtm(cov1 cov2) = sum_i sqrt(lambda_i(S cov2 S)). Two symmetric eigendecompositions:
    about 5x faster than `scipy.linalg.sqrtm` of the product at F = 2048, no imaginary round-off
    to discard, and no eps * I needed for singular covariances (tests compare both routes).
    """
    root = _psd_sqrt(cov1)
    inner = root @ cov2 @ root
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 sqrtm(cov1 cov2)) (Heusel et al. 2017), float64.

    mu1, mu2: [F]; cov1, cov2: [F, F]. The trace of the matrix square root is
    `trace_sqrt_product`. Tiny negative results from round-off are clamped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    _check_stats(mu1, cov1, mu2, cov2)
    if not (np.all(np.isfinite(cov1)) and np.all(np.isfinite(cov2))):
        raise ValueError("covariances contain NaN or inf")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
    return max(float(fd), 0.0)
