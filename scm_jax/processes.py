"""Keeping the processes of a multi-process run together.

Collectives meet when they first run. On CPU (gloo) a process that reaches a new collective more
than ~30 s after its peers fails ("Gloo context initialization failed: DEADLINE_EXCEEDED"); on
any platform one process's slower compile (a cold compilation cache, a busy host) becomes its
peers' stall inside a collective. So the programs every process runs together are compiled
ahead of time (`compile_together`), and the processes then meet at a barrier of the
coordination service (`barrier`: no collective, a deadline of its own) before the first run.
"""
import itertools
import time

import jax
from orbax.checkpoint import multihost

# Barrier names must be unique within a run; every process makes the same calls in order.
_serial = itertools.count()

BARRIER_TIMEOUT_S = 3600   # an XXL step's compile on a slow host takes tens of minutes


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Returns when every process has called `barrier(name)` (at once with one process)."""
    count = jax.process_count()
    if count == 1:
        return
    multihost.sync_global_processes(f"scm_jax {next(_serial)}: {name}", timeout=timeout_s,
                                    processes=set(range(count)))


def compile_together(lowered, name: str):
    """(compiled, seconds): `lowered.compile()` on this process, then the barrier `name`."""
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    barrier(name)
    return compiled, seconds
