"""The worker's node-local record of the tasks it runs.

Tasks outlive their worker process: each runs in its own session, writes its
output to files and its exit status to a status file (see ``runner``). What a
restarted worker needs to find them again — pid and start time, lease token,
file paths — is kept here, one small JSON file per task, written atomically.
The same directory holds the worker's heartbeat file, which the guardian
(``distcomp.guardian``) watches to stop orphans of a worker that does not come
back within its lease.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class TaskRecord:
    task_id: str
    token: str
    attempt: int
    pid: int
    pid_start: float
    out_path: str
    err_path: str
    status_path: str
    spec_json: str
    started_wall: float
    gpus: list[int] = field(default_factory=list)


class Journal:
    """``<state_dir>/workers/<name>/``: ``tasks/<id>.json``, ``heartbeat``, ``guardian.pid``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tasks_dir = directory / "tasks"
        self.heartbeat_path = directory / "heartbeat"
        self.guardian_pidfile = directory / "guardian.pid"

    def ensure(self) -> None:
        self.tasks_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, task_id: str) -> Path:
        return self.tasks_dir / f"{task_id}.json"

    def write(self, record: TaskRecord) -> None:
        path = self._path(record.task_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, path)

    def remove(self, task_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(task_id).unlink()

    def records(self) -> list[TaskRecord]:
        out: list[TaskRecord] = []
        if not self.tasks_dir.is_dir():
            return out
        for path in sorted(self.tasks_dir.glob("*.json")):
            try:
                out.append(TaskRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # a torn or foreign file: nothing we can adopt from it
        return out

    def touch_heartbeat(self) -> None:
        self.heartbeat_path.touch()

    def heartbeat_age(self) -> float | None:
        try:
            return time.time() - self.heartbeat_path.stat().st_mtime
        except FileNotFoundError:
            return None

    def clear_heartbeat(self) -> None:
        """A clean stop: the guardian sees no heartbeat file and exits."""
        with contextlib.suppress(FileNotFoundError):
            self.heartbeat_path.unlink()
