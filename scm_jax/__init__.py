"""scm_jax: continuous-time consistency models (sCM, Lu & Song 2025) in JAX/Flax."""

__version__ = "0.1.0"
