"""Stops the orphans of a worker that died and did not come back within its lease.

Tasks deliberately survive their worker process, so that a restarted worker
can re-adopt them. But once the worker has been silent for longer than its
lease, Redis gives its tasks to other workers; a copy still running here
would then run alongside its rerun. The guardian — one small process per
worker, in its own session so it survives the worker — watches the worker's
heartbeat file and, when it goes stale, kills every journaled task's process
group (checking pid and start time, so a reused pid is never hit) and exits.
It also exits when the worker stops cleanly (heartbeat file removed).

Run as ``python -m distcomp.guardian JOURNAL_DIR --lease SECONDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path

from .journal import Journal, TaskRecord
from .runner import is_same_process as same_process


def kill_group(record: TaskRecord, sig: int) -> None:
    if same_process(record.pid, record.pid_start):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, sig)


def stop_orphans(journal: Journal, grace: float) -> int:
    records = [r for r in journal.records() if same_process(r.pid, r.pid_start)]
    for record in records:
        kill_group(record, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(same_process(r.pid, r.pid_start)
                                              for r in records):
        time.sleep(0.1)
    for record in records:
        kill_group(record, signal.SIGKILL)
    return len(records)


def silence_limit(lease: float, grace: float, interval: float) -> float:
    """How long the worker may be silent before its orphans are stopped.

    Its leases expire one lease after its last heartbeat, and the tasks may then
    start elsewhere; the orphans must be dead by then, so stopping starts early
    enough to fit the check interval and the SIGTERM grace before the deadline.
    """
    return max(lease / 2, lease - grace - 2 * interval)


def watch(journal: Journal, lease: float, grace: float, interval: float) -> None:
    limit = silence_limit(lease, grace, interval)
    while True:
        age = journal.heartbeat_age()
        if age is None:
            return  # the worker stopped cleanly
        if age > limit:
            stop_orphans(journal, grace)
            journal.clear_heartbeat()
            return
        time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("journal", type=Path)
    parser.add_argument("--lease", type=float, required=True)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    journal = Journal(args.journal)
    journal.guardian_pidfile.write_text(f"{os.getpid()}\n")
    watch(journal, args.lease, args.grace, interval=min(1.0, args.lease / 10))


if __name__ == "__main__":
    main()
