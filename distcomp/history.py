"""Bounded per-task history: finished tasks leave Redis, into an archive file or not at all.

Every finished task's record (spec, result, output tails: about 1 KB) would
otherwise stay in Redis for good, and a queue that runs a million tasks a week
would need a server as large as its whole past. The policy (``[history]`` in
distcomp.toml, see :class:`distcomp.config.HistorySettings`):

* ``archive`` (default): succeeded tasks that finished more than ``keep`` ago
  are appended as JSON lines to an archive file (written and fsynced first),
  then removed from Redis;
* ``expire``: the same, without the file;
* ``off``: records stay in Redis.

Failed and cancelled tasks stay until ``keep_failed`` (default: never), since a
removed task can no longer be retried.

The counters never move: a job's ``n_succeeded`` still counts every task that
succeeded, and ``trimmed_<state>`` counts those no longer in Redis, so the
counters equal a scan of the records plus the trimmed counts, exactly.

If the process dies between writing the archive and the delete, the next pass
writes those records again: a task may appear twice in the archive (identical
lines; keep the last line per ``id``), never zero times.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import HistorySettings
    from .store import Store

#: Task fields that say nothing once the task has finished.
_DROPPED_FIELDS = ("token", "deadline")


@dataclass(frozen=True)
class TrimmedTask:
    """A task id whose record history trimming removed from Redis."""

    task_id: str
    #: Where its record went (``host:/path/history.jsonl``), "" if it only expired.
    archive: str
    #: Some tasks of its job expired without an archive: this one may have too.
    maybe_expired: bool = False

    def describe(self, hint: str = "") -> str:
        """What a person asking for the task should be told instead of "no task"."""
        if self.archive:
            where = (f"was moved to the archive {self.archive} "
                     f"(`distcomp history show {self.task_id}` prints it)")
            if self.maybe_expired:
                where += " or expired without one (history.mode = \"expire\")"
        else:
            where = "expired (history.mode = \"expire\"); the job's counters still count it"
        text = (f"task {self.task_id} has finished and history trimming removed it from "
                f"Redis: its record {where}")
        return f"{text}; {hint}" if hint else text


@dataclass
class TrimReport:
    """What one policy pass did: tasks removed per state, and passes skipped because
    another process held the trimming lock."""

    removed: dict[str, int] = field(default_factory=dict)
    busy: bool = False

    @property
    def total(self) -> int:
        return sum(self.removed.values())


def archive_record(raw: dict[str, str], queue: str) -> dict[str, Any]:
    """One archive line: the task's fields (spec parsed), its queue and when it was archived."""
    out: dict[str, Any] = {k: v for k, v in raw.items() if k not in _DROPPED_FIELDS}
    # An unreadable spec stays text: archiving must not fail on one odd record.
    with contextlib.suppress(ValueError):
        out["spec"] = json.loads(raw.get("spec") or "{}")
    out["queue"] = queue
    out["archived_at"] = round(time.time(), 3)
    return out


def append_archive(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records as JSON lines and make them durable before returning.

    One ``write`` of all lines on an ``O_APPEND`` descriptor, then ``fsync`` (and
    the directory's when the file is new), so the delete that follows can never
    remove a record that is not on disk. The file is private (0600): specs may
    carry environment values.
    """
    if not records:
        return
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data.encode("utf-8"))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the data itself is synced
    finally:
        os.close(fd)


def find_in_archive(path: Path, task_id: str, queue: str | None = None) -> list[dict[str, Any]]:
    """Every archived record of ``task_id`` (oldest first; the last is the newest).

    Reads the whole file (a command a person runs, not a hot path); lines that do
    not mention the id are skipped before parsing.
    """
    needle = json.dumps({"id": task_id})[1:-1]  # '"id": "3.17"', as append_archive writes it
    return [rec for rec in read_archive(path, needle) if rec.get("id") == task_id
            and (queue is None or rec.get("queue") == queue)]


def read_archive(path: Path, needle: str = "") -> Iterator[dict[str, Any]]:
    """The records of an archive file (those whose line contains ``needle``), skipping
    a torn last line left by a crash."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if needle and needle not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def trim(store: Store, settings: HistorySettings, *, limit: int = 1000) -> TrimReport:
    """One bounded pass of the policy: at most ``limit`` tasks per finished state.

    Cheap when there is nothing to do (a lock and one range read per state), so a
    worker can call it every minute; concurrent callers skip instead of queueing.
    """
    report = TrimReport()
    if settings.mode == "off":
        return report
    archive = settings.archive if settings.mode == "archive" else None
    passes: list[tuple[str, float]] = [("succeeded", settings.keep_s)]
    if settings.keep_failed_s is not None:
        passes += [("failed", settings.keep_failed_s), ("cancelled", settings.keep_failed_s)]
    for state, keep_s in passes:
        n = store.trim_history(keep_s, limit, states=(state,), archive=archive)
        if n < 0:
            report.busy = True
        else:
            report.removed[state] = n
    return report
