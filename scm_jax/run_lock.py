"""One run per stage directory: `<stage dir>/lock.json` names its holder (host, pid, start).

Taken by the primary process before the stage writes anything and removed when it ends; a
second run of the same stage directory refuses to start with one line naming the holder. A lock
whose holder is dead (same host, no such process: a run killed with -9) is taken over with a
warning. On a local filesystem the lock is created atomically (O_EXCL). On a bucket (gs://)
objects cannot be created exclusively through the path layer, so the lock is advisory there:
two runs started within the same second may both get it; a run started later is refused.
"""
import datetime
import json
import os
import socket
import sys

import numpy as np

from scm_jax import files
from scm_jax.errors import UserError

LOCK_FILE = "lock.json"


class StageLockedError(UserError):
    """Another run holds the stage directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageLock:
    """with StageLock(directory, log=...): ... holds the directory for this run."""

    def __init__(self, directory, *, log=print):
        self.path = files.join(directory, LOCK_FILE)
        self.log = log
        self.held = False
        self.me = dict(host=socket.gethostname(), pid=os.getpid(),
                       started=datetime.datetime.now().isoformat(timespec="seconds"),
                       command=" ".join(sys.argv)[:500])

    def _create(self) -> bool:
        """True if this call created the lock file."""
        data = json.dumps(self.me, indent=1)
        if files.is_local(self.path):
            os.makedirs(os.fspath(self.path.parent), exist_ok=True)
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(data)
            return True
        if self.path.exists():
            return False
        files.write_text(self.path, data)
        return True

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _acquire_here(self) -> str | None:
        """None when acquired; else the refusal's message."""
        for _ in range(2):
            if self._create():
                return None
            holder = self._holder()
            same_host = holder.get("host") == self.me["host"]
            if same_host and holder.get("pid") == self.me["pid"]:
                return None      # this process's own (a stage re-entered)
            if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                self.log(f"warning: taking over {self.path}: its holder (pid {holder['pid']} on "
                         f"{holder['host']}, since {holder.get('started')}) is no longer running")
                self.path.unlink()
                continue
            return (f"{self.path.parent} is being trained by another run (host "
                    f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
                    f"{holder.get('started', '?')}); wait for it to finish, or, if no run is "
                    f"using it, delete {self.path}")
        return f"could not take {self.path}"

    def __enter__(self):
        import jax
        from jax.experimental import multihost_utils

        refusal = self._acquire_here() if files.is_primary() else None
        if jax.process_count() > 1:   # every process learns whether the primary got it
            ok = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
            if not int(ok):
                raise StageLockedError(refusal or f"{self.path.parent} is being trained by "
                                       f"another run (see process 0's error)")
        if refusal:
            raise StageLockedError(refusal)
        self.held = files.is_primary()
        return self

    def __exit__(self, *exc):
        if self.held:
            try:
                if self._holder().get("pid") == self.me["pid"]:
                    self.path.unlink()
            except OSError as err:
                self.log(f"warning: could not remove {self.path}: {err}")
            self.held = False
