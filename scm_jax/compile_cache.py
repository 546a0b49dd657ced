"""The compile check's answers kept on disk, so asking the same question again skips the compile.

JAX's persistent compilation cache does not serve these programs: they are compiled for a TPU
topology that this host only describes, and reading an executable back needs a client of those
devices ("PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable").
What the compile check needs from a compile is a few numbers (the memory analysis, the cost
analysis, the collectives and largest buffers, or the out-of-memory answer), so those are kept:
one JSON file per program, keyed by a hash of the lowered program's text, the topology, and the
versions of jax, jaxlib and libtpu, libtpu's flags (LIBTPU_INIT_ARGS) and the source of the
package's modules that read the figures out of a compiled program (a change there, e.g. how
loops are counted, makes every stored answer stale).

On by default in `python -m scm_jax.compile` and `benchmarks/pod_fit.py`, in
`$SCM_JAX_COMPILE_CACHE_DIR` or else ~/.cache/scm_jax/compile_check; `SCM_JAX_COMPILE_CACHE=0`
or the commands' flag turns it off.
"""
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os

# Bump when the stored answer's fields change meaning: older entries are then not read.
FORMAT = 1
_OFF = ("0", "false", "no", "off")


def directory(enabled: bool = True) -> str | None:
    """Where answers are kept, or None when the cache is off (`enabled` false, or
    SCM_JAX_COMPILE_CACHE=0)."""
    if not enabled or os.environ.get("SCM_JAX_COMPILE_CACHE", "1").strip().lower() in _OFF:
        return None
    return os.environ.get("SCM_JAX_COMPILE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "scm_jax", "compile_check")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _readers_source() -> str:
    """The source of the modules that turn a compiled program into the stored figures."""
    parts = []
    for module in ("compile", "compile_report", "gpu_roofline", "hlo_loops", "step_cost"):
        # located, not imported: the compile check imports this module
        with open(importlib.util.find_spec(f"scm_jax.{module}").origin, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def key(lowered, topology) -> str:
    """What the compiler's answer for `lowered` on `topology` depends on, hashed."""
    digest = hashlib.sha256()
    digest.update(_readers_source().encode())
    parts = [FORMAT, topology.name, topology.num_slices, topology.chip.hbm_bytes,
             _version("jax"), _version("jaxlib"), _version("libtpu"),
             os.environ.get("LIBTPU_INIT_ARGS", "")]
    if topology.platform == "gpu":   # the CUDA plugin compiles; the fit is against its limit
        parts += [_version("jax-cuda12-plugin"), _version("jax-cuda12-pjrt"),
                  topology.available_bytes, os.environ.get("XLA_FLAGS", "")]
    for part in parts:
        digest.update(f"{part}\n".encode())
    digest.update(lowered.as_text().encode())
    return digest.hexdigest()


def load(cache_dir: str | None, digest: str) -> dict | None:
    """The answer stored under `digest` (from `key`), or None."""
    if cache_dir is None:
        return None
    try:
        with open(os.path.join(cache_dir, f"{digest}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def store(cache_dir: str | None, digest: str, answer: dict) -> None:
    """Keeps `answer` (JSON-serializable) under `digest`; a failure to write only loses the
    entry."""
    if cache_dir is None:
        return
    path = os.path.join(cache_dir, f"{digest}.json")
    with contextlib.suppress(OSError):
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(answer, f)
        os.replace(path + ".tmp", path)


@contextlib.contextmanager
def without_jax_cache():
    """No entry of JAX's persistent cache written for a topology compile: it could not be read
    back (see above), so writing one only costs time and disk, and reading one warns. (Its
    minimum compile time is raised, not the cache switched off: JAX decides once per process
    whether the cache is used, so switching it would reach every later compile.)"""
    import jax

    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
