"""Stopping on SIGTERM (a TPU VM's maintenance or spot preemption notice) and SIGINT (Ctrl-C)
at one step that every process agrees on, with a checkpoint there.

While a stage trains, `SignalWatch` records the first SIGTERM or SIGINT this process receives.
Each process feeds its flag into every train step as its devices' rows of a small array; the
step returns the maximum over all devices (one scalar reduction fused into the step, no extra
collective). The loop reads that maximum one step late, so the host never waits for the step it
just dispatched; every process reads the same value at the same step, so all stop after the
same step, save it, and exit with status 128 + the signal's number (143 for SIGTERM, 130 for
SIGINT). Re-running the same command resumes from that checkpoint. A second SIGINT aborts at
once (KeyboardInterrupt).
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


class SignalWatch:
    """Context manager: records SIGTERM / SIGINT (main thread only; elsewhere it watches nothing)
    and gives the step its flags."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.signum = None
        self._previous = {}
        self._arrays = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: stop now
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def flags(self):
        """This process's flag on each of its devices, as the global int32 [devices] array."""
        value = int(self.signum is not None)
        if value not in self._arrays:
            local = np.full((len(self.mesh.local_devices),), value, np.int32)
            self._arrays[value] = jax.make_array_from_process_local_data(
                signal_sharding(self.mesh), local, (self.mesh.size,))
        return self._arrays[value]

    def reported_signal(self) -> int:
        """The signal a stop reports: this process's own, or SIGTERM when only another process
        received one."""
        return self.signum or signal.SIGTERM
