"""Prometheus text exposition of the queue (``distcomp metrics`` and ``/metrics``).

Everything comes from a :class:`~distcomp.watch.Snapshot`, so a scrape costs
O(jobs + workers) Redis commands, never a scan of tasks. What is counted:

* ``distcomp_tasks{job,state}`` / ``distcomp_queue_tasks{state}``: the exact
  counters the Lua scripts maintain.
* ``distcomp_stale_reports_total``: completions rejected for a stale lease token
  (queue counter, exact).
* ``distcomp_events_recent{type}``: transitions of each type (``reaped`` = lease
  expiries, ``requeue`` = preemptions and retries, ``failed``, ...) among the
  latest events kept in the capped stream. This is a window, not a lifetime total:
  the stream keeps about the last 10,000 transitions.
* worker capacity and usage (``distcomp_worker_*``) from each heartbeat.
"""

from __future__ import annotations

from .watch import Snapshot


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(snap: Snapshot, queue: str) -> str:
    q = _esc(queue)
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            all_labels = {"queue": q, **{k: _esc(v) for k, v in labels.items()}}
            text = ",".join(f'{k}="{v}"' for k, v in all_labels.items())
            lines.append(f"{name}{{{text}}} {value:g}")

    from .store import STATES

    metric("distcomp_queue_tasks", "gauge", "Tasks in the queue by state.",
           [({"state": s}, snap.counts.get(s, 0)) for s in STATES])
    metric("distcomp_tasks", "gauge", "Tasks by job and state.",
           [({"job": v.job.id, "state": s}, v.job.counts.get(s, 0))
            for v in snap.jobs for s in STATES])
    metric("distcomp_job_throughput_per_second", "gauge",
           "Tasks of the job finished per second over the last minute.",
           [({"job": v.job.id}, round(v.rate, 4)) for v in snap.jobs])
    metric("distcomp_stale_reports_total", "counter",
           "Completions rejected because their lease token was stale.",
           [({}, snap.counts.get("stale_reports", 0))])
    metric("distcomp_events_recent", "gauge",
           "Transitions by type among the latest events in the capped stream "
           "(reaped = lease expiries; requeue = preemptions and retries).",
           [({"type": t}, n) for t, n in sorted(snap.events.items())])
    rows = []
    for w in snap.workers:
        info = w.get("info") or {}
        labels = {"worker": str(w.get("name", "?")), "host": str(info.get("host", ""))}
        rows.append((labels, info, w))
    metric("distcomp_worker_up", "gauge", "1 if the worker's heartbeat is fresh.",
           [(lb, 1 if w.get("status") == "alive" else 0) for lb, _i, w in rows])
    for key, help_text in (("cpus", "CPUs the worker offers."),
                           ("used_cpus", "CPUs declared by its running tasks."),
                           ("mem", "Memory the worker offers, bytes."),
                           ("used_mem", "Memory declared by its running tasks, bytes."),
                           ("rss", "Measured peak RSS of its running tasks, bytes."),
                           ("running", "Tasks running on the worker.")):
        metric(f"distcomp_worker_{key}", "gauge", help_text,
               [(lb, float(info.get(key) or 0)) for lb, info, _w in rows])
    metric("distcomp_worker_heartbeat_age_seconds", "gauge", "Seconds since the heartbeat.",
           [(lb, round(float(w.get("heartbeat_age_s", 0)), 3)) for lb, _i, w in rows])
    return "\n".join(lines) + "\n"
