"""Bulk submission: how fast do 100,000 tasks get into the queue?

N tasks (default 100,000, ``--quick`` 10,000) of ``true <i>`` into an empty
queue on a private redis-server (unix socket, no persistence), fresh for every
run; the timed part ends when the tool's call returns, i.e. when the tasks are
durable in Redis and claimable. Contenders, alternating each round:

* **distcomp submit FILE** (whole command): ``python -m distcomp --redis URL
  submit FILE`` as a subprocess: interpreter start-up, imports, parsing the
  file, one atomic submit.
* **Client.submit_file** (library, in-process): what the command does minus
  start-up: parse + one atomic ``Store.submit`` of the whole file.
* **Client.submit_specs** (API): building N ``TaskSpec`` objects in Python and
  submitting them in one call (the cost a program that generates tasks pays).
* **RQ** ``Queue.enqueue_many`` of N ``Queue.prepare_data`` jobs (pipelined, one
  transaction), against the same kind of server. Skipped when ``rq`` is not
  installed.
* **redis-benchmark** ``-t lpush -n N`` on the same kind of server: a reference
  for raw single-command throughput (50 concurrent clients, one LPUSH each), not
  a task queue.

Every run is checked (distcomp: N queued tasks; RQ: N jobs in the queue). The
scripts are loaded into each server before the timed part, as on any server
that has seen one submit, so the first call's NOSCRIPT round trip is not timed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distcomp.client import Client
from distcomp.spec import TaskSpec
from distcomp.store import Store

from .common import (
    BENCH_EXTRA_INSTALL,
    RedisServer,
    Stopwatch,
    Summary,
    fmt_summary,
    not_installed,
    note,
    print_table,
    redis_server,
    redis_server_binary,
    result_row,
    rotated,
    summarize,
)
from .throughput import BenchError

DEFAULT_TASKS = 100_000
QUICK_TASKS = 10_000
TARGET_PER_S = 50_000


def noop(i: int) -> int:
    """What the RQ jobs would run (they are only enqueued here, never run)."""
    return i


def write_task_file(directory: Path, n: int) -> Path:
    path = directory / f"bulk-{n}.txt"
    path.write_text("".join(f"shell:0:0:1:true {i}\n" for i in range(n)))
    return path


def _check_queued(server: RedisServer, n: int) -> None:
    store = Store(server.url, "default")
    try:
        queued = store.counts().get("queued", 0)
    finally:
        store.close()
    if queued != n:
        raise BenchError(f"expected {n} queued tasks, the counters say {queued}")


def _warm_distcomp(server: RedisServer) -> None:
    """Load the scripts (another queue, so the measured queue starts empty)."""
    store = Store(server.url, "warmup")
    try:
        store.submit([TaskSpec(cmd="true")])
    finally:
        store.close()


def run_cli(task_file: Path, n: int) -> float:
    with redis_server() as server:
        _warm_distcomp(server)
        state = Path(tempfile.mkdtemp(prefix="dcbench-sub-", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if k not in ("DISTCOMP_REDIS",
                                                                "DISTCOMP_QUEUE")}
        argv = [sys.executable, "-m", "distcomp", "--state-dir", str(state), "--redis",
                server.url, "submit", str(task_file)]
        try:
            with Stopwatch() as sw:
                proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                                      check=False, stdin=subprocess.DEVNULL)
        finally:
            shutil.rmtree(state, ignore_errors=True)
        if proc.returncode != 0:
            raise BenchError(f"`distcomp submit` exited {proc.returncode}",
                             (proc.stderr or proc.stdout)[-4000:])
        _check_queued(server, n)
        return sw.seconds


def run_file(task_file: Path, n: int) -> float:
    with redis_server() as server:
        _warm_distcomp(server)
        client = Client(server.url)
        try:
            with Stopwatch() as sw:
                result = client.submit_file(task_file)
        finally:
            client.store.close()
        if result.new != n:
            raise BenchError(f"submit_file created {result.new} tasks, expected {n}")
        _check_queued(server, n)
        return sw.seconds


def run_api(n: int) -> float:
    with redis_server() as server:
        _warm_distcomp(server)
        client = Client(server.url)
        try:
            with Stopwatch() as sw:
                specs = [TaskSpec(cmd=f"true {i}") for i in range(n)]
                result = client.submit_specs(specs, job_name="bulk")
        finally:
            client.store.close()
        if result.new != n:
            raise BenchError(f"submit_specs created {result.new} tasks, expected {n}")
        _check_queued(server, n)
        return sw.seconds


def rq_available() -> bool:
    try:
        import rq  # noqa: F401
    except ImportError:
        return False
    return True


def run_rq(n: int) -> float:
    import redis
    from rq import Queue

    with redis_server() as server:
        conn = redis.Redis(unix_socket_path=str(server.socket))
        try:
            Queue("warmup", connection=conn).enqueue_many(
                [Queue.prepare_data(noop, args=(0,))])
            queue = Queue("bench", connection=conn)
            func = f"{__name__}.noop"
            with Stopwatch() as sw:
                queue.enqueue_many([Queue.prepare_data(func, args=(i,)) for i in range(n)])
            if queue.count != n:
                raise BenchError(f"RQ queue holds {queue.count} jobs, expected {n}")
        finally:
            conn.close()
        return sw.seconds


def redis_benchmark_binary() -> str | None:
    """The redis-benchmark that ships beside the redis-server in use, else PATH's."""
    beside = Path(redis_server_binary()).with_name("redis-benchmark")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("redis-benchmark")


def run_redis_benchmark(binary: str, n: int) -> float:
    """Seconds for n LPUSHes, from the rate redis-benchmark prints."""
    with redis_server() as server:
        proc = subprocess.run([binary, "-s", str(server.socket), "-t", "lpush", "-n", str(n),
                               "-q"], capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=300)
    match = re.search(r"LPUSH:\s*([\d.]+)\s+requests per second", proc.stdout)
    if proc.returncode != 0 or not match:
        raise BenchError(f"redis-benchmark exited {proc.returncode}",
                         (proc.stdout + proc.stderr)[-2000:])
    return n / float(match.group(1))


def run(*, quick: bool = False, repeat: int = 3) -> dict[str, Any]:
    n = QUICK_TASKS if quick else DEFAULT_TASKS
    rb = redis_benchmark_binary()
    have_rq = rq_available()
    note(f"[bold]submit[/]: {n:,} tasks into an empty queue, {repeat} rounds alternating; "
         f"target {TARGET_PER_S:,} tasks/s")
    labels = {
        "cli": "distcomp submit FILE (whole command)",
        "file": "distcomp Client.submit_file (parse + submit)",
        "api": "distcomp Client.submit_specs (build specs + submit)",
        "rq": "RQ Queue.enqueue_many",
        "lpush": "redis-benchmark LPUSH (reference)",
    }
    skipped: dict[str, str] = {}
    if not have_rq:
        skipped["rq"] = not_installed(BENCH_EXTRA_INSTALL)
    if rb is None:
        skipped["lpush"] = "redis-benchmark not found beside redis-server or on PATH"
    errors: dict[str, str] = {}
    seconds: dict[str, list[float]] = {key: [] for key in labels}
    workdir = Path(tempfile.mkdtemp(prefix="dcbench-bulk-", dir="/tmp"))
    try:
        task_file = write_task_file(workdir, n)
        steps: dict[str, Callable[[], float]] = {
            "cli": lambda: run_cli(task_file, n),
            "file": lambda: run_file(task_file, n),
            "api": lambda: run_api(n),
            "rq": lambda: run_rq(n),
            "lpush": lambda: run_redis_benchmark(rb or "redis-benchmark", n),
        }
        order = [k for k in steps if k not in skipped]
        for rep in range(repeat):
            for key in rotated(order, rep):
                if key in errors:
                    continue
                try:
                    seconds[key].append(steps[key]())
                except BenchError as exc:
                    errors[key] = f"round {rep + 1}: {exc} {exc.detail[-300:]}".strip()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rates: dict[str, Summary | None] = {
        key: summarize([n / v for v in vals]) if vals else None
        for key, vals in seconds.items()}
    best = rates["file"]
    rows: list[dict[str, Any]] = []
    table: list[list[str]] = []
    for key, label in labels.items():
        rate = rates[key]
        why = skipped.get(key) or errors.get(key)
        is_peer = key in ("rq", "lpush")
        ratio = best.median / rate.median if is_peer and best and rate else None
        rows.append(result_row("submit", label.split(" (")[0] if is_peer else label,
                               "tasks/s" if key != "lpush" else "LPUSH/s",
                               rate, "tasks/s" if key != "lpush" else "ops/s",
                               ratio=ratio, ratio_of="submit_file" if ratio else None,
                               skipped=why))
        if rate is None:
            table.append([label, why or "no result", "-", "-", "-"])
        else:
            table.append([label, fmt_summary(summarize(seconds[key]), 3),
                          fmt_summary(rate, 0),
                          f"{rate.median / TARGET_PER_S:.2f}x" if not is_peer else "-",
                          f"{ratio:.2f}x" if ratio else "-"])
    print_table(f"submit: {n:,} tasks into an empty queue, {repeat} rounds",
                ["contender", "seconds", "tasks/s", "vs 50k/s target", "submit_file / this"],
                table,
                caption="median over rounds [min, max]. Timed: the call (or the whole "
                        "command for `distcomp submit`), server start-up excluded. "
                        "redis-benchmark: 50 clients, one LPUSH per round trip.")
    return {"benchmark": "submit", "config": {"tasks": n, "rounds": repeat,
                                               "target_per_s": TARGET_PER_S},
            "results": {k: summarize(v).as_dict() for k, v in seconds.items() if v},
            "rows": rows, "errors": errors, "skipped": skipped}
