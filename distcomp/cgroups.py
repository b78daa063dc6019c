"""Per-task memory cgroups: a task's ``mem_limit`` enforced by the kernel.

Where the worker may create cgroups (root, or a delegated cgroup v1 memory
hierarchy), a task with a ``mem_limit`` runs in its own memory cgroup under
the worker's: the kernel stops it at the limit itself, instantly, instead of
the monitor noticing at its next sample, and its cgroup's OOM counter says
unambiguously why it died. Elsewhere the monitor enforces the limit (see
``worker``), so this is an improvement where available, never a requirement.

cgroup v2 is not used for this: enabling the memory controller for children of
a cgroup that itself holds processes (the worker) is refused by the kernel's
"no internal processes" rule, and moving the worker first is more intrusion
than a task limit is worth.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .resources import _own_cgroup_dirs

_V1_ROOT = Path("/sys/fs/cgroup/memory")


class TaskCgroups:
    """Creates, reads and removes per-task cgroups under one parent directory."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent

    @classmethod
    def detect(cls, worker: str) -> TaskCgroups | None:
        """A writable cgroup v1 memory hierarchy under this process's own cgroup."""
        for directory in _own_cgroup_dirs():
            if _V1_ROOT not in (directory, *directory.parents):
                continue
            # Created on first use: a worker whose tasks set no limit leaves no trace.
            if os.access(directory, os.W_OK) and os.access(directory / "cgroup.procs", os.W_OK):
                return cls(directory / f"distcomp-{worker}")
        return None

    def create(self, name: str, limit: int) -> Path | None:
        """A cgroup limited to ``limit`` bytes; returns its ``cgroup.procs`` path."""
        path = self.parent / name
        try:
            self.parent.mkdir(exist_ok=True)
            path.mkdir(exist_ok=True)
            (path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError:
            return None
        return path / "cgroup.procs"

    @staticmethod
    def oom_kills(procs: Path) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in (procs.parent / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def close(self) -> None:
        """Remove the worker's parent cgroup (only possible once it is empty)."""
        with contextlib.suppress(OSError):
            self.parent.rmdir()

    @staticmethod
    def remove(procs: Path) -> None:
        """Remove the task's cgroup once its processes are gone (the kernel refuses
        while any remain; a leftover empty cgroup costs nothing)."""
        with contextlib.suppress(OSError):
            procs.parent.rmdir()
