"""Test set-up: 8 virtual CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before JAX is imported anywhere, so this runs first.
"""
import contextlib
import os

# Optimization level 0 halves XLA:CPU compile times (the suite's main cost); tests run few steps.
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (skipped on CPU)")
    config.addinivalue_line("markers", "tpu: needs a TPU (skipped on CPU)")
