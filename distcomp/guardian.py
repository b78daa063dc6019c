"""Stops the orphans of a worker that died and did not come back within its lease.

Tasks deliberately survive their worker process, so that a restarted worker
can re-adopt them. But once the worker has been silent for about its lease,
Redis gives its tasks to other workers; a copy still running here would then
run alongside its rerun. The guardian — one small process per worker, in its
own session so it survives the worker — watches the worker's heartbeat file
and, when it goes stale, kills the process group of every task the worker
started (found by the tag in their command line, so a reused pid is never
hit) and exits. It also exits when the worker stops cleanly (heartbeat file
removed).

Run as ``python -m distcomp.guardian DIR --tag TAG --lease SECONDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path

from .heartbeat import HeartbeatFile
from .runner import find_interpreters, find_tasks, is_same_process


def silence_limit(lease: float, grace: float, interval: float) -> float:
    """How long the worker may be silent before its orphans are stopped.

    Its leases expire one lease after its last heartbeat, and the tasks may then
    start elsewhere; the orphans must be dead by then, so stopping starts early
    enough to fit the check interval and the SIGTERM grace before the deadline.
    """
    return max(lease / 2, lease - grace - 2 * interval)


def stop_orphans(tag: str, grace: float) -> int:
    """Stop the worker's task wrappers and warm python interpreters (each a process
    group): SIGTERM, then SIGKILL after the grace."""
    found = [(t.pid, t.pid_start) for t in find_tasks(tag).values()]
    found += find_interpreters(tag)
    for pid, _ in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_same_process(pid, start)
                                              for pid, start in found):
        time.sleep(0.1)
    for pid, start in found:
        if is_same_process(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    return len(found)


def watch(heartbeat: HeartbeatFile, tag: str, lease: float, grace: float,
          interval: float) -> None:
    limit = silence_limit(lease, grace, interval)
    while True:
        age = heartbeat.age()
        if age is None:
            return  # the worker stopped cleanly
        if age > limit:
            stop_orphans(tag, grace)
            heartbeat.clear()
            return
        time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--lease", type=float, required=True)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    heartbeat = HeartbeatFile(args.directory)
    heartbeat.guardian_pidfile.write_text(f"{os.getpid()}\n")
    watch(heartbeat, args.tag, args.lease, args.grace, interval=min(1.0, args.lease / 10))


if __name__ == "__main__":
    main()
