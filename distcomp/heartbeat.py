"""A worker's node-local heartbeat file, watched by its guardian.

Tasks deliberately outlive their worker process so that a restarted worker can
re-adopt them (it finds them in the process table: see ``runner.find_tasks``).
The guardian (``distcomp.guardian``) must tell "the worker is restarting" from
"the worker is gone": it watches this file's age. The worker touches it every
heartbeat, whether or not Redis is reachable, and removes it when it stops
cleanly.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


class HeartbeatFile:
    """``<dir>/heartbeat`` and ``<dir>/guardian.pid`` for one worker name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "heartbeat"
        self.guardian_pidfile = directory / "guardian.pid"

    def touch(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def age(self) -> float | None:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def clear(self) -> None:
        """A clean stop: the guardian sees no heartbeat file and exits."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
