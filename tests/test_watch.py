"""`distcomp watch` and `distcomp metrics`: rendered to a captured console, real Redis."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RedisProcess, WorkerThread, run_cli
from rich.console import Console

from distcomp.client import Client
from distcomp.metrics import render_metrics
from distcomp.spec import TaskSpec
from distcomp.store import Store
from distcomp.watch import Sampler, format_eta, render

StartWorker = Callable[..., WorkerThread]


@pytest.fixture
def client(redis_server: RedisProcess, queue_name: str, tmp_path: Path) -> Client:
    c = Client(redis_server.url, queue_name, tmp_path / "state")
    yield c  # type: ignore[misc]
    c.close()


def _ghost_worker(store: Store) -> None:
    """A worker whose heartbeat is older than its lease: it shows as dead."""
    store.register_worker("ghost", "i-ghost", lease_ms=1, fields={"host": "node9"},
                          info={"host": "node9", "cpus": 8, "mem": 2**30, "used_cpus": 0,
                                "used_mem": 0, "rss": 0, "running": 0})
    time.sleep(0.05)


def _captured() -> Console:
    return Console(record=True, width=220, force_terminal=True, color_system="standard",
                   emoji=False, highlight=False)


def test_watch_shows_progress_workers_and_failures(store: Store, client: Client,
                                                   start_worker: StartWorker) -> None:
    store.submit([TaskSpec(cmd=f"true {i}") for i in range(4)]
                 + [TaskSpec(cmd=f"echo bad {i} >&2; exit 3") for i in range(2)], job_name="sweep")
    start_worker(max_tasks=6, name="w-one").join()
    _ghost_worker(store)
    snap = Sampler(client).snapshot()
    con = _captured()
    con.print(render(snap, queue=client.queue))
    text = con.export_text(styles=False, clear=False)
    assert "sweep" in text and "6/6" in text and "done" in text
    assert re.search(r"1\W+sweep.*6/6\D+0\D+0\D+4\D+2\D+0\D", text), text
    assert "w-one" in text and "stopped" in text
    assert "ghost" in text and "dead" in text and "node9" in text
    assert "latest failures" in text and "exit code 3" in text
    # The dead worker's row is highlighted (bold red).
    styled = con.export_text(styles=True)
    ghost_line = next(line for line in styled.splitlines() if "ghost" in line)
    assert "\x1b[1;31m" in ghost_line


def test_eta_from_event_stream_then_from_sampled_counters(store: Store, client: Client) -> None:
    store.submit([TaskSpec(cmd=f"true {i}") for i in range(10)])
    store.register_worker("w", "i", lease_ms=60000, info={}, fields={})
    claims = store.claim("w", "i", free_mem=2**40, free_cpus=4, free_gpus=0, max_count=4,
                         lease_ms=60000)
    for c in claims:
        assert store.complete(c.task_id, c.token, {"exit_code": 0})
    sampler = Sampler(client)
    first = sampler.snapshot().jobs[0]
    # No history yet: 4 terminal events within the last second -> 4 tasks/s, 6 left.
    assert first.rate == pytest.approx(4.0) and first.eta_s == pytest.approx(1.5)
    # With 10 s of the viewer's own samples the exact counters decide.
    now, _finished = sampler._history[-1]
    sampler._history.clear()
    sampler._history.append((now - 10, {"1": 0}))
    second = sampler.snapshot().jobs[0]
    assert second.rate == pytest.approx(0.4, rel=0.05)
    assert second.eta_s == pytest.approx(15, rel=0.05)
    assert format_eta(second.eta_s) in ("14s", "15s")
    assert format_eta(3725) == "1h02m" and format_eta(None) == "-"


def test_compact_view_is_jobs_only(store: Store, client: Client) -> None:
    store.submit([TaskSpec(cmd="true")], job_name="one")
    con = _captured()
    con.print(render(Sampler(client).snapshot(), compact=True))
    text = con.export_text()
    assert "one" in text and "0/1" in text and "workers" not in text


def test_metrics_prometheus_text(store: Store, client: Client,
                                 start_worker: StartWorker) -> None:
    store.submit([TaskSpec(cmd="true"), TaskSpec(cmd="exit 1")])
    start_worker(max_tasks=2, name="wm").join()
    _ghost_worker(store)
    text = render_metrics(Sampler(client).snapshot(), client.queue)
    q = client.queue
    assert f'distcomp_tasks{{queue="{q}",job="1",state="succeeded"}} 1' in text
    assert f'distcomp_tasks{{queue="{q}",job="1",state="failed"}} 1' in text
    assert f'distcomp_queue_tasks{{queue="{q}",state="queued"}} 0' in text
    assert f'distcomp_worker_up{{queue="{q}",worker="ghost",host="node9"}} 0' in text
    assert f'distcomp_worker_cpus{{queue="{q}",worker="ghost",host="node9"}} 8' in text
    assert 'distcomp_events_recent{' in text and 'type="failed"} 1' in text
    assert "# TYPE distcomp_stale_reports_total counter" in text
    # Every sample line is `name{labels} number`.
    for line in text.splitlines():
        if not line.startswith("#"):
            assert re.fullmatch(r'[a-z_]+\{[^}]*\} -?[0-9.e+]+', line), line


def test_cli_watch_once_and_metrics(store: Store, cli_env: dict[str, str]) -> None:
    store.submit([TaskSpec(cmd="true")], job_name="clijob")
    cli_env = {**cli_env, "COLUMNS": "200"}
    out = run_cli(["watch", "--once"], cli_env)
    assert out.returncode == 0, out.stderr
    assert "clijob" in out.stdout and "workers" in out.stdout
    missing = run_cli(["watch", "--once", "99"], cli_env)
    assert missing.returncode == 4 and "no job" in missing.stderr
    metrics = run_cli(["metrics"], cli_env)
    assert metrics.returncode == 0, metrics.stderr
    assert 'state="queued"} 1' in metrics.stdout
