"""The dashboard app over HTTP (Starlette's TestClient), its Redis cost, and a real browser."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RedisProcess, WorkerThread, wait_for

pytest.importorskip("starlette")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # newer Starlette prefers httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from distcomp.client import Client
from distcomp.dashboard import create_app
from distcomp.dashboard.app import LOOPBACK_HOSTS
from distcomp.spec import TaskSpec
from distcomp.store import Store

StartWorker = Callable[..., WorkerThread]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(redis_server: RedisProcess, queue_name: str, tmp_path: Path) -> Iterator[Client]:
    c = Client(redis_server.url, queue_name, tmp_path / "state")
    yield c
    c.close()


def _mixed_job(store: Store, n_ok: int = 4, n_bad: int = 3) -> list[str]:
    specs = [TaskSpec(cmd=f"echo hello {i}; echo warn {i} >&2") for i in range(n_ok)]
    specs += [TaskSpec(cmd=f"echo failing {i}; exit 5") for i in range(n_bad)]
    specs += [TaskSpec(cmd="echo timeout-ish; exit 9")]
    return store.submit(specs, job_name="mixed").task_ids


def test_json_endpoints_actions_sse_and_metrics(store: Store, client: Client,
                                                start_worker: StartWorker) -> None:
    _mixed_job(store)
    start_worker(max_tasks=8, name="dash-w").join()
    http = TestClient(create_app(client, refresh_s=0.05))

    page = http.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert http.get("/static/app.js").status_code == 200

    ov = http.get("/api/overview").json()
    assert ov["queue"] == client.queue
    assert ov["counts"]["succeeded"] == 4 and ov["counts"]["failed"] == 4
    assert ov["jobs"][0]["name"] == "mixed" and ov["jobs"][0]["done"] is True
    assert ov["workers"][0]["name"] == "dash-w" and len(ov["history"]) >= 1
    assert ov["workers"][0]["tasks"] == []
    assert http.get("/api/jobs").json()["jobs"][0]["finished"] == 8
    assert http.get("/api/workers").json()["workers"][0]["status"] == "stopped"

    # Paginated task list: a cursor walks the dense ids.
    first = http.get("/api/tasks", params={"limit": 3}).json()
    assert [t["id"] for t in first["tasks"]] == ["1.1", "1.2", "1.3"] and first["next"] == "1.4"
    rest = http.get("/api/tasks", params={"limit": 10, "cursor": first["next"]}).json()
    assert rest["tasks"][0]["id"] == "1.4" and rest["next"] is None
    failed = http.get("/api/tasks", params={"state": "failed"}).json()
    assert {t["id"] for t in failed["tasks"]} == {"1.5", "1.6", "1.7", "1.8"}
    assert failed["indexed"] is True
    ok = http.get("/api/tasks", params={"state": "succeeded", "q": "HELLO 2"}).json()
    assert [t["id"] for t in ok["tasks"]] == ["1.3"]
    assert http.get("/api/tasks", params={"state": "bogus"}).status_code == 400
    assert http.get("/api/tasks", params={"job": "77"}).status_code == 404

    detail = http.get("/api/tasks/1.2").json()
    assert detail["logs"]["out"]["text"] == "hello 1\n"
    assert detail["logs"]["err"]["text"] == "warn 1\n"
    assert detail["spec"]["cmd"].startswith("echo hello 1")
    assert detail["task"]["attempt"] == 1
    assert [e["type"] for e in detail["history"]] == ["claim", "succeeded"]
    assert http.get("/api/tasks/9.9").status_code == 404

    groups = http.get("/api/failures").json()
    assert groups["total_failed"] == 4
    by_reason = {g["reason"]: g for g in groups["groups"]}
    assert by_reason["exit code 5"]["count"] == 3 and by_reason["exit code 9"]["count"] == 1
    # Actions need the custom header (a cross-site form cannot send it).
    assert http.post("/api/failures/retry", params={"reason": "exit code 5"}).status_code == 403
    act = {"X-Distcomp-Action": "1"}
    assert http.post("/api/failures/retry", params={"reason": "exit code 5"},
                     headers=act).json() == {"requeued": 3}
    assert client.counts()["queued"] == 3 and client.counts()["failed"] == 1
    assert http.post("/api/failures/retry", headers=act).status_code == 400

    assert http.post("/api/jobs/1/cancel").status_code == 403
    assert http.post("/api/jobs/1/cancel", headers=act).json() == {"cancelled": 3}
    assert client.counts()["cancelled"] == 3

    # Bound to loopback, other host names (DNS rebinding) are refused.
    guarded = TestClient(create_app(client, allowed_hosts=("127.0.0.1",)))
    assert guarded.get("/api/jobs").status_code == 400  # TestClient's host is "testserver"
    assert guarded.get("http://127.0.0.1/api/jobs").status_code == 200

    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert f'distcomp_tasks{{queue="{client.queue}",job="1",state="cancelled"}} 3' in metrics.text

    with http.stream("GET", "/api/stream", params={"max": 2}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = "".join(resp.iter_text())
    events = [json.loads(line[len("data: "):]) for line in body.splitlines()
              if line.startswith("data: ")]
    assert len(events) == 2 and events[-1]["counts"]["cancelled"] == 3


def test_task_cursor_walks_every_task_once(store: Store, client: Client) -> None:
    for j in range(3):
        store.submit([TaskSpec(cmd=f"job{j} task {i}") for i in range(7 + j)])
    store.cancel(["2.3", "3.1", "3.9"])
    http = TestClient(create_app(client))

    def walk(params: dict[str, Any]) -> list[str]:
        seen: list[str] = []
        cursor = ""
        for _ in range(100):
            page = http.get("/api/tasks", params={**params, "cursor": cursor}).json()
            seen += [t["id"] for t in page["tasks"]]
            if not page["next"]:
                return seen
            cursor = page["next"]
        raise AssertionError("cursor did not end")

    everything = [f"{j}.{i}" for j in (1, 2, 3) for i in range(1, 8 + j - 1)]
    assert walk({"limit": 4}) == everything
    assert walk({"limit": 1, "state": "cancelled"}) == ["2.3", "3.1", "3.9"]
    assert walk({"limit": 2, "state": "queued", "job": "3"}) == [f"3.{i}" for i in range(2, 9)]
    assert walk({"limit": 5, "q": "job1 task"}) == [f"2.{i}" for i in range(1, 9)]


def _commands(r: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = r.info("commandstats")
    ignore = {"cmdstat_info", "cmdstat_client", "cmdstat_hello", "cmdstat_ping"}
    return {k: int(v["calls"]) for k, v in stats.items() if k not in ignore}


def _cost(r: redis.Redis, http: TestClient, path: str, params: dict[str, Any]) -> int:
    assert http.get(path, params=params).status_code == 200  # warm: connections, caches
    before = _commands(r)
    resp = http.get(path, params=params)
    after = _commands(r)
    assert resp.status_code == 200
    return sum(after.values()) - sum(before.values())


def test_overview_and_task_pages_cost_the_same_with_200k_tasks(tmp_path: Path) -> None:
    """Commands per request do not grow with the queue: 1,000 vs 200,000 tasks.

    Both queues have 10 jobs (the overview is O(jobs + workers)); only the number of
    tasks per job differs. The count comes from the server's INFO commandstats.
    """
    server = RedisProcess(tmp_path)
    server.start()
    try:
        r = redis.Redis(unix_socket_path=str(server.socket))
        costs: dict[str, dict[str, int]] = {}
        for queue, per_job in (("small", 100), ("large", 20000)):
            store = Store(server.url, queue)
            for j in range(10):
                store.submit([TaskSpec(cmd=f"task {j}") for _ in range(per_job)],
                             allow_duplicates=True)
            if queue == "small":
                assert store.counts()["queued"] == 1000
            else:
                assert store.counts()["queued"] == 200_000
            # Some failures so the failed-set page has something to read.
            store.register_worker("w", "i", lease_ms=60000, info={}, fields={})
            for c in store.claim("w", "i", free_mem=2**40, free_cpus=64, free_gpus=0,
                                 max_count=60, lease_ms=60000):
                store.fail(c.task_id, c.token, "exit code 1", {}, retryable=False)
            c = Client(server.url, queue, tmp_path / "state")
            http = TestClient(create_app(c, refresh_s=0.0))
            costs[queue] = {
                "overview": _cost(r, http, "/api/overview", {}),
                "tasks": _cost(r, http, "/api/tasks", {"limit": 50}),
                "tasks_page_2": _cost(r, http, "/api/tasks", {"limit": 50, "cursor": "7.51"}),
                "job_tasks": _cost(r, http, "/api/tasks", {"job": "4", "limit": 50}),
                "failed": _cost(r, http, "/api/tasks", {"state": "failed", "limit": 50}),
                "metrics": _cost(r, http, "/metrics", {}),
            }
            c.close()
            store.close()
        assert costs["small"] == costs["large"], costs
        assert costs["large"]["tasks"] < 100 and costs["large"]["overview"] < 50, costs
    finally:
        server.stop()


# -- the real browser ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Uvicorn:
    """The dashboard served by uvicorn in a thread, as `distcomp dashboard` serves it."""

    def __init__(self, client: Client) -> None:
        import uvicorn

        self.port = _free_port()
        app = create_app(client, refresh_s=0.3, allowed_hosts=LOOPBACK_HOSTS)
        config = uvicorn.Config(app, host="127.0.0.1",
                                port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=15)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        import subprocess

        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True,
                       check=False, timeout=300)
    if not Path(path).exists():
        pytest.skip("chromium is not installed and `apt-get install chromium` failed")
    return path


def test_browser_end_to_end(store: Store, client: Client, start_worker: StartWorker,
                            tmp_path: Path) -> None:
    chromium = _chromium()
    playwright = pytest.importorskip("playwright.sync_api",
                                     reason="needs Playwright's core package (no browser "
                                            "download: it drives /usr/bin/chromium)")
    gate = tmp_path / "gate"
    # Tasks wait for a gate file so the page can watch progress move.
    # Failing tasks first (1.1-1.3), then six that wait for the gate (1.4-1.9).
    specs = [TaskSpec(cmd=f"echo broken {i} >&2; exit 3") for i in range(3)]
    specs += [TaskSpec(cmd=f"while [ ! -e {gate} ]; do sleep 0.05; done; echo out {i}")
              for i in range(6)]
    store.submit(specs, job_name="browser-job")
    start_worker(name="browser-w", cpus=2)
    with _Uvicorn(client) as url, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        page.goto(url + "/")
        page.wait_for_selector("#live.on", timeout=15000)
        page.wait_for_selector("#job-1")

        def cell(state: str) -> int:
            return int(page.inner_text(f'#job-1 td[data-state="{state}"]'))

        # The failure group appears; progress moves once the gate opens.
        page.wait_for_selector("tr.failure-group:has-text('exit code 3')", timeout=20000)
        assert cell("succeeded") == 0
        # The worker row lists the (gated) tasks it runs.
        page.wait_for_selector("#workers td.held:has-text('1.4')")
        gate.touch()
        page.wait_for_function(
            "document.querySelector('#job-1 td[data-state=\"succeeded\"]').textContent === '6'",
            timeout=20000)
        assert cell("failed") == 3
        # Retry the group from the UI: the tasks are requeued (and fail again).
        before = store.events(10000)
        page.click("tr.failure-group:has-text('exit code 3') button.retry")
        wait_for(lambda: sum(1 for e in store.events(10000) if e["type"] == "requeue")
                 >= 3 + sum(1 for e in before if e["type"] == "requeue"), timeout=15)
        wait_for(lambda: client.job("1").counts["failed"] == 3, timeout=15)
        assert all(client.task(f"1.{i}").attempt == 2 for i in (1, 2, 3))
        # The task detail shows the logs.
        page.fill("#task-filter input[name=job]", "1")
        page.click("#task-filter button")
        page.wait_for_selector("#tasks tr[data-task='1.2']")
        page.click("#tasks tr[data-task='1.2']")
        page.wait_for_selector("#log-err:has-text('broken 1')")
        page.click("#tasks tr[data-task='1.5']")
        page.wait_for_selector("#log-out:has-text('out 1')")
        page.goto(url + "/?task=1.2")
        page.wait_for_selector("#log-err:has-text('broken 1')")
        page.wait_for_function("document.querySelectorAll('#chart-tasks polyline').length == 3",
                               timeout=10000)
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    # The README's screenshot: refreshed on request only, so a test run leaves the tree clean.
    if os.environ.get("DISTCOMP_UPDATE_SCREENSHOTS"):
        (ROOT / "docs" / "img").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "img" / "dashboard.png")


def test_cli_dashboard_serves_on_loopback(store: Store, cli_env: dict[str, str]) -> None:
    import subprocess
    import sys
    import urllib.request

    store.submit([TaskSpec(cmd="true")], job_name="cli-dash")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distcomp", "dashboard", "--port", str(port)],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs", timeout=2) as r:
                    return bool(json.loads(r.read())["jobs"][0]["name"] == "cli-dash")
            except OSError:
                return False

        wait_for(up, timeout=20, interval=0.1)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=20)
    assert "ssh -L" in err and f"127.0.0.1:{port}" in err
