"""Test set-up: 8 virtual CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before JAX is imported anywhere, so this runs first.
"""
import contextlib
import os

# XLA compilation is the suite's main cost and the tests run few steps, so the CPU compiler
# optimizes little: backend optimization level 0 (half the compile time) and the legacy
# elemental emitters instead of the fusion emitters (-40%). (Disabling the algebraic simplifier
# would halve it again, but the TPU compiler and the sharded attention kernel rely on it.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


@contextlib.contextmanager
def _float64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
    """Enables float64 for one test (math references), restoring the flag after."""
    with _float64():
        yield


@pytest.fixture(scope="module")
def x64_module():
    """float64 for a whole test module (its fixtures share compiled float64 functions)."""
    with _float64():
        yield


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module, its compiled programs and their buffers are dropped (the
    persistent cache on disk keeps them): a worker process runs many modules, and holding every
    module's executables grew each worker past 10 GB of the machine's 24."""
    yield
    import ctypes
    import gc

    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)   # hand freed heap pages back to the system
    except (OSError, AttributeError):
        pass


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (skipped on CPU)")
    config.addinivalue_line("markers", "slow: longer than a few seconds on the 2-core machine "
                            "(whole runs, TPU/GPU compiles, subprocesses); the fast loop is "
                            "python -m pytest -q -m 'not slow' tests")
    config.addinivalue_line("markers", "tpu: needs a TPU (skipped on CPU)")


@pytest.fixture
def fake_bucket(monkeypatch):
    """An in-memory filesystem registered for gs:// for one test (etils.epath reaches buckets
    through fsspec, as through gcsfs): the class is yielded, its `store` maps paths to objects.
    etils caches one filesystem per protocol, so that cache is cleared before and after:
    otherwise the first test's filesystem would serve every later test's gs:// paths."""
    import importlib

    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeBucket(MemoryFileSystem):
        """gs:// in memory: objects are whole-file values, there are no real directories."""

        protocol = ("gs", "gcs")
        store = {}
        pseudo_dirs = [""]

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

    registry = importlib.import_module("fsspec.registry")._registry
    for name in FakeBucket.protocol:
        monkeypatch.setitem(registry, name, FakeBucket)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeBucket
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeBucket.store.clear()
