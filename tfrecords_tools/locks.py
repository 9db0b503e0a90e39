"""Lock files beside OUT_DIR that say who holds them: convert's run lock (one run writes a
dataset at a time) and its plan lock (one run of a job plans, the others wait for its plan).

A lock file holds `<pid>@<host>` of its holder, who touches it every HEARTBEAT seconds. A lock
whose holder is gone from this host (killed, even with kill -9) is taken over at once; one of
another host is taken over when it has not been touched for STALE seconds (that host's process
cannot be asked whether it lives), as is one that names no holder.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from tfrecords_tools.atomic import pid_alive
from tfrecords_tools.errors import UserInputError

HEARTBEAT, STALE = 10.0, 120.0


class LockFile:
    """One lock file: `try_acquire` takes it (or takes over a dead holder's), `release` gives
    it back; while held, a thread touches it so that other hosts see its holder alive."""

    def __init__(self, path):
        self.path = Path(path)
        self.held = False
        self._stop = None

    def try_acquire(self) -> bool:
        """True when this process now holds the lock; False while a live holder has it."""
        for _ in range(3):  # a dead holder's lock removed, or one released meanwhile: try again
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._holder_gone():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            except OSError as err:
                raise UserInputError(f"{self.path.parent}: cannot write here ({err.strerror}); "
                                     "convert keeps a lock file beside OUT_DIR. Choose an OUT_DIR "
                                     "in a folder you can write to.") from None
            try:
                os.write(handle, f"{os.getpid()}@{socket.gethostname()}\n".encode())
            finally:
                os.close(handle)
            self.held = True
            self._beat()
            return True
        return False

    def holder(self) -> str:
        """Who holds the lock, as a user reads it: 'process 123 on host x', or 'another run'."""
        pid, host = self._owner()
        return f"process {pid} on host {host}" if pid is not None else "another run"

    def _owner(self) -> tuple[int | None, str | None]:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None, None
        pid, sep, host = text.partition("@")
        return (int(pid), host) if sep and pid.isdigit() and host else (None, None)

    def _holder_gone(self) -> bool:
        pid, host = self._owner()
        if pid is not None and host == socket.gethostname():
            return not pid_alive(pid)
        try:
            return time.time() - self.path.stat().st_mtime > STALE
        except FileNotFoundError:
            return True

    def _beat(self) -> None:
        self._stop = threading.Event()

        def touch():
            while not self._stop.wait(HEARTBEAT):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        threading.Thread(target=touch, daemon=True).start()

    def release(self) -> None:
        if self.held:
            self._stop.set()
            self.path.unlink(missing_ok=True)
            self.held = False
