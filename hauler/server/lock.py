"""One server per workspace: an exclusive lock on `workspace/server.lock`, held for the server's
life. The kernel drops the lock when the process ends, however it ends, so a crashed server
never leaves a stale lock behind; the file names the PID that holds it, for the message."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from hauler.core.errors import ConfigError

LOCK_FILE = "server.lock"


class WorkspaceLock:
    """Hold the workspace's lock from construction until `release`."""

    def __init__(self, workspace: Path) -> None:
        self.path = workspace / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise ConfigError(
                f"{workspace}: another server (PID {holder}) runs on this workspace; "
                "stop it first, or give this server a workspace of its own"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)  # closing the descriptor releases the lock
