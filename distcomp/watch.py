"""``distcomp watch``: a live view of the queue that costs O(jobs + workers) per refresh.

The predecessor's users re-read every task on every refresh. This view reads only
what the Lua scripts already keep up to date: the per-job counters, the queue
counters, the worker hashes and the capped event stream. Nothing here scans tasks,
so a refresh costs the same with a thousand or a million tasks.

The same :class:`Sampler` feeds the dashboard and ``/metrics``.

ETA (per job) = tasks left (queued + running) / recent completion rate, where the
rate is the number of tasks of that job that finished (succeeded, failed or were
cancelled) in the last :data:`RATE_WINDOW_S` seconds divided by the time covered.
The viewer samples the job counters (exact) on every refresh; until it has a few
seconds of its own samples it counts terminal events of the job in the event
stream instead, timed by the stream ids (the Redis server's clock).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .client import Client
from .spec import format_size
from .store import FINISHED_STATES, STATES, JobInfo

#: Seconds of history the completion rate is computed over.
RATE_WINDOW_S = 60.0
#: Below this much sampled history, the rate comes from the event stream.
MIN_SAMPLED_S = 5.0
#: How many recent events a snapshot reads (one XREVRANGE).
EVENTS_READ = 2000
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class JobView:
    """One job as the views show it: counters plus the derived rate and ETA."""

    job: JobInfo
    rate: float  # finished tasks per second over the recent window
    eta_s: float | None  # None: nothing left, or no recent completions to extrapolate

    @property
    def left(self) -> int:
        return self.job.counts.get("queued", 0) + self.job.counts.get("running", 0)

    def as_dict(self) -> dict[str, Any]:
        j = self.job
        return {"id": j.id, "name": j.name, "n_tasks": j.n_tasks, "counts": j.counts,
                "finished": j.finished, "done": j.done, "rate_per_s": round(self.rate, 4),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}


@dataclass
class Snapshot:
    """Everything one refresh reads; ``time_s`` is the Redis server's clock."""

    time_s: float
    counts: dict[str, int]
    jobs: list[JobView]
    workers: list[dict[str, Any]]
    failures: list[dict[str, str]]  # latest "failed" events, newest first
    throughput: float  # tasks finished per second, all jobs, recent window
    events: dict[str, int] = field(default_factory=dict)  # event type -> count in stream read

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.time_s, "counts": self.counts,
                "jobs": [j.as_dict() for j in self.jobs],
                "workers": [_worker_dict(w) for w in self.workers],
                "failures": self.failures, "throughput_per_s": round(self.throughput, 4),
                "totals": cluster_totals(self.workers)}


def _worker_dict(w: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "host", "status", "n_tasks", "heartbeat_age_s", "info", "state")
    return {k: w.get(k) for k in keep}


def cluster_totals(workers: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Capacity and usage summed over live workers (for charts and /metrics)."""
    alive = [w for w in workers if w.get("status") == "alive"]
    tot: dict[str, float] = {"workers_alive": len(alive), "workers_dead":
                             sum(1 for w in workers if w.get("status") == "dead")}
    for key in ("cpus", "used_cpus", "mem", "used_mem", "rss", "running"):
        tot[key] = float(sum(float(w["info"].get(key) or 0) for w in alive))
    return tot


def _event_time_s(event_id: str) -> float:
    return int(event_id.split("-", 1)[0]) / 1000


class Sampler:
    """Reads snapshots and remembers finished counts per job between them for rates.

    Keep one per viewer: the history it keeps is what makes the rate exact (from
    counters) rather than estimated from the capped event stream.
    """

    def __init__(self, client: Client, job_ids: Sequence[str] | None = None,
                 failures: int = 10) -> None:
        self.client = client
        self.job_ids = list(job_ids) if job_ids else None
        self.n_failures = failures
        self._history: deque[tuple[float, dict[str, int]]] = deque()

    def snapshot(self) -> Snapshot:
        store = self.client.store
        now = store.server_time_ms() / 1000
        counts = self.client.counts()
        jobs = self.client.jobs(self.job_ids)
        workers = self.client.workers()
        events = store.events(EVENTS_READ)
        finished = {j.id: j.finished for j in jobs}
        self._history.append((now, finished))
        while self._history and now - self._history[0][0] > RATE_WINDOW_S:
            self._history.popleft()
        wanted = {j.id for j in jobs}
        by_type: dict[str, int] = {}
        for ev in events:
            by_type[ev.get("type", "?")] = by_type.get(ev.get("type", "?"), 0) + 1
        failures = [ev for ev in reversed(events) if ev.get("type") == "failed"
                    and ev.get("task", "").split(".", 1)[0] in wanted][: self.n_failures]
        rates = self._rates(now, jobs, events)
        views = [JobView(j, rates.get(j.id, 0.0), _eta(j, rates.get(j.id, 0.0))) for j in jobs]
        return Snapshot(now, counts, views, workers, failures, sum(rates.values()), by_type)

    def _rates(self, now: float, jobs: Sequence[JobInfo],
               events: Sequence[dict[str, str]]) -> dict[str, float]:
        oldest_t, oldest = self._history[0]
        span = now - oldest_t
        if span >= MIN_SAMPLED_S:
            return {j.id: max(j.finished - oldest.get(j.id, j.finished), 0) / span
                    for j in jobs}
        # Too little history of our own: count terminal events in the stream window.
        since = now - RATE_WINDOW_S
        done: dict[str, int] = {}
        first_t = now
        for ev in events:
            t = _event_time_s(ev["id"])
            if t < since or ev.get("type") not in TERMINAL_EVENTS:
                continue
            first_t = min(first_t, t)
            jid = ev.get("task", "").split(".", 1)[0]
            done[jid] = done.get(jid, 0) + 1
        # The stream may be capped: it then covers less than the window, so divide by
        # what it covers (at least a second, so one event is not an absurd rate).
        window = max(now - max(first_t, since), 1.0)
        return {j.id: done.get(j.id, 0) / window for j in jobs}


def _eta(job: JobInfo, rate: float) -> float | None:
    left = job.counts.get("queued", 0) + job.counts.get("running", 0)
    if left == 0 or rate <= 0:
        return None
    return left / rate


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


_STATE_STYLE = {"queued": "cyan", "running": "yellow", "succeeded": "green", "failed": "red",
                "cancelled": "dim"}


def render(snap: Snapshot, *, compact: bool = False, queue: str = "") -> RenderableType:
    """The whole view as one rich renderable (``compact``: jobs only, for ``run``)."""
    jobs = Table(title=None if compact else f"queue {queue}  ·  "
                 f"{snap.throughput * 60:.1f} tasks/min", expand=False)
    jobs.add_column("job")
    jobs.add_column("name", max_width=24, overflow="ellipsis")
    jobs.add_column("progress", width=24)
    jobs.add_column("done", justify="right")
    for s in STATES:
        jobs.add_column(s, justify="right", style=_STATE_STYLE[s])
    jobs.add_column("rate/min", justify="right")
    jobs.add_column("ETA", justify="right")
    for view in snap.jobs:
        j = view.job
        style = "red" if j.counts.get("failed") else "green"
        bar = ProgressBar(total=max(j.n_tasks, 1), completed=j.finished, width=22,
                          complete_style=style, finished_style=style)
        jobs.add_row(j.id, Text(j.name), bar, f"{j.finished}/{j.n_tasks}",
                     *(str(j.counts.get(s, 0)) for s in STATES),
                     f"{view.rate * 60:.1f}", "done" if j.done else format_eta(view.eta_s))
    if compact:
        return jobs
    parts: list[RenderableType] = [jobs, _workers_table(snap.workers)]
    if snap.failures:
        fails = Table("task", "worker", "reason", title="latest failures")
        for ev in snap.failures:
            fails.add_row(ev.get("task", "?"), Text(ev.get("worker", "")),
                          Text(ev.get("reason", "")[:100]), style="red")
        parts.append(fails)
    return Group(*parts)


def _workers_table(workers: Sequence[dict[str, Any]]) -> Table:
    table = Table("worker", "status", "host", "slots", "cpus", "mem declared", "mem measured",
                  "heartbeat", title="workers")
    for w in workers:
        info = w.get("info") or {}
        style = {"dead": "bold red", "stopped": "dim"}.get(w.get("status", ""), "")
        table.add_row(Text(str(w.get("name", "?"))), w.get("status", "?"),
                      Text(str(info.get("host") or w.get("host", ""))),
                      f"{w.get('n_tasks', 0)}",
                      f"{info.get('used_cpus', 0)}/{info.get('cpus', '?')}",
                      f"{format_size(info.get('used_mem', 0))}/{format_size(info.get('mem'))}",
                      format_size(info.get("rss", 0)), f"{w.get('heartbeat_age_s', 0):.1f}s ago",
                      style=style)
    return table


def watch(client: Client, job_ids: Sequence[str] | None, *, interval: float = 1.0,
          once: bool = False, console: Any = None) -> None:
    """Refresh the view every ``interval`` seconds until Ctrl-C (``once``: print once)."""
    from rich.console import Console
    from rich.live import Live

    con = console or Console(emoji=False, highlight=False)
    sampler = Sampler(client, job_ids)
    if once:
        con.print(render(sampler.snapshot(), queue=client.queue))
        return
    with Live(render(sampler.snapshot(), queue=client.queue), console=con,
              refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render(sampler.snapshot(), queue=client.queue))
        except KeyboardInterrupt:
            pass


__all__ = ["FINISHED_STATES", "Sampler", "Snapshot", "format_eta", "render", "watch"]
