"""Reference statistics of the real data: what a generated set's FID / FD-DINOv2 is measured
against.

A `Reference` holds, per feature network ('inception' for FID, 'dinov2' for FD-DINOv2), the
mean [F] and covariance [F, F] of the real images' features, and optionally a subset of the real
features themselves [N, F] (the real side of precision / recall). Three file formats are read:

- ours (`python -m scm_jax.ref_stats` writes it): an `.npz` with a `__format__`
  marker, `<network>/mu`, `<network>/sigma`, optional `<network>/features`, `num_images`,
  `dataset`;
- EDM's published FID references (`cifar10-32x32.npz`, `imagenet-64x64.npz`): an `.npz` with
  `mu` and `sigma` of the Inception pool features;
- EDM2's (`img512.pkl`): a pickled dict {'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}},
  read with an unpickler that admits numpy arrays and nothing else.
"""
import dataclasses
import io
import pickle

import numpy as np

from scm_jax import files
from scm_jax.errors import MissingInputError
from scm_jax.evaluation.features import NETWORKS as FEATURE_NETWORKS

FORMAT = "scm_jax.reference_stats.v1"
NETWORKS = tuple(FEATURE_NETWORKS)
# EDM2's reference files key each network's statistics by the metric it defines
_EDM2_KEYS = {entry.metric: name for name, entry in FEATURE_NETWORKS.items()}


@dataclasses.dataclass
class Reference:
    stats: dict                     # network -> (mu [F] float64, sigma [F, F] float64)
    features: dict = dataclasses.field(default_factory=dict)   # network -> [N, F] (PR subset)
    num_images: int | None = None
    dataset: str = ""
    source: str = ""

    def require(self, network: str) -> tuple:
        """(mu, sigma) of `network`, or a clear error naming the file and what it holds."""
        if network not in self.stats:
            raise MissingInputError(
                f"reference statistics {self.source or '(in memory)'} hold no {network!r} "
                f"statistics (they have {sorted(self.stats) or 'none'}); compute them with "
                f"python -m scm_jax.ref_stats")
        return self.stats[network]


def save(path, ref: Reference) -> None:
    """Writes `ref` in our format (atomically)."""
    arrays = {"__format__": np.array(FORMAT), "dataset": np.array(ref.dataset),
              "num_images": np.int64(-1 if ref.num_images is None else ref.num_images)}
    for name, (mu, sigma) in ref.stats.items():
        arrays[f"{name}/mu"], arrays[f"{name}/sigma"] = np.asarray(mu), np.asarray(sigma)
    for name, feats in ref.features.items():
        arrays[f"{name}/features"] = np.asarray(feats, np.float32)
    files.save_npz(path, **arrays)


class _NumpyOnly(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"refusing to unpickle {module}.{name}: a reference statistics "
                             f"file holds only numpy arrays")
        return super().find_class(module, name)


def _stats(mu, sigma, where: str) -> tuple:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"{where}: expected mu [F] and sigma [F, F], got {mu.shape} and "
                         f"{sigma.shape}")
    return mu, sigma


def load(path) -> Reference:
    """A reference in any of the three formats (module docstring), by content."""
    if not path or not files.exists(path):
        raise MissingInputError(
            f"reference statistics not found at {path!r}; compute them with `python -m "
            f"scm_jax.ref_stats --config=... --out=PATH`, or give EDM's published "
            f"cifar10-32x32.npz / imagenet-64x64.npz or EDM2's img512.pkl (config.eval.reference)")
    raw = files.path(path).read_bytes()
    source = str(path)
    if str(path).endswith(".pkl"):
        try:
            data = _NumpyOnly(io.BytesIO(raw)).load()
        except (pickle.UnpicklingError, EOFError) as err:
            raise ValueError(f"{source} is not a readable pickle: {err}") from None
        if not isinstance(data, dict) or not set(data) & set(_EDM2_KEYS):
            raise ValueError(f"{source}: expected a dict with 'fid' and/or 'fd_dinov2' entries "
                             f"(EDM2's reference format)")
        stats = {_EDM2_KEYS[k]: _stats(v["mu"], v["sigma"], f"{source}[{k!r}]")
                 for k, v in data.items() if k in _EDM2_KEYS}
        return Reference(stats=stats, source=source)
    with np.load(io.BytesIO(raw), allow_pickle=False) as data:
        keys = set(data.files)
        if "__format__" in keys:
            if str(data["__format__"]) != FORMAT:
                raise ValueError(f"{source} has format {str(data['__format__'])!r}; expected "
                                 f"{FORMAT!r}")
            stats = {n: _stats(data[f"{n}/mu"], data[f"{n}/sigma"], f"{source}:{n}")
                     for n in NETWORKS if f"{n}/mu" in keys}
            feats = {n: np.asarray(data[f"{n}/features"]) for n in NETWORKS
                     if f"{n}/features" in keys}
            count = int(data["num_images"])
            return Reference(stats=stats, features=feats, num_images=None if count < 0 else count,
                             dataset=str(data["dataset"]), source=source)
        if {"mu", "sigma"} <= keys:   # EDM's FID reference
            return Reference(stats={"inception": _stats(data["mu"], data["sigma"], source)},
                             source=source)
    raise ValueError(f"{source}: not a reference statistics file (expected our .npz, EDM's "
                     f".npz with mu/sigma, or EDM2's .pkl)")
