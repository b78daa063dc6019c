"""The dashboard's ASGI app: JSON endpoints, an SSE stream, actions and /metrics.

Every endpoint costs a bounded number of Redis commands whatever the size of the
queue (the test suite counts them with ``INFO commandstats``):

* overview / jobs / workers / stream / metrics: one :class:`~distcomp.watch.Sampler`
  snapshot, O(jobs + workers);
* tasks: a page of the dense ids ``J.1 .. J.n`` (or of the ``failed``/``running``
  sorted sets), one pipelined HMGET each. A filter the store keeps no index for
  (queued/succeeded/cancelled, tag, text) is applied to a bounded window of ids
  per request, and the reply carries a cursor to continue from. The reply also
  says how many finished tasks history trimming removed (O(jobs) reads), and the
  detail of a removed task says where its record went instead of "no task";
* failures grouped by reason: the newest :data:`FAILURE_SCAN` ids of the
  ``failed`` set, read page by page; the reply says how many it looked at.

Redis calls are blocking, so handlers run them in the thread pool. Actions
(retry a failure group, cancel a job) use the queue's own credentials: whoever
can reach this app can act on the queue, which is why it binds to loopback.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..client import Client, NotFoundError, row_from_hash
from ..metrics import render_metrics
from ..store import STATES
from ..watch import Sampler, Snapshot, cluster_totals

#: Most task ids one tasks request reads when a filter has no index.
SCAN_BUDGET = 5000
#: Most failed ids the failure groups look at (newest first).
FAILURE_SCAN = 20000
#: Samples kept for the charts (one per refresh, at most one a second).
HISTORY = 600
TASK_FIELDS = ("state", "spec", "attempt", "exit_code", "signal", "wall", "peak_rss", "host",
               "reason", "mem", "declared_mem", "cpus", "gpus")
LOG_TAIL_BYTES = 64 * 1024


class Dashboard:
    """State shared by the requests: one client, one sampler, the chart history."""

    def __init__(self, client: Client, *, refresh_s: float = 1.0) -> None:
        self.client = client
        self.refresh_s = refresh_s
        self.sampler = Sampler(client)
        self._lock = threading.Lock()
        self._last: Snapshot | None = None
        self._last_at = 0.0
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY)

    # -- reads -------------------------------------------------------------
    def snapshot(self, max_age: float | None = None) -> Snapshot:
        """A snapshot at most ``max_age`` seconds old: many browsers share one read."""
        age = self.refresh_s / 2 if max_age is None else max_age
        with self._lock:
            if self._last is None or time.monotonic() - self._last_at >= age:
                snap = self.sampler.snapshot()
                self._last, self._last_at = snap, time.monotonic()
                self._record(snap)
            return self._last

    def _record(self, snap: Snapshot) -> None:
        if self.history and snap.time_s - self.history[-1]["t"] < 1.0:
            return
        tot = cluster_totals(snap.workers)
        finished = sum(snap.counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
        self.history.append({
            "t": snap.time_s, "queued": snap.counts.get("queued", 0),
            "running": snap.counts.get("running", 0), "finished": finished,
            "cpu": tot["used_cpus"] / tot["cpus"] if tot["cpus"] else 0.0,
            "mem": tot["used_mem"] / tot["mem"] if tot["mem"] else 0.0,
            "rss": tot["rss"] / tot["mem"] if tot["mem"] else 0.0})

    def overview(self) -> dict[str, Any]:
        data = self.snapshot().as_dict()
        data["queue"] = self.client.queue
        held = self.client.store.worker_task_ids([w["name"] for w in data["workers"]])
        for w in data["workers"]:
            w["tasks"] = held.get(w["name"], [])[:50]
        with self._lock:
            data["history"] = list(self.history)
        return data

    def tasks(self, *, job: str | None, state: str | None, tag: str | None, text: str | None,
              cursor: str | None, limit: int) -> dict[str, Any]:
        store = self.client.store
        limit = max(1, min(limit, 500))
        rows: list[dict[str, Any]] = []
        scanned = 0

        def keep(raw: dict[str, str]) -> bool:
            if state and raw.get("state") != state:
                return False
            if tag or text:
                row = row_from_hash(raw)
                if tag and tag not in row.tags:
                    return False
                if text and text.lower() not in (row.cmd + " " + row.name).lower():
                    return False
            return True

        if state in ("failed", "running"):
            # An index exists: page through the sorted set by rank.
            start = int(cursor or 0)
            total = 0
            nxt: str | None = None
            while len(rows) < limit and scanned < SCAN_BUDGET:
                ids, total = store.state_set_page(state, start, limit)
                if not ids:
                    break
                if job:
                    ids = [t for t in ids if t.split(".", 1)[0] == job]
                for raw in store.tasks(ids, fields=("id", *TASK_FIELDS)):
                    if keep(raw):
                        rows.append(_task_json(raw))
                scanned += limit
                start += limit
                nxt = str(start) if start < total else None
                if not (job or tag or text):
                    break
            return {"tasks": rows, "next": nxt, "scanned": scanned, "indexed": True,
                    **self.trimmed(job)}
        # No index for the state: walk the dense ids from the cursor ("J.n").
        jobs = self.client.jobs([job] if job else None)
        if job and not jobs:
            raise NotFoundError(f"no job {job!r}")
        pos_job, pos_n = (cursor.split(".", 1) if cursor else (jobs[0].id if jobs else "", "1"))
        window = limit if not (state or tag or text) else min(SCAN_BUDGET, max(limit * 4, 500))
        order = [j.id for j in jobs]
        i = order.index(pos_job) if pos_job in order else len(order)
        n = int(pos_n)
        nxt = None
        while i < len(jobs) and len(rows) < limit and scanned < SCAN_BUDGET:
            j = jobs[i]
            if n > j.n_tasks:
                i, n = i + 1, 1
                continue
            count = min(window, j.n_tasks - n + 1, SCAN_BUDGET - scanned)
            page = store.task_page(j.id, n, count, ("id", *TASK_FIELDS))
            scanned += count
            taken = 0
            for raw in page:
                taken = int(raw["id"].split(".", 1)[1]) - n + 1
                if keep(raw):
                    rows.append(_task_json(raw))
                    if len(rows) >= limit:
                        break
            n += taken if len(rows) >= limit else count
        while i < len(jobs) and n > jobs[i].n_tasks:
            i, n = i + 1, 1
        if i < len(jobs):
            nxt = f"{jobs[i].id}.{n}"
        return {"tasks": rows, "next": nxt, "scanned": scanned, "indexed": False,
                **self.trimmed(job)}

    def trimmed(self, job: str | None) -> dict[str, Any]:
        """How many finished tasks (of ``job``, or of the queue) history trimming took out
        of Redis and where their records went: the task list says so instead of looking
        short. O(jobs) reads of the job records."""
        store = self.client.store
        per_job = store.job_trimmed([job] if job else store.job_ids())
        labels = sorted({label for n, label in per_job.values() if n and label})
        return {"trimmed": sum(n for n, _ in per_job.values()), "archives": labels}

    def task_detail(self, task_id: str) -> dict[str, Any]:
        try:
            raw = self.client.task_raw(task_id)
        except NotFoundError:
            gone = self.client.store.trimmed_task(task_id)
            if gone is None:
                raise
            raise NotFoundError(gone.describe()) from None
        row = row_from_hash(raw)
        logs: dict[str, dict[str, Any]] = {}
        for stream in ("out", "err"):
            path = raw.get(f"{stream}_path")
            text, complete = raw.get(f"{stream}_tail") or "", False
            if path and Path(path).is_file():
                try:
                    with open(path, "rb") as fh:
                        fh.seek(0, 2)
                        size = fh.tell()
                        fh.seek(max(size - LOG_TAIL_BYTES, 0))
                        text = fh.read().decode("utf-8", errors="replace")
                        complete = size <= LOG_TAIL_BYTES
                except OSError:
                    pass
            logs[stream] = {"text": text, "complete": complete, "path": path or ""}
        # Attempt history as far as the capped event stream still remembers it.
        history = [ev for ev in self.client.store.events(2000) if ev.get("task") == task_id]
        internal = {"spec", "out_tail", "err_tail", "token"}
        return {"task": row.as_dict(), "spec": json.loads(raw.get("spec") or "{}"),
                "record": {k: v for k, v in raw.items() if k not in internal},
                "logs": logs, "history": history}

    def failed_ids(self) -> tuple[list[tuple[str, str]], int]:
        """(task id, reason) of the newest FAILURE_SCAN failed tasks, and the set size."""
        store = self.client.store
        out: list[tuple[str, str]] = []
        total = 0
        start = 0
        while start < FAILURE_SCAN:
            ids, total = store.state_set_page("failed", start, 1000)
            if not ids:
                break
            for raw in store.tasks(ids, fields=("id", "state", "reason")):
                if raw.get("state") == "failed":
                    out.append((raw["id"], raw.get("reason", "")))
            start += 1000
        return out, total

    def failure_groups(self) -> dict[str, Any]:
        found, total = self.failed_ids()
        groups: dict[str, dict[str, Any]] = {}
        for tid, reason in found:
            g = groups.setdefault(reason, {"reason": reason, "count": 0, "jobs": set(),
                                           "examples": []})
            g["count"] += 1
            g["jobs"].add(tid.split(".", 1)[0])
            if len(g["examples"]) < 5:
                g["examples"].append(tid)
        out = sorted(groups.values(), key=lambda g: -int(g["count"]))
        for g in out:
            g["jobs"] = sorted(g["jobs"], key=lambda j: int(j) if j.isdigit() else 0)
        return {"groups": out, "scanned": len(found), "total_failed": total}

    def retry_group(self, reason: str) -> int:
        found, _total = self.failed_ids()
        return self.client.store.retry([tid for tid, r in found if r == reason])


def _task_json(raw: dict[str, str]) -> dict[str, Any]:
    return row_from_hash(raw).as_dict()


def _static_dir() -> Path:
    return Path(str(resources.files("distcomp.dashboard") / "static"))


#: Host names a loopback-bound dashboard answers to (defeats DNS rebinding).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Header every action must carry: a cross-site form or fetch cannot send it
#: without a CORS preflight, which this app never grants (defeats CSRF).
ACTION_HEADER = "x-distcomp-action"


def create_app(client: Client, *, refresh_s: float = 1.0,
               allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The app; ``refresh_s`` is how often the SSE stream pushes a new overview.

    ``allowed_hosts``: answer only requests whose Host header names one of these
    (``None``: any). A page on another site can still make the browser send
    requests to 127.0.0.1, so actions also require :data:`ACTION_HEADER`.
    """
    dash = Dashboard(client, refresh_s=refresh_s)

    def sync(func: Callable[..., Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if request.method == "POST" and request.headers.get(ACTION_HEADER) != "1":
                return JSONResponse({"error": f"actions need the header {ACTION_HEADER}: 1"},
                                    status_code=403)
            try:
                result = await run_in_threadpool(func, request)
            except NotFoundError as exc:
                return JSONResponse({"error": str(exc.args[0])}, status_code=404)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            if isinstance(result, Response):
                return result
            return JSONResponse(result)
        return endpoint

    def index(_request: Request) -> Response:
        return HTMLResponse((_static_dir() / "index.html").read_text())

    def overview(_request: Request) -> dict[str, Any]:
        return dash.overview()

    def jobs(_request: Request) -> dict[str, Any]:
        return {"jobs": [j.as_dict() for j in dash.snapshot().jobs]}

    def workers(_request: Request) -> dict[str, Any]:
        return {"workers": dash.snapshot().as_dict()["workers"]}

    def tasks(request: Request) -> dict[str, Any]:
        q = request.query_params
        state = q.get("state") or None
        if state and state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        return dash.tasks(job=q.get("job") or None, state=state, tag=q.get("tag") or None,
                          text=q.get("q") or None, cursor=q.get("cursor") or None,
                          limit=int(q.get("limit") or 50))

    def task(request: Request) -> dict[str, Any]:
        return dash.task_detail(request.path_params["task_id"])

    def failures(_request: Request) -> dict[str, Any]:
        return dash.failure_groups()

    def retry(request: Request) -> dict[str, Any]:
        reason = request.query_params.get("reason")
        if reason is None:
            raise ValueError("give the failure group's reason")
        return {"requeued": dash.retry_group(reason)}

    def cancel(request: Request) -> dict[str, Any]:
        jid = request.path_params["job_id"]
        return {"cancelled": client.cancel([jid])}

    def metrics(_request: Request) -> Response:
        return PlainTextResponse(render_metrics(dash.snapshot(), client.queue),
                                 media_type="text/plain; version=0.0.4")

    async def stream(request: Request) -> Response:
        limit = int(request.query_params.get("max") or 0)

        async def events() -> AsyncIterator[str]:
            sent = 0
            while True:
                data = await run_in_threadpool(dash.overview)
                yield f"event: overview\ndata: {json.dumps(data)}\n\n"
                sent += 1
                if limit and sent >= limit:
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(dash.refresh_s)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", sync(index)),
        Route("/api/overview", sync(overview)),
        Route("/api/jobs", sync(jobs)),
        Route("/api/workers", sync(workers)),
        Route("/api/tasks", sync(tasks)),
        Route("/api/tasks/{task_id}", sync(task)),
        Route("/api/failures", sync(failures)),
        Route("/api/failures/retry", sync(retry), methods=["POST"]),
        Route("/api/jobs/{job_id}/cancel", sync(cancel), methods=["POST"]),
        Route("/api/stream", stream),
        Route("/metrics", sync(metrics)),
        Mount("/static", StaticFiles(directory=_static_dir()), name="static"),
    ]
    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.dashboard = dash
    return app


def serve(client: Client, *, host: str = "127.0.0.1", port: int = 8265) -> None:
    """Serve until Ctrl-C; bound to loopback, only loopback host names are answered."""
    import uvicorn

    hosts = LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None
    # Open SSE streams never end on their own: do not wait long for them on Ctrl-C.
    uvicorn.run(create_app(client, allowed_hosts=hosts), host=host, port=port,
                log_level="warning", timeout_graceful_shutdown=2)
