"""Python tasks: no-op throughput and round-trip latency, distcomp next to RQ, Dask and Ray.

Two scenarios, each run against distcomp and its peers in the same invocation:

* **python-throughput**: N calls of :func:`noop` (default 10,000; ``quick``:
  1,000), from submission until every result is back in the client, in calls/s.
  distcomp runs ``Executor.map`` on the embedded default with a local worker of
  ``cores`` slots, twice: ``chunksize=1`` (one task per call, as the peers run
  them) and ``chunksize=100`` (100 calls per task; shown separately so that
  batching is never passed off as per-call speed). Peers: RQ (``cores``
  non-forking ``SimpleWorker`` processes), Dask (``LocalCluster`` with
  ``cores`` worker processes of one thread, ``client.map`` + ``gather``), Ray
  (``ray.init(num_cpus=cores)``, a remote ``noop``, ``ray.get``).
* **python-latency**: S sequential submit + result round trips (default 500;
  ``quick``: 100) after 20 warm-up calls; p50 and p99 in ms.

How the numbers are kept honest:

* Every run of every tool happens in a fresh child process with a fresh
  environment (its own embedded server, redis-server, cluster or Ray session),
  started before the clock and stopped after it. Workers are up and registered
  before the clock starts, and 2 x cores warm-up tasks run first, for every
  tool alike: the numbers are the steady state, not start-up. (RQ therefore
  runs its workers as long-lived ``SimpleWorker`` processes rather than in
  ``--burst`` mode: a burst worker can only start after the queue is filled, so
  its interpreter start-up would land inside the timed region.)
* Every result is compared with its input; a wrong or missing result makes the
  row an error, never a number. A tool that is not importable is reported as
  not installed and skipped.
* Runs alternate: each repetition runs every contender once, in an order that
  rotates from one repetition to the next. Rows report the median and min-max
  over repetitions.
* Every wait has a time limit, and each run's child process has one too: a
  hung tool becomes an error row, its whole process group is killed, and the
  benchmark goes on. Ctrl-C stops the child of the moment and its servers.
* :func:`noop` travels by value (``cloudpickle.register_pickle_by_value``), as
  a function defined in a user's script would: otherwise every python task
  that distcomp starts in a fresh interpreter would first import this module,
  and with it rich, psutil and redis, which no user's no-op pays. RQ sends
  functions by name only, so its workers import this module once, at start-up.
* ``ratio`` sits on a peer's row and is distcomp's value of the same metric
  divided by the peer's, as in every benchmark's rows: throughput, distcomp
  (chunksize=1) calls/s / peer calls/s, above 1 when distcomp is faster;
  latency, distcomp ms / peer ms, above 1 when distcomp is slower. distcomp's
  own rows compare themselves with the best peer in their note.

``python -m benchmarks.python_tasks [--quick] [--repeats N] [--tools LIST] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from rich.table import Table
from rich.text import Text

from .common import (
    console,
    environment,
    note,
    percentile,
    rotated,
    use_redis_server,
    write_json,
)

#: Sizes: (throughput calls, latency samples), full and quick.
CALLS, QUICK_CALLS = 10_000, 1_000
SAMPLES, QUICK_SAMPLES = 500, 100
WARMUP = 20
CHUNKSIZE = 100
#: Seconds one throughput batch may take before the run is an error. Generous on
#: purpose: distcomp with chunksize=1 and one interpreter per task needs minutes.
BATCH_TIMEOUT, QUICK_BATCH_TIMEOUT = 1200.0, 300.0
#: Seconds one latency round trip may take.
CALL_TIMEOUT = 60.0
#: Seconds a tool gets to start (cluster, workers) and to stop, on top of its waits.
SETUP_ALLOWANCE = 180.0

NOT_INSTALLED = "not installed (pip install -e '.[bench]')"
REPO_ROOT = Path(__file__).resolve().parent.parent


def noop(x: Any) -> Any:
    """The task every tool runs: returns its argument, so each result can be checked."""
    return x


class BenchError(RuntimeError):
    """A run failed, hung or returned a wrong result; its row says so instead of a number."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def _cores() -> int:
    return os.cpu_count() or 1


# =========================================================================== child side
#
# Everything below up to "parent side" runs in the child process of one run.


class Session(Protocol):
    """One tool, started and ready: runs a batch of calls or one call, with a time limit."""

    def batch(self, values: list[int], timeout: float) -> list[Any]: ...

    def call(self, value: int, timeout: float) -> Any: ...


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` (start-up only, never inside a timed region) until true or time out."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- distcomp


class DistcompSession:
    """``distcomp.Executor`` on the embedded default of a fresh state directory."""

    def __init__(self, executor: Any, chunksize: int) -> None:
        self.executor = executor
        self.chunksize = chunksize

    def batch(self, values: list[int], timeout: float) -> list[Any]:
        return list(self.executor.map(noop, values, timeout=timeout, chunksize=self.chunksize))

    def call(self, value: int, timeout: float) -> Any:
        return self.executor.submit(noop, value).result(timeout=timeout)


@contextlib.contextmanager
def distcomp_session(workdir: Path, cores: int, chunksize: int) -> Iterator[Session]:
    """``Executor(state_dir=..., workers=cores)``: the embedded server (started on
    demand, as users get it) and a local worker thread with ``cores`` slots."""
    from distcomp import Executor
    from distcomp.server import embedded_paths, stop_embedded

    state = workdir / "state"
    executor = Executor(state_dir=state, workers=cores)
    clean = False
    try:
        expected = embedded_paths(state).url
        if executor.client.url != expected:
            raise BenchError(f"distcomp connected to {executor.client.url}, not the embedded "
                             f"default {expected} (DISTCOMP_REDIS or a distcomp.toml?)")
        _wait_until(lambda: any(w.get("status") == "alive" for w in executor.client.workers()),
                    60, "distcomp's local worker to register")
        yield DistcompSession(executor, chunksize)
        clean = True
    finally:
        # After a failure, do not wait for tasks that may never finish.
        executor.shutdown(wait=clean, cancel_futures=not clean)
        with contextlib.suppress(Exception):
            stop_embedded(state)


# --------------------------------------------------------------------------- RQ

#: One RQ SimpleWorker process (argv: socket, queue). Long-lived, not --burst: see the
#: module docstring. SimpleWorker runs jobs in its own process (no fork per job).
_RQ_WORKER = """\
import sys
from redis import Redis
from rq import Queue, SimpleWorker
conn = Redis(unix_socket_path=sys.argv[1])
SimpleWorker([Queue(sys.argv[2], connection=conn)], connection=conn).work(
    burst=False, logging_level="WARNING", with_scheduler=False)
"""
_RQ_QUEUE = "bench"
#: Seconds RQ keeps a result; long enough that none expires before it is read.
_RQ_RESULT_TTL = 3600


class RQSession:
    """An RQ queue drained by ``cores`` SimpleWorker processes.

    Waiting for a result is sleep-free: ``job.latest_result(timeout=s)`` blocks in
    ``XREAD`` on the job's result stream until the worker writes it. A batch waits
    for its jobs in enqueue order (the order the workers take them)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def _result(self, job: Any, timeout: float) -> Any:
        from rq.results import Result

        # RQ's timeout is whole seconds (0 would mean "do not block").
        result = job.latest_result(timeout=max(1, math.ceil(timeout)))
        if result is None:
            raise BenchError(f"RQ job {job.id}: no result within {timeout:.0f}s")
        if result.type != Result.Type.SUCCESSFUL:
            raise BenchError(f"RQ job {job.id} did not succeed: "
                             f"{(result.exc_string or str(result.type)).strip()[-300:]}")
        return result.return_value

    def batch(self, values: list[int], timeout: float) -> list[Any]:
        from rq import Queue

        deadline = time.monotonic() + timeout
        jobs = self.queue.enqueue_many(
            [Queue.prepare_data(noop, (v,), result_ttl=_RQ_RESULT_TTL) for v in values])
        out: list[Any] = []
        for job in jobs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"RQ: {len(out)} of {len(values)} results within "
                                 f"{timeout:.0f}s")
            out.append(self._result(job, remaining))
        return out

    def call(self, value: int, timeout: float) -> Any:
        job = self.queue.enqueue(noop, value, result_ttl=_RQ_RESULT_TTL)
        return self._result(job, timeout)


@contextlib.contextmanager
def rq_session(workdir: Path, cores: int) -> Iterator[Session]:
    """A private redis-server on a unix socket and ``cores`` SimpleWorker processes."""
    import redis
    import rq

    from .common import redis_server

    with redis_server() as server:
        # No socket timeout: result waits block in XREAD for up to their own timeout.
        conn = redis.Redis(unix_socket_path=str(server.socket), socket_connect_timeout=10)
        queue = rq.Queue(_RQ_QUEUE, connection=conn)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        procs = [subprocess.Popen([sys.executable, "-c", _RQ_WORKER, str(server.socket),
                                   _RQ_QUEUE], env=env, cwd=workdir, stdin=subprocess.DEVNULL)
                 for _ in range(cores)]
        try:
            def ready() -> bool:
                dead = [p.returncode for p in procs if p.poll() is not None]
                if dead:
                    raise BenchError(f"an RQ worker exited at start-up (status {dead[0]})")
                return bool(rq.Worker.count(connection=conn, queue=queue) >= cores)

            _wait_until(ready, 60, f"{cores} RQ workers to register")
            yield RQSession(queue)
        finally:
            for proc in procs:  # SIGTERM: RQ's warm shutdown
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            conn.close()


# --------------------------------------------------------------------------- Dask


class DaskSession:
    """A ``distributed.Client`` on a LocalCluster. ``pure=False``: every call is a new
    task, as in the other tools (Dask would otherwise reuse results of equal calls)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def batch(self, values: list[int], timeout: float) -> list[Any]:
        from distributed import wait

        futures = self.client.map(noop, values, pure=False)
        _, not_done = wait(futures, timeout=timeout)
        if not_done:
            raise BenchError(f"Dask: {len(not_done)} of {len(values)} calls unfinished "
                             f"after {timeout:.0f}s")
        return list(self.client.gather(futures))

    def call(self, value: int, timeout: float) -> Any:
        return self.client.submit(noop, value, pure=False).result(timeout=timeout)


@contextlib.contextmanager
def dask_session(workdir: Path, cores: int) -> Iterator[Session]:
    """``LocalCluster(n_workers=cores, threads_per_worker=1, processes=True)``, no
    dashboard, logs at ERROR only, spill files under the run's directory."""
    import dask
    from distributed import Client, LocalCluster

    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.ERROR)
    dask.config.set({"distributed.worker.daemon": True,
                     "distributed.admin.system-monitor.gil.enabled": False})
    cluster = LocalCluster(n_workers=cores, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR,
                           local_directory=str(workdir / "dask"))
    try:
        client = Client(cluster, timeout=60)
        try:
            client.wait_for_workers(cores, timeout=60)
            yield DaskSession(client)
        finally:
            client.close(timeout=10)
    finally:
        cluster.close(timeout=10)


# --------------------------------------------------------------------------- Ray


class RaySession:
    """``ray.remote(noop)`` on a local Ray started with ``num_cpus=cores``."""

    def __init__(self, remote: Any) -> None:
        self.remote = remote

    def batch(self, values: list[int], timeout: float) -> list[Any]:
        import ray

        try:
            return list(ray.get([self.remote.remote(v) for v in values], timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            raise BenchError(f"Ray: results not all back after {timeout:.0f}s") from None

    def call(self, value: int, timeout: float) -> Any:
        import ray

        try:
            return ray.get(self.remote.remote(value), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise BenchError(f"Ray: no result within {timeout:.0f}s") from None


@contextlib.contextmanager
def ray_session(workdir: Path, cores: int) -> Iterator[Session]:
    """``ray.init(num_cpus=cores)`` with its session files under the run's directory,
    no dashboard, worker output not forwarded, a small object store (results are ints)."""
    import ray

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, _temp_dir=str(workdir / "ray"),
             object_store_memory=256 * 1024 * 1024)
    try:
        yield RaySession(ray.remote(num_cpus=1)(noop))
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- one run


def _session(spec: dict[str, Any], workdir: Path) -> contextlib.AbstractContextManager[Session]:
    tool, cores = spec["tool"], spec["cores"]
    if tool == "distcomp":
        return distcomp_session(workdir, cores, spec["chunksize"])
    if tool == "rq":
        return rq_session(workdir, cores)
    if tool == "dask":
        return dask_session(workdir, cores)
    if tool == "ray":
        return ray_session(workdir, cores)
    raise ValueError(f"unknown tool {tool!r}")


def _check(values: Sequence[int], results: Sequence[Any], what: str) -> None:
    """Every result must equal its input, in order."""
    if len(results) != len(values):
        raise BenchError(f"{what}: {len(results)} results for {len(values)} calls")
    for value, result in zip(values, results, strict=True):
        if result != value:
            raise BenchError(f"{what}: wrong result {result!r} for input {value!r}")


def _measure(spec: dict[str, Any], session: Session) -> dict[str, Any]:
    """The timed part of one run, after the tool is up."""
    cores = spec["cores"]
    if spec["scenario"] == "throughput":
        calls = spec["calls"]
        # Warm-up: negative inputs, so no result can be mistaken for a measured one.
        warm = [-1 - i for i in range(2 * cores * max(1, spec.get("chunksize", 1)))]
        _check(warm, session.batch(warm, spec["timeout"]), "warm-up")
        values = list(range(calls))
        start = time.perf_counter()
        results = session.batch(values, spec["timeout"])
        seconds = time.perf_counter() - start
        _check(values, results, "throughput")
        return {"seconds": seconds, "calls": calls}
    for i in range(spec["warmup"]):
        value = -1 - i
        _check([value], [session.call(value, CALL_TIMEOUT)], "warm-up")
    samples: list[float] = []
    for value in range(spec["samples"]):
        start = time.perf_counter()
        result = session.call(value, CALL_TIMEOUT)
        samples.append((time.perf_counter() - start) * 1000)
        _check([value], [result], "latency")
    return {"samples_ms": samples}


def _child_main(argv: Sequence[str]) -> int:
    """Entry point of one run's child process: ``argv[0]`` is the run's spec as JSON.

    Writes ``{"ok": true, ...measurement}`` or ``{"ok": false, "error": ...}`` to the
    spec's ``out`` file (stdout and stderr go to a log the parent shows on error)."""
    import cloudpickle

    spec = json.loads(argv[0])

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: stop the tool's servers

    signal.signal(signal.SIGTERM, on_term)
    logging.basicConfig(level=logging.ERROR)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with _session(spec, Path(spec["workdir"])) as session:
            outcome: dict[str, Any] = {"ok": True, **_measure(spec, session)}
    except Exception as exc:
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}" if not isinstance(
            exc, BenchError) else str(exc), "traceback": traceback.format_exc()}
    Path(spec["out"]).write_text(json.dumps(outcome))
    return 0 if outcome["ok"] else 1


# =========================================================================== parent side


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the run's process group (its cleanup runs), SIGKILL what is left after 10s."""
    pgid = proc.pid  # the child leads its own session and group
    if proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    _signal_group(pgid, signal.SIGKILL)  # stragglers: workers, nannies, servers
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)


def _stop_embedded(state: Path) -> None:
    """The embedded redis-server daemonizes out of the run's process group: stop it by
    its socket, else by its pidfile (a child killed mid-run never stopped it)."""
    from distcomp.server import embedded_paths, embedded_running, stop_embedded

    if not state.exists():
        return
    with contextlib.suppress(Exception):
        stop_embedded(state)
    if not embedded_running(state):
        return
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(embedded_paths(state).pidfile.read_text().strip()), signal.SIGKILL)


def run_child(spec: dict[str, Any], limit: float) -> dict[str, Any]:
    """Run one measurement in a fresh child process (its own session, so its whole
    process group can be stopped); return its outcome or raise BenchError."""
    import shutil

    workdir = Path(tempfile.mkdtemp(prefix="dcpy-", dir="/tmp"))  # short socket paths
    out, log_path = workdir / "result.json", workdir / "child.log"
    spec = {**spec, "workdir": str(workdir), "out": str(out)}
    env = dict(os.environ)
    for name in ("DISTCOMP_REDIS", "DISTCOMP_QUEUE", "DISTCOMP_STATE_DIR"):
        env.pop(name, None)  # distcomp: always the embedded default of this run
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONWARNINGS"] = "ignore"
    code = ("import sys; from benchmarks.python_tasks import _child_main; "
            "sys.exit(_child_main(sys.argv[1:]))")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=workdir,
                                    env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise BenchError(f"no result within {limit:.0f}s: stopped",
                             _tail(log_path)) from None
        if not out.exists():
            raise BenchError(f"run exited with status {proc.returncode} and no result",
                             _tail(log_path))
        outcome: dict[str, Any] = json.loads(out.read_text())
        if not outcome.get("ok"):
            raise BenchError(str(outcome.get("error")),
                             outcome.get("traceback", "") + "\n" + _tail(log_path, 10))
        return outcome
    finally:
        if proc is not None:
            _stop_group(proc)
        _stop_embedded(workdir / "state")
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One tool in one scenario, with its per-repetition measurements."""

    scenario: str  # "throughput" | "latency"
    tool: str  # distcomp | rq | dask | ray
    label: str
    #: For notes: "RQ", "Dask", "Ray".
    short: str = ""
    chunksize: int = 1
    skipped: str | None = None
    error: str | None = None
    detail: str = ""
    #: throughput: calls/s per repetition; latency: (p50, p99) ms per repetition.
    values: list[tuple[float, ...]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.skipped is None and self.error is None


def _import_problem(module: str) -> str | None:
    """None if ``module`` imports in a fresh interpreter, else why not (a last line).
    A fresh interpreter: a peer that is present but broken must not break this one."""
    try:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                              text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"`import {module}` took over 120s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"`import {module}` exited {proc.returncode}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


PEERS = {"rq": "rq", "dask": "distributed", "ray": "ray"}  # tool -> module to import


def _contenders(cores: int, tools: Sequence[str]) -> list[Contender]:
    labels = {
        "rq": f"RQ, {cores} SimpleWorker processes",
        "dask": f"Dask LocalCluster, {cores} processes x 1 thread",
        "ray": f"Ray, num_cpus={cores}",
    }
    out: list[Contender] = []
    for scenario in ("throughput", "latency"):
        if "distcomp" in tools:
            out.append(Contender(scenario, "distcomp", "distcomp Executor.map, chunksize=1"
                                 if scenario == "throughput" else "distcomp Executor.submit"))
            if scenario == "throughput":
                out.append(Contender(scenario, "distcomp",
                                     f"distcomp Executor.map, chunksize={CHUNKSIZE}",
                                     chunksize=CHUNKSIZE))
        out += [Contender(scenario, tool, labels[tool], short=tool.upper() if tool == "rq"
                          else tool.capitalize()) for tool in PEERS if tool in tools]
    return out


# --------------------------------------------------------------------------- driver


def run(quick: bool = False, repeats: int = 3, *, repeat: int | None = None,
        tools: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both scenarios for distcomp and every importable peer; return the rows.

    ``quick``: 1,000 calls and 100 latency samples (a correctness smoke run; the
    numbers mean little; the command line then defaults to 1 repetition).
    ``repeats`` is taken as given; ``repeat`` is another name for it (the spelling of
    the older benchmarks' ``run``). ``tools`` limits the run to some of ``distcomp``,
    ``rq``, ``dask``, ``ray``.
    """
    rounds = repeat if repeat is not None else repeats
    if rounds < 1:
        raise ValueError("repeats must be at least 1")
    chosen = list(tools) if tools else ["distcomp", *PEERS]
    unknown = set(chosen) - {"distcomp", *PEERS}
    if unknown:
        raise ValueError(f"unknown tools: {', '.join(sorted(unknown))}")
    cores = _cores()
    calls = QUICK_CALLS if quick else CALLS
    samples = QUICK_SAMPLES if quick else SAMPLES
    batch_timeout = QUICK_BATCH_TIMEOUT if quick else BATCH_TIMEOUT
    contenders = _contenders(cores, chosen)
    problems = {tool: _import_problem(module) for tool, module in PEERS.items()
                if tool in chosen}
    for contender in contenders:
        problem = problems.get(contender.tool)
        if problem is not None:
            contender.skipped = NOT_INSTALLED
            contender.detail = problem
    note(f"[bold]python tasks[/]: {calls:,} no-op calls (throughput), {samples} sequential "
         f"round trips after {WARMUP} warm-up (latency), {cores} cores, {rounds} "
         f"repetition(s), order rotating; each run in a fresh child process")
    for rep in range(rounds):
        for scenario in ("throughput", "latency"):
            group = [c for c in contenders if c.scenario == scenario]
            for contender in rotated(group, rep):
                if not contender.active:
                    continue
                spec: dict[str, Any] = {
                    "tool": contender.tool, "scenario": scenario, "cores": cores,
                    "chunksize": contender.chunksize, "calls": calls, "samples": samples,
                    "warmup": WARMUP, "timeout": batch_timeout}
                limit = SETUP_ALLOWANCE + (batch_timeout * 1.1 if scenario == "throughput"
                                           else CALL_TIMEOUT * (samples + WARMUP))
                if scenario == "latency":
                    # A round trip rarely nears CALL_TIMEOUT; bound the run as a whole too.
                    limit = min(limit, SETUP_ALLOWANCE + batch_timeout)
                console.print(f"  round {rep + 1}/{rounds} {scenario}: {contender.label} ...",
                              end="", highlight=False)
                started = time.perf_counter()
                try:
                    outcome = run_child(spec, limit)
                except BenchError as exc:
                    contender.error = f"round {rep + 1}: {exc}"
                    contender.detail = exc.detail
                    console.print(" [red]error[/]", highlight=False)
                    continue
                if scenario == "throughput":
                    contender.values.append((outcome["calls"] / outcome["seconds"],))
                else:
                    ms = outcome["samples_ms"]
                    contender.values.append((percentile(ms, 50), percentile(ms, 99)))
                console.print(f" {time.perf_counter() - started:.1f}s", highlight=False)
    return _result(contenders, cores, calls, samples, rounds, quick)


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _median(c: Contender | None, index: int = 0) -> float | None:
    """The median over repetitions of a contender's ``index``-th value; None without one."""
    if c is None or not c.active or not c.values:
        return None
    return statistics.median(v[index] for v in c.values)


def _result(contenders: list[Contender], cores: int, calls: int, samples: int, rounds: int,
            quick: bool) -> dict[str, Any]:
    """Rows and the machine. ``ratio`` sits on a peer's row and is distcomp's value of the
    same metric divided by this peer's (the convention of every benchmark's rows): above
    1 is better for distcomp on calls/s, worse on ms. distcomp's own rows say, in their
    note, how they compare with the best peer."""
    rows: list[dict[str, Any]] = []
    # ---- throughput
    thr = [c for c in contenders if c.scenario == "throughput"]
    d_one = next((c for c in thr if c.tool == "distcomp" and c.chunksize == 1), None)
    d_chunk = next((c for c in thr if c.tool == "distcomp" and c.chunksize > 1), None)
    ran = [(c, m) for c in thr if c.tool != "distcomp" and (m := _median(c)) is not None]
    best = max(ran, key=lambda cm: cm[1], default=None)
    one, chunk = _median(d_one), _median(d_chunk)
    for c in thr:
        m = _median(c)
        ratio: float | None = None
        ratio_of = None
        if c.tool == "distcomp":
            what = ("one task per call" if c.chunksize == 1 else
                    f"batched: {math.ceil(calls / c.chunksize):,} tasks of {c.chunksize} calls")
            if m is not None and best is not None:
                what += f"; {m / best[1]:.2f}x the best peer ({best[0].short})"
        else:
            what = "one task per call"
            if m is not None and one is not None:
                ratio, ratio_of = one / m, "distcomp chunksize=1"
                if chunk is not None:
                    what += f"; distcomp chunksize={CHUNKSIZE} / this: {chunk / m:.2f}x"
        rows.append(_row("python-throughput", c, "throughput", 0, "calls/s", ratio,
                         ratio_of, what))
    # ---- latency: one row per percentile
    lat = [c for c in contenders if c.scenario == "latency"]
    d_lat = next((c for c in lat if c.tool == "distcomp"), None)
    for index, metric in ((0, "p50 round trip"), (1, "p99 round trip")):
        ran = [(c, m) for c in lat if c.tool != "distcomp"
               and (m := _median(c, index)) is not None]
        fastest = min(ran, key=lambda cm: cm[1], default=None)
        mine = _median(d_lat, index)
        for c in lat:
            m = _median(c, index)
            ratio, ratio_of = None, None
            what = "submit + result, one at a time"
            if c.tool == "distcomp":
                if m is not None and fastest is not None:
                    what += f"; {m / fastest[1]:.2f}x the fastest peer's ({fastest[0].short})"
            elif m is not None and mine is not None:
                ratio, ratio_of = mine / m, "distcomp"
            rows.append(_row("python-latency", c, metric, index, "ms", ratio, ratio_of, what))
    machine = environment()
    machine["cores"] = cores
    machine["distcomp_path"] = str(Path(sys.modules["distcomp"].__file__ or "?").parent)
    machine["peers"] = {name: _version(name) for name in ("rq", "dask", "distributed", "ray")}
    return {"benchmark": "python_tasks", "rows": rows, "machine": machine,
            "config": {"calls": calls, "latency_samples": samples, "warmup": WARMUP,
                       "chunksize": CHUNKSIZE, "cores": cores, "repeats": rounds,
                       "quick": quick},
            "errors": {f"{r['scenario']}: {r['tool']}": r["note"] for r in rows
                       if r["status"] == "error"}}


def _row(scenario: str, c: Contender, metric: str, index: int, unit: str,
         ratio: float | None, ratio_of: str | None, what: str) -> dict[str, Any]:
    """One row; a skipped or failed contender has no number (``median`` None), and its
    reason in ``note`` and ``skipped``."""
    row: dict[str, Any] = {"scenario": scenario, "tool": c.label, "metric": metric,
                           "median": None, "min": None, "max": None, "unit": unit,
                           "ratio": ratio, "note": what, "status": "ok", "values": []}
    if ratio_of:
        row["ratio_of"] = ratio_of
    if c.skipped:
        row.update(status="skipped", note=c.skipped, skipped=c.skipped, ratio=None,
                   detail=c.detail)
    elif c.error:
        row.update(status="error", note=f"error: {c.error}", skipped=f"error: {c.error}",
                   ratio=None, detail=c.detail)
    elif c.values:
        values = [v[index] for v in c.values]
        row["median"], row["min"], row["max"] = _stats(values)
        row["values"], row["n"] = values, len(values)
    return row


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if unit == "calls/s" and value >= 100 else f"{value:,.2f}"


def print_table(result: dict[str, Any]) -> None:
    """The rows as a rich table, then the output of any failed run."""
    config = result.get("config", {})
    table = Table(title=Text(
        f"python tasks on {config.get('cores', '?')} cores, {config.get('repeats', '?')} "
        f"repetition(s): throughput of {config.get('calls', 0):,} no-op calls; latency of "
        f"{config.get('latency_samples', 0)} sequential round trips after "
        f"{config.get('warmup', 0)} warm-up calls", style="bold"),
                  caption=Text(
                      "median and min - max over repetitions (latency: of each repetition's "
                      "percentile). ratio, on a peer's row: distcomp's value / this row's "
                      "(throughput: > 1 = distcomp faster; latency: > 1 = distcomp slower)."),
                  caption_justify="left")
    for name in ("scenario", "tool", "metric"):
        table.add_column(name, overflow="fold")
    for name in ("median", "min - max", "unit", "ratio"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("note", overflow="fold", ratio=1)
    for r in result["rows"]:
        spread = "-"
        if r["median"] is not None and len(r.get("values", [])) > 1:
            spread = f"{_fmt(r['min'], r['unit'])} - {_fmt(r['max'], r['unit'])}"
        table.add_row(*(Text(cell) for cell in (
            r["scenario"], r["tool"], r["metric"], _fmt(r["median"], r["unit"]), spread,
            r["unit"], "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            r["note"] if r["status"] == "ok" else r["note"][:300])))
    console.print(table)
    shown: set[tuple[str, str]] = set()  # a latency failure fills two rows: show it once
    for r in result["rows"]:
        key = (r["scenario"] if r["status"] == "error" else "", r["tool"])
        if r["status"] == "ok" or not r.get("detail") or key in shown:
            continue
        shown.add(key)
        if r["status"] == "error":
            note(f"[red]{r['tool']} ({r['scenario']}) failed[/]; its output ends:")
            lines = r["detail"].strip().splitlines()[-15:]
            console.print(Text("\n".join("    " + line for line in lines)))
        else:
            console.print(Text(f"{r['tool']}: {r['note']}: {r['detail']}", style="dim"))


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.python_tasks [--quick] [--repeats N] [--json PATH]``;
    exit status 1 if a run failed or returned a wrong result."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.python_tasks",
        description="Python-task throughput and round-trip latency: distcomp next to RQ, "
                    "Dask and Ray, in one invocation on this machine.")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 1 repetition, {QUICK_CALLS:,} calls, "
                             f"{QUICK_SAMPLES} latency samples")
    parser.add_argument("--repeats", "--repeat", type=int, default=None, metavar="N",
                        help="repetitions per measurement (default 3; with --quick 1)")
    parser.add_argument("--tools", metavar="LIST",
                        help="comma-separated subset of distcomp,rq,dask,ray (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    parser.add_argument("--redis-server", metavar="BINARY",
                        help="redis-server binary for distcomp's embedded server and RQ's")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.redis_server:
        use_redis_server(args.redis_server)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()] if args.tools else None

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # the running child and its servers are stopped on the way out

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result = run(quick=args.quick, repeats=args.repeats, tools=tools)
    except KeyboardInterrupt:
        note("\n[red]interrupted[/]: the run in progress and its servers were stopped")
        return 130
    except ValueError as exc:
        parser.error(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_table(result)
    if args.json:
        write_json(args.json, result)
        note(f"results written to {args.json}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    # Run the module under its importable name, so that noop is
    # benchmarks.python_tasks.noop everywhere (RQ sends functions by name).
    from benchmarks.python_tasks import main as _main

    sys.exit(_main())
