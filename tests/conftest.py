"""Fixtures that start real redis-server processes on temporary unix sockets.

No fake Redis: every test that checks a state transition runs the real Lua
scripts on a real server. One server serves the whole session; each test gets
its own queue name, so tests cannot see each other's keys.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from distcomp.server import find_redis_server
from distcomp.store import Store
from distcomp.worker import Stats, Worker, WorkerConfig


class RedisProcess:
    """A redis-server we own: start, kill -9, restart from its AOF."""

    def __init__(self, directory: Path, *, aof: bool = False) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        args = [find_redis_server(), "--port", "0", "--unixsocket", str(self.socket),
                "--unixsocketperm", "700", "--dir", str(self.directory), "--save", "",
                "--maxmemory-policy", "noeviction",
                "--appendonly", "yes" if self.aof else "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(unix_socket_path=str(self.socket)).ping():
                    return
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    directory = Path(tempfile.mkdtemp(prefix="dc-redis-"))
    server = RedisProcess(directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def queue_name() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def store(redis_server: RedisProcess, queue_name: str) -> Iterator[Store]:
    s = Store(redis_server.url, queue_name)
    yield s
    s.close()


@pytest.fixture
def cli_env(redis_server: RedisProcess, queue_name: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running the real `distcomp` command against the test server."""
    env = dict(os.environ)
    env.update({"DISTCOMP_REDIS": redis_server.url, "DISTCOMP_QUEUE": queue_name,
                "DISTCOMP_STATE_DIR": str(tmp_path / "state")})
    return env


def run_cli(args: list[str], env: dict[str, str], *, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distcomp", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


class WorkerThread:
    """A real Worker running in a thread of the test process."""

    def __init__(self, store: Store, **config: Any) -> None:
        config.setdefault("heartbeat", 0.5)
        # Tests of scheduling order trust declared memory; the memory tests set it.
        config.setdefault("probation", 0.0)
        config.setdefault("lease", 3.0)
        self.worker = Worker(Store(store.url, store.queue), WorkerConfig(**config))
        self.stats: Stats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.worker.run()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 30) -> Stats:
        self.worker.request_stop()
        return self.join(timeout)

    def join(self, timeout: float = 60) -> Stats:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error:
            raise self.error
        assert self.stats is not None
        return self.stats


@pytest.fixture
def start_worker(store: Store, tmp_path: Path) -> Iterator[Callable[..., WorkerThread]]:
    started: list[WorkerThread] = []

    def factory(**config: Any) -> WorkerThread:
        config.setdefault("log_dir", tmp_path / "logs")
        config.setdefault("state_dir", tmp_path / "state")
        w = WorkerThread(store, **config).start()
        started.append(w)
        return w

    yield factory
    for w in started:
        if w.thread.is_alive():
            w.worker.request_stop()
            w.worker.request_stop()
            w.thread.join(30)


def wait_for(predicate: Callable[[], bool], timeout: float = 30, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached in time")
