"""scm_jax: continuous-time consistency models (sCM, Lu & Song 2025) in JAX/Flax."""

__version__ = "0.1.0"


def _quiet_platforms() -> None:
    """On a host with neither a TPU nor a GPU, JAX uses the CPU without probing for the others:
    libtpu and JAX's CUDA plugin (both installed by the [test] extra) print initialization
    errors otherwise (`scm_jax.cli.skip_absent_tpu`). Every command and notebook imports this
    package first; an explicit JAX_PLATFORMS always wins."""
    from scm_jax.cli import skip_absent_tpu

    skip_absent_tpu()


_quiet_platforms()
