"""Recovery times after faults, measured with real processes (docs/failure-modes.md).

Each scenario starts its own redis-server (unix socket, AOF) and real
`distcomp worker` processes, injects one fault with kill -9, and measures how
long until the system has recovered, from the event stream and task records.

    python -m benchmarks.recovery [--heartbeat 1] [--lease 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from distcomp.server import find_redis_server
from distcomp.spec import TaskSpec
from distcomp.store import Store


class Lab:
    """One redis-server and the worker processes of one scenario."""

    def __init__(self, root: Path, heartbeat: float, lease: float) -> None:
        self.root = root
        self.socket = root / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.heartbeat, self.lease = heartbeat, lease
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def start_redis(self) -> None:
        self.redis_proc = subprocess.Popen(
            [find_redis_server(), "--port", "0", "--unixsocket", str(self.socket), "--dir",
             str(self.root), "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: _pings(self.url), 10)

    def kill_redis(self) -> None:
        assert self.redis_proc is not None
        self.redis_proc.kill()
        self.redis_proc.wait()

    def start_worker(self, name: str) -> None:
        env = dict(os.environ, DISTCOMP_REDIS=self.url, DISTCOMP_QUEUE="bench")
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "distcomp", "--state-dir", str(self.root / "state"), "worker",
             "--name", name, "--cpus", "2", "--heartbeat", f"{self.heartbeat}s",
             "--lease", f"{self.lease}s"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        proc.kill()
        proc.wait()

    def close(self) -> None:
        for proc in self.workers.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis_proc is not None:
            self.redis_proc.kill()
            self.redis_proc.wait()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except (redis.ConnectionError, OSError):
        return False


def wait(predicate: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return time.monotonic() - start
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        time.sleep(0.02)
    raise TimeoutError("did not recover in time")


@contextmanager
def lab(heartbeat: float, lease: float) -> Iterator[tuple[Lab, Store]]:
    root = Path(tempfile.mkdtemp(prefix="dc-recovery-"))
    env = Lab(root, heartbeat, lease)
    env.start_redis()
    try:
        yield env, Store(env.url, "bench")
    finally:
        env.close()
        shutil.rmtree(root, ignore_errors=True)


def task_field(store: Store, tid: str, name: str) -> str:
    return (store.task(tid) or {}).get(name, "")


def dead_worker(heartbeat: float, lease: float) -> float:
    """kill -9 a worker for good: seconds until its task runs on another worker."""
    with lab(heartbeat, lease) as (env, store):
        store.submit([TaskSpec(cmd="sleep 600", cpus=2)])
        env.start_worker("a")
        wait(lambda: task_field(store, "1.1", "worker") == "a", 30)
        env.start_worker("b")
        wait(lambda: len(store.workers()) == 2, 30)
        env.kill_worker("a")
        return wait(lambda: task_field(store, "1.1", "worker") == "b", 10 * lease)


def restarted_worker(heartbeat: float, lease: float) -> float:
    """kill -9 a worker and start it at once: seconds until its task is re-adopted
    (renewed by the new process; the task itself never stopped)."""
    with lab(heartbeat, lease) as (env, store):
        store.submit([TaskSpec(cmd="sleep 600")])
        env.start_worker("a")
        wait(lambda: task_field(store, "1.1", "state") == "running", 30)
        instance = store.worker_record("a")["instance"]
        env.kill_worker("a")
        env.start_worker("a")
        elapsed = wait(lambda: store.worker_record("a").get("instance") != instance, 30)
        assert task_field(store, "1.1", "attempt") == "1"
        return elapsed


def redis_restart(heartbeat: float, lease: float, down: float = 2.0) -> float:
    """kill -9 Redis, restart it from its AOF after ``down`` s: seconds from the restart
    until the worker has renewed its lease (its task kept running throughout)."""
    with lab(heartbeat, lease) as (env, store):
        store.submit([TaskSpec(cmd="sleep 600")])
        env.start_worker("a")
        wait(lambda: task_field(store, "1.1", "state") == "running", 30)
        deadline = int(task_field(store, "1.1", "deadline"))
        env.kill_redis()
        time.sleep(down)
        env.start_redis()
        elapsed = wait(lambda: int(task_field(store, "1.1", "deadline")) > deadline + down * 1000,
                       10 * lease)
        assert task_field(store, "1.1", "attempt") == "1"
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--lease", type=float, default=6.0)
    args = parser.parse_args()
    hb, lease = args.heartbeat, args.lease
    print(f"heartbeat {hb:g}s, lease {lease:g}s")
    print(f"dead worker, task rerun elsewhere after: {dead_worker(hb, lease):6.2f}s")
    print(f"restarted worker, task re-adopted after: {restarted_worker(hb, lease):6.2f}s")
    print(f"Redis down 2s, lease renewed after restart: {redis_restart(hb, lease):6.2f}s")


if __name__ == "__main__":
    main()
