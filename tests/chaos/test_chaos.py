"""Chaos: kill -9 workers and Redis mid-run; nothing is lost, nothing is recorded twice,
and no task ever has two live attempts at once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from conftest import RedisProcess, wait_for

from distcomp.spec import TaskSpec
from distcomp.store import Store

HEARTBEAT, LEASE = "0.5s", "3s"


def probe_cmd(log: Path, seconds: float) -> str:
    """A task that records its start and end, and flags any earlier attempt of the
    same task that is still alive when it starts (a second live attempt)."""
    return (
        f'f={log}; id=$DISTCOMP_TASK_ID; '
        f'for p in $(awk -v id="$id" \'$1=="start" && $2==id {{print $5}}\' $f 2>/dev/null); '
        # alive = exists and is not a zombie waiting for init to reap it
        f'do grep -qs "^State:[[:space:]]*[^Z[:space:]]" /proc/$p/status '
        f'&& echo "overlap $id $p" >> $f; done; '
        f'echo "start $id $DISTCOMP_ATTEMPT $(date +%s.%N) $$" >> $f; '
        f'sleep {seconds}; '
        f'echo "end $id $DISTCOMP_ATTEMPT $(date +%s.%N) $$" >> $f'
    )


class Workers:
    """Real `distcomp worker` processes that the test can kill -9 and restart."""

    def __init__(self, url: str, queue: str, state_dir: Path) -> None:
        self.env = dict(os.environ, DISTCOMP_REDIS=url, DISTCOMP_QUEUE=queue)
        self.state_dir = state_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "distcomp", "--state-dir", str(self.state_dir), "worker",
             "--name", name, "--cpus", "2", "--heartbeat", HEARTBEAT, "--lease", LEASE,
             "--probation", "0"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def check_exactly_once(store: Store, n: int, log: Path) -> None:
    counts = store.counts()
    assert counts.get("succeeded") == n, counts
    assert all(counts.get(s, 0) == 0 for s in ("queued", "running", "failed", "cancelled"))
    lines = log.read_text().splitlines()
    assert not [line for line in lines if line.startswith("overlap")]
    succeeded = [e["task"] for e in store.events(100_000) if e["type"] == "succeeded"]
    assert sorted(succeeded) == sorted(f"1.{i}" for i in range(1, n + 1))
    assert store.running_task_ids() == []


def test_kill_workers_and_redis_repeatedly(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis", aof=True)
    server.directory.mkdir()
    server.start()
    try:
        _chaos_run(server, tmp_path)
    finally:
        server.stop()


def _chaos_run(server: RedisProcess, tmp_path: Path) -> None:
    rng = random.Random(2024)
    log = tmp_path / "probe.log"
    store = Store(server.url, "chaos")
    n = 500
    store.submit([TaskSpec(cmd=probe_cmd(log, round(rng.uniform(0.05, 1.0), 2)))
                  for _ in range(n)], allow_duplicates=True)
    workers = Workers(server.url, "chaos", tmp_path / "state")
    names = ["w1", "w2", "w3"]
    for name in names:
        workers.start(name)
    pending: dict[str, float] = {}  # worker -> when to restart it
    redis_killed = False
    kills = 0
    started = time.monotonic()
    try:
        while True:
            time.sleep(2)
            now = time.monotonic()
            for name, when in list(pending.items()):
                if now >= when:
                    workers.start(name)
                    del pending[name]
            if not redis_killed and now - started > 8:
                server.kill9()
                time.sleep(1.0)
                server.start()  # from its AOF
                redis_killed = True
            try:
                if store.counts().get("succeeded", 0) >= n:
                    break
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # Redis is restarting
            alive = [w for w in names if w in workers.procs]
            if len(alive) > 1:
                victim = rng.choice(alive)
                workers.kill9(victim)
                kills += 1
                # sometimes back at once, sometimes after the lease has run out
                pending[victim] = now + rng.choice([0.0, 0.5, 4.5])
            if store.counts().get("failed"):
                failed = [(t, (store.task(t) or {}).get("reason")) for t in store.failed_task_ids()]
                raise AssertionError(f"a task failed: {failed}")
            assert now - started < 240, f"not done: {store.counts()}"
        for name in list(pending):
            workers.start(name)
        wait_for(lambda: store.counts().get("succeeded", 0) >= n, timeout=60)
    finally:
        workers.stop_all()
    assert redis_killed and kills >= 10
    check_exactly_once(store, n, log)
    # the chaos really hit running tasks: some were re-adopted or rerun
    kinds = {e["type"] for e in store.events(100_000)}
    assert kinds & {"reaped", "requeue", "retaken"} or any(
        store.task(f"1.{i}")["attempt"] != "1" for i in range(1, n + 1))  # type: ignore[index]


def test_restarted_worker_readopts_long_tasks(tmp_path: Path, store: Store) -> None:
    """kill -9 the worker and start it again: its tasks keep running and are
    re-adopted, not rerun (each task counts its runs in a file)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    store.submit([TaskSpec(cmd=f"echo x >> {runs}/$DISTCOMP_TASK_ID; sleep 4; echo done {i}")
                  for i in range(3)])
    workers = Workers(store.url, store.queue, tmp_path / "state")
    workers.start("node")
    try:
        wait_for(lambda: store.counts().get("running") == 2 and len(list(runs.iterdir())) == 2)
        workers.kill9("node")
        time.sleep(0.5)
        workers.start("node")
        wait_for(lambda: store.counts().get("succeeded") == 3, timeout=30)
    finally:
        workers.stop_all()
    for tid in ("1.1", "1.2", "1.3"):
        assert (runs / tid).read_text() == "x\n", f"{tid} ran more than once"
        task = store.task(tid)
        assert task is not None and task["attempt"] == "1" and task["worker"] == "node"
    assert store.task("1.1")["out_tail"] == "done 0\n"  # type: ignore[index]
    assert store.counts().get("stale_reports", 0) == 0


def test_task_that_ended_while_worker_was_down_is_reported(tmp_path: Path, store: Store
                                                            ) -> None:
    store.submit([TaskSpec(cmd="sleep 1; exit 3"), TaskSpec(cmd="sleep 1; echo fine")])
    workers = Workers(store.url, store.queue, tmp_path / "state")
    workers.start("node")
    try:
        wait_for(lambda: store.counts().get("running") == 2)
        workers.kill9("node")
        time.sleep(1.5)  # both tasks end while no worker watches them
        workers.start("node")
        wait_for(lambda: store.counts().get("succeeded") == 1
                 and store.counts().get("failed") == 1, timeout=30)
    finally:
        workers.stop_all()
    assert store.task("1.1")["reason"] == "exit code 3"  # type: ignore[index]
    assert store.task("1.2")["out_tail"] == "fine\n"  # type: ignore[index]
    assert store.task("1.2")["attempt"] == "1"  # type: ignore[index]


def test_orphans_stop_before_their_rerun_starts(tmp_path: Path, store: Store) -> None:
    """A worker killed for good: its guardian stops the orphaned task before the lease
    runs out, so the rerun on another worker never overlaps it."""
    log = tmp_path / "probe.log"
    store.submit([TaskSpec(cmd=probe_cmd(log, 8))])
    workers = Workers(store.url, store.queue, tmp_path / "state")
    workers.start("doomed")
    try:
        wait_for(lambda: log.exists() and "start" in log.read_text())
        workers.kill9("doomed")
        workers.start("rescuer")
        wait_for(lambda: store.counts().get("succeeded") == 1, timeout=40)
    finally:
        workers.stop_all()
    lines = log.read_text().splitlines()
    assert not [line for line in lines if line.startswith("overlap")], lines
    assert [line.split()[2] for line in lines if line.startswith("start")] == ["1", "2"]
    task = store.task("1.1")
    assert task is not None and task["worker"] == "rescuer" and task["attempt"] == "2"


def test_redis_restart_does_not_requeue_running_tasks(tmp_path: Path) -> None:
    """Redis is down for longer than the lease: once it is back, the worker renews and
    its tasks are not reaped (no second attempt)."""
    server = RedisProcess(tmp_path / "redis", aof=True)
    server.directory.mkdir()
    server.start()
    store = Store(server.url, "outage")
    store.submit([TaskSpec(cmd="sleep 7; echo ok"), TaskSpec(cmd="sleep 7; echo ok2")])
    workers = Workers(server.url, "outage", tmp_path / "state")
    workers.start("node")
    try:
        wait_for(lambda: store.counts().get("running") == 2)
        server.kill9()
        time.sleep(3.5)  # longer than the 3 s lease: every deadline passes meanwhile
        server.start()
        wait_for(lambda: store.counts().get("succeeded") == 2, timeout=40)
    finally:
        workers.stop_all()
        try:
            events = [e["type"] for e in store.events(1000)]
            attempts = [store.task(t)["attempt"] for t in ("1.1", "1.2")]  # type: ignore[index]
        finally:
            server.stop()
    assert "reaped" not in events
    assert attempts == ["1", "1"]
