"""What the command-line entry points share (`main`, `compile`): exit statuses, the one-line
error, and not probing for a TPU on a machine without one."""
import glob
import os

EXIT_USER_ERROR = 2   # a known failure: bad config, missing input, mismatched checkpoint


def one_line(err: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(err).splitlines())


def skip_absent_tpu() -> None:
    """On a machine with neither a TPU nor a GPU, use the CPU without probing for a TPU or GPU.

    libtpu (installed by the [test] and [tpu] extras) prints initialization errors ("unexpected
    worker hostname", ...) when JAX probes for a TPU on a host that has none, and JAX's CUDA
    plugin (the [test] and [gpu] extras) a `cuInit` traceback for an absent GPU; it still
    describes GPUs to compile for (`scm_jax.gpu_nodes`) with the CPU as the platform. Run once,
    when the package is imported (`scm_jax/__init__.py`), so every command is covered. The check reads
    the PCI bus (Google's vendor id is 0x1ae0) and the NVIDIA / ROCm device files; an explicit
    JAX_PLATFORMS always wins.
    """
    if os.environ.get("JAX_PLATFORMS"):
        return
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() == "0x1ae0":
                return
        except OSError:
            continue
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):
        return
    import jax

    try:
        jax.config.update("jax_platforms", "cpu")
    except Exception:   # noqa: BLE001 - backends already initialized by the caller: leave them
        pass
