"""Stopping on SIGTERM (a TPU VM's maintenance or spot preemption notice) and SIGINT (Ctrl-C)
at one step that every process agrees on, with a checkpoint there.

While a stage trains, `SignalWatch` records the first SIGTERM or SIGINT this process receives.
Each process feeds its flag into every train step as its devices' rows of a small array; the
step returns the maximum over all devices (one scalar reduction fused into the step, no extra
collective). The loop reads that maximum one step late, so the host never waits for the step it
just dispatched; every process reads the same value at the same step, so all stop after the
same step, save it, and exit with status 128 + the signal's number (143 for SIGTERM, 130 for
SIGINT). Re-running the same command resumes from that checkpoint. A second SIGINT aborts at
once (KeyboardInterrupt). Stages trained side by side on worker threads (`pipeline.py`) follow
the main thread's `SharedStop` instead, which also stops them when one of them fails.
"""
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StageInterrupted(Exception):
    """A stage stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, signum: int, stage: str, step: int, directory):
        self.signum, self.stage, self.step, self.directory = signum, stage, step, directory
        super().__init__(f"{signal.Signals(signum).name}: stage {stage} saved step {step} in "
                         f"{directory} and stopped; re-run the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_sharding(mesh) -> NamedSharding:
    """One element per device of the mesh."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def signal_abstract(mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((mesh.size,), jnp.int32, sharding=signal_sharding(mesh))


def with_stop_signal(step):
    """step(state, batch, teacher) -> step(state, batch, teacher, flags) whose metrics also hold
    'stop_requested': the maximum of flags [devices] (int32) over all devices."""

    def step_with_signal(state, batch, teacher_params, flags):
        state, metrics = step(state, batch, teacher_params)
        return state, dict(metrics, stop_requested=jnp.max(flags))

    return step_with_signal


# A stop for every stage this process trains: set by `SharedStop` (the pipeline's main thread,
# while its stages train on worker threads, where signal handlers cannot be installed) on a
# signal, or by `request_stop` when another stage failed.
_SHARED = {"signum": None}


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Asks every stage training in this process to stop at its next step, with a checkpoint."""
    _SHARED["signum"] = _SHARED["signum"] or signum


def stop_requested() -> bool:
    """True once `request_stop` or `SharedStop`'s signal asked every stage to stop."""
    return _SHARED["signum"] is not None


class _SignalHandlers:
    """Installs the subclass's `_handler(signum, frame)` for SIGTERM and SIGINT on enter (main
    thread only: elsewhere signal handlers cannot be installed) and puts the previous ones back
    on exit."""

    def __init__(self):
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class SharedStop(_SignalHandlers):
    """Context manager for the main thread while stages train on other threads: the first
    SIGTERM / SIGINT stops every stage (`request_stop`); a second SIGINT aborts at once."""

    def _handler(self, signum, frame):
        if _SHARED["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request_stop(signum)

    def __enter__(self):
        _SHARED["signum"] = None
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        _SHARED["signum"] = None


class SignalWatch(_SignalHandlers):
    """Context manager: records SIGTERM / SIGINT (main thread only; elsewhere it watches nothing
    itself and follows `SharedStop` / `request_stop`) and gives the step its flags."""

    def __init__(self, mesh):
        super().__init__()
        self.mesh = mesh
        self.signum = None
        self._arrays = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: stop now
        self.signum = self.signum or signum

    def flags(self):
        """This process's flag on each of its devices, as the global int32 [devices] array."""
        value = int(self.signum is not None or stop_requested())
        if value not in self._arrays:
            local = np.full((len(self.mesh.local_devices),), value, np.int32)
            self._arrays[value] = jax.make_array_from_process_local_data(
                signal_sharding(self.mesh), local, (self.mesh.size,))
        return self._arrays[value]

    def reported_signal(self) -> int:
        """The signal a stop reports: this process's own, or SIGTERM when only another process
        received one."""
        return self.signum or _SHARED["signum"] or signal.SIGTERM
