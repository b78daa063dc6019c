"""The library API the CLI (and users' scripts) call: submit, inspect, act.

It turns the store's raw hashes into rows people read, and resolves where the
queue lives (``--redis``, ``DISTCOMP_REDIS``, or the embedded default).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .server import resolve_url, state_dir_path
from .spec import TaskSpec
from .store import STATES, JobInfo, Store, SubmitResult
from .taskfile import parse_task_file

if TYPE_CHECKING:
    from .executor import JobHandle, PythonTasks, TaskFuture
    from .local import LocalWorker


class NotFoundError(LookupError):
    """A job, task or log that the user named does not exist."""


@dataclass
class TaskRow:
    id: str
    name: str
    cmd: str
    state: str
    exit_code: int | None
    signal: str
    wall: float | None
    peak_rss: int | None
    host: str
    attempt: int
    reason: str
    mem: int
    declared_mem: int
    cpus: int
    gpus: int
    tags: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _opt_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def row_from_hash(raw: dict[str, str]) -> TaskRow:
    spec = json.loads(raw.get("spec") or "{}")
    return TaskRow(
        id=raw.get("id", "?"),
        name=spec.get("name") or "",
        cmd=spec.get("cmd", ""),
        state=raw.get("state", "?"),
        exit_code=_opt_int(raw.get("exit_code")),
        signal=raw.get("signal", ""),
        wall=float(raw["wall"]) if raw.get("wall") else None,
        peak_rss=_opt_int(raw.get("peak_rss")),
        host=raw.get("host", ""),
        attempt=int(raw.get("attempt") or 0),
        reason=raw.get("reason", ""),
        mem=int(raw.get("mem") or 0),
        declared_mem=int(raw.get("declared_mem") or raw.get("mem") or 0),
        cpus=int(raw.get("cpus") or 0),
        gpus=int(raw.get("gpus") or 0),
        tags=list(spec.get("tags", [])),
    )


class Client:
    """A handle on one queue. ``url=None`` means the embedded default."""

    def __init__(self, url: str | None = None, queue: str = "default",
                 state_dir: str | os.PathLike[str] | None = None) -> None:
        self.state_dir = state_dir_path(state_dir)
        self.url = resolve_url(url, self.state_dir)
        self.queue = queue
        self.store = Store(self.url, queue)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    # -- submitting ------------------------------------------------------
    def submit_file(self, path: str | os.PathLike[str], *, job_name: str | None = None,
                    allow_duplicates: bool = False) -> SubmitResult:
        """Parse (refusing the whole file on any bad line), then submit atomically."""
        specs = parse_task_file(path)
        return self.submit_specs(specs, job_name=job_name or Path(path).name,
                                 source=str(Path(path).resolve()),
                                 allow_duplicates=allow_duplicates)

    def submit_specs(self, specs: Sequence[TaskSpec], *, job_name: str = "", source: str = "",
                     allow_duplicates: bool = False) -> SubmitResult:
        if not specs:
            return SubmitResult(None, 0, [])
        return self.store.submit(specs, job_name=job_name, source=source,
                                 allow_duplicates=allow_duplicates)

    # -- reading ---------------------------------------------------------
    def counts(self) -> dict[str, int]:
        raw = self.store.counts()
        return {s: raw.get(s, 0) for s in STATES}

    def jobs(self, job_ids: Sequence[str] | None = None) -> list[JobInfo]:
        return self.store.jobs(job_ids)

    def job(self, job_id: str) -> JobInfo:
        job = self.store.job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r} in queue {self.queue!r}")
        return job

    def task(self, task_id: str) -> TaskRow:
        return row_from_hash(self.task_raw(task_id))

    def task_raw(self, task_id: str) -> dict[str, str]:
        raw = self.store.task(task_id)
        if raw is None:
            raise NotFoundError(f"no task {task_id!r} in queue {self.queue!r} "
                                "(task ids look like JOB.N, e.g. 3.17)")
        return raw

    def task_rows(self, *, job_ids: Sequence[str] | None = None,
                  task_ids: Iterable[str] | None = None, states: Sequence[str] = (),
                  tags: Sequence[str] = (), limit: int | None = None) -> list[TaskRow]:
        if job_ids:
            for jid in job_ids:
                self.job(jid)  # raises NotFoundError with a clear message
        ids = list(task_ids) if task_ids is not None else list(self.store.iter_task_ids(job_ids))
        rows: list[TaskRow] = []
        for raw in self.store.tasks(ids):
            row = row_from_hash(raw)
            if states and row.state not in states:
                continue
            if tags and not set(tags) & set(row.tags):
                continue
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
        return rows

    def logs(self, task_id: str, *, stream: str = "out") -> tuple[str, bool]:
        """The task's latest log: the whole file if this machine can read it, else the
        tail kept in Redis. Returns (text, complete)."""
        raw = self.task_raw(task_id)
        path = raw.get(f"{stream}_path")
        if path and Path(path).exists():
            return Path(path).read_bytes().decode("utf-8", errors="replace"), True
        tail = raw.get(f"{stream}_tail")
        if tail is None:
            state = raw.get("state", "?")
            raise NotFoundError(f"task {task_id} has no {stream} log yet (state: {state})")
        return tail, False

    def workers(self) -> list[dict[str, Any]]:
        rows = self.store.workers()
        for row in rows:
            lease_s = int(row.get("lease_ms") or 30000) / 1000
            if row.get("state") == "stopped":
                row["status"] = "stopped"
            elif row["heartbeat_age_s"] > lease_s:
                row["status"] = "dead"
            else:
                row["status"] = "alive"
        return rows

    # -- acting ----------------------------------------------------------
    def expand_ids(self, ids: Sequence[str]) -> list[str]:
        """Task ids stay, job ids become their tasks (J -> J.1 .. J.n)."""
        out: list[str] = []
        for ident in ids:
            if "." in ident:
                self.task_raw(ident)
                out.append(ident)
            else:
                self.job(ident)
                out += self.store.task_ids_of_job(ident)
        return out

    def cancel(self, ids: Sequence[str]) -> int:
        return self.store.cancel(self.expand_ids(ids))

    def retry(self, ids: Sequence[str] = (), *, include_cancelled: bool = False,
              reason: str | None = None) -> int:
        """Requeue failed (and optionally cancelled) tasks of the given jobs/tasks, or all;
        ``reason`` keeps only those whose reason contains that text."""
        if ids:
            candidates = self.expand_ids(ids)
        else:
            candidates = self.store.failed_task_ids()
            if include_cancelled:
                candidates += list(self.store.iter_task_ids())
        wanted = {"failed", "cancelled"} if include_cancelled else {"failed"}
        rows = self.store.tasks(candidates, fields=["state", "reason"])
        chosen = [r["id"] for r in rows if r.get("state") in wanted
                  and (reason is None or reason in r.get("reason", ""))]
        return self.store.retry(chosen)

    def close(self) -> None:
        python_tasks = getattr(self, "_python_tasks", None)
        if python_tasks is not None:
            python_tasks.close()
        self.store.close()

    # -- python tasks (see distcomp.executor) ----------------------------
    def _python(self) -> PythonTasks:
        """The submitter and future listener, made on first use (one per client)."""
        from .executor import PythonTasks

        if getattr(self, "_python_tasks", None) is None:
            self._python_tasks = PythonTasks(self.store)
        return self._python_tasks

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` as a python task; returns a future. Keywords named
        in ``executor.OPTION_NAMES`` (``mem="2G"``, ``cpus=2``, ``timeout="1h"``...) are
        task options, not arguments of ``fn``."""
        from .executor import OPTION_NAMES

        options = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        return self._python().submit_calls(fn, [(args, kwargs)], options, session=True)[0]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any
            ) -> list[TaskFuture]:
        """Submit ``fn`` over the zipped iterables as one job (one atomic submission);
        returns the futures in order. ``options`` are task options (``mem``, ``cpus``...)."""
        calls: list[tuple[Sequence[Any], dict[str, Any]]] = [
            (item, {}) for item in zip(*iterables, strict=False)]
        return self._python().submit_calls(fn, calls, options)

    @staticmethod
    def gather(futures: Iterable[Future[Any]], timeout: float | None = None) -> list[Any]:
        """The futures' results in order; raises the first failure met."""
        from .executor import gather

        return gather(futures, timeout)

    def job_handle(self, job_id: str) -> JobHandle:
        """A handle on a job: ``progress()``, ``results()``, ``futures()``, ``cancel()``."""
        from .executor import JobHandle

        self.job(job_id)  # NotFoundError if there is no such job
        return JobHandle(self, job_id)

    def local_worker(self, cpus: int | None = None, **config: Any) -> LocalWorker:
        """Start a worker on this queue in a child process (``distcomp.local``) that
        stops with this one; ``.stop()`` it when done. ``config``: WorkerConfig fields."""
        from .local import LocalWorker

        return LocalWorker(self, cpus or os.cpu_count() or 1, **config)
