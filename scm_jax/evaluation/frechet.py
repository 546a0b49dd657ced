"""Frechet distance between Gaussians fitted to feature sets (the FID formula).

Shapes: features are [N, F]; statistics are a mean [F] and a covariance [F, F], all float64.
"""
import warnings

import numpy as np
import scipy.linalg

# Relative size of the imaginary part of sqrtm(cov1 @ cov2) that we treat as round-off.
_IMAG_RTOL = 1e-3


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


def _sqrtm_real(mat: np.ndarray) -> np.ndarray | None:
    """Real principal square root of `mat`, or None if it is not finite or clearly complex."""
    with warnings.catch_warnings():
        # Singular products make sqrtm warn; we detect the failure ourselves and retry.
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(mat)
    if not np.all(np.isfinite(root)):
        return None
    if np.iscomplexobj(root):
        # cov1 @ cov2 has a real non-negative spectrum in exact arithmetic, so any
        # imaginary part is round-off unless it is large compared with the real part.
        scale = max(1.0, float(np.abs(root.real).max()))
        if np.abs(root.imag).max() > _IMAG_RTOL * scale:
            return None
        root = root.real
    return root


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 sqrtm(cov1 cov2)).

    mu1, mu2: [F]; cov1, cov2: [F, F]. If the product is singular (sqrtm not finite or with a
    non-negligible imaginary part), eps * I is added to both covariances and sqrtm retried,
    as the reference FID implementations do. Tiny negative results from round-off are
    clamped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    _check_stats(mu1, cov1, mu2, cov2)

    diff = mu1 - mu2
    eye = np.eye(mu1.shape[0])
    covmean = None
    for offset in (0.0, eps, 1e3 * eps):
        covmean = _sqrtm_real((cov1 + offset * eye) @ (cov2 + offset * eye))
        if covmean is not None:
            break
    if covmean is None:
        raise ValueError(
            "sqrtm(cov1 @ cov2) failed even with an eps * I offset; the covariances are "
            "probably not positive semi-definite or contain huge values"
        )
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean)
    return max(float(fd), 0.0)
