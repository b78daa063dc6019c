"""distcomp.Executor against the concurrent.futures contract, on a real redis-server.

Modelled on CPython's Lib/test/test_concurrent_futures (map ordering, exceptions,
timeouts, cancel, shutdown semantics, as_completed, wait). Every call runs as a
real python task under a real worker (the Executor's local worker, a child process).
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import RedisProcess, wait_for

from distcomp import Client, Executor
from distcomp.executor import RemoteError, RemoteTraceback, TaskFuture
from distcomp.server import stop_embedded

# Test functions travel by value, so task interpreters need not import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def mul(x: int, y: int) -> int:
    return x * y


def square(x: int) -> int:
    return x * x


def capture(*args: object, **kwargs: object) -> tuple[object, object]:
    return args, kwargs


def sleep_then(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


def raise_value_error(message: str) -> None:
    raise ValueError(message)


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise UnpicklableError()


@pytest.fixture
def client(redis_server: RedisProcess, queue_name: str, tmp_path: Path) -> Iterator[Client]:
    c = Client(redis_server.url, queue_name, state_dir=tmp_path / "state")
    yield c
    c.close()


@pytest.fixture
def executor(client: Client) -> Iterator[Executor]:
    ex = Executor(client, workers=2)
    yield ex
    ex.shutdown(wait=False, cancel_futures=True)
    for fut in list(ex._futures):  # stop anything a failed test left running
        if isinstance(fut, TaskFuture) and not fut.done():
            client.cancel([fut.task_id])
    ex.shutdown(wait=True)


@pytest.fixture
def idle_executor(client: Client) -> Iterator[Executor]:
    """No worker at all: everything submitted stays queued."""
    ex = Executor(client, workers=0)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def test_is_a_concurrent_futures_executor(executor: Executor) -> None:
    assert isinstance(executor, cf.Executor)
    fut = executor.submit(mul, 2, 8)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=30) == 16


def test_submit_keyword_arguments(executor: Executor) -> None:
    fut = executor.submit(capture, 1, 2, a=3, fn=4)
    assert fut.result(timeout=30) == ((1, 2), {"a": 3, "fn": 4})


def test_map_keeps_order(executor: Executor) -> None:
    assert list(executor.map(mul, range(10), range(10))) == [i * i for i in range(10)]


def test_map_with_chunksize(executor: Executor) -> None:
    assert list(executor.map(square, range(50), chunksize=7)) == [i * i for i in range(50)]
    with pytest.raises(ValueError):
        executor.map(square, range(3), chunksize=0)


def test_map_exception_comes_in_order(executor: Executor) -> None:
    results = executor.map(divmod, [1, 1, 1, 1], [2, 2, 0, 2])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout(executor: Executor) -> None:
    results: list[object] = []
    with pytest.raises(cf.TimeoutError):
        for value in executor.map(sleep_then, [0, 0, 4], timeout=2):
            results.append(value)
    assert results == [None, None]


def test_exception_keeps_type_and_remote_traceback(executor: Executor) -> None:
    fut = executor.submit(raise_value_error, "bad input 42")
    exc = fut.exception(timeout=30)
    assert type(exc) is ValueError and str(exc) == "bad input 42"
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_value_error" in exc.__cause__.tb
    row = executor.client.task(fut.task_id)
    assert row.state == "failed" and row.reason == "raised ValueError: bad input 42"


def test_unpicklable_exception_becomes_remote_error(executor: Executor) -> None:
    exc = executor.submit(raise_unpicklable).exception(timeout=30)
    assert isinstance(exc, RemoteError)
    assert "UnpicklableError: cannot travel" in str(exc)
    assert isinstance(exc.__cause__, RemoteTraceback)


def test_segfault_fails_the_task_not_the_worker(executor: Executor) -> None:
    import ctypes

    fut = executor.submit(ctypes.string_at, 0)
    exc = fut.exception(timeout=30)
    assert isinstance(exc, RemoteError) and "SIGSEGV" in str(exc)
    assert executor.submit(mul, 3, 3).result(timeout=30) == 9  # the worker lives on


def test_cancel_queued_future(idle_executor: Executor) -> None:
    fut = idle_executor.submit(mul, 1, 1)
    assert fut.cancel()
    assert fut.cancelled() and fut.done()
    with pytest.raises(cf.CancelledError):
        fut.result(timeout=1)
    assert idle_executor.client.task(fut.task_id).state == "cancelled"
    done, not_done = cf.wait([fut], timeout=1)
    assert done == {fut} and not not_done


def test_running_future_cannot_be_cancelled(executor: Executor) -> None:
    fut = executor.submit(sleep_then, 1.0, "slept")
    wait_for(fut.running, timeout=30)
    assert not fut.cancel()
    assert fut.result(timeout=30) == "slept"


def test_shutdown_refuses_new_work(executor: Executor) -> None:
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        executor.submit(mul, 1, 2)
    with pytest.raises(RuntimeError):
        executor.map(mul, [1], [2])


def test_context_manager_waits_for_futures(client: Client) -> None:
    with Executor(client, workers=2) as ex:
        futures = [ex.submit(sleep_then, 0.2, i) for i in range(3)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2]


def test_shutdown_cancel_futures(idle_executor: Executor) -> None:
    futures = [idle_executor.submit(mul, i, i) for i in range(5)]
    idle_executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    counts = idle_executor.client.counts()
    assert counts["cancelled"] == 5 and counts["queued"] == 0


def test_as_completed(executor: Executor) -> None:
    slow = executor.submit(sleep_then, 0.8, "slow")
    fast = [executor.submit(mul, i, 2) for i in range(3)]
    order = list(cf.as_completed([slow, *fast], timeout=30))
    assert set(order) == {slow, *fast}
    assert order[-1] is slow


def test_as_completed_timeout(idle_executor: Executor) -> None:
    fut = idle_executor.submit(mul, 1, 1)
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([fut], timeout=0.5))


def test_wait_first_exception(executor: Executor, client: Client) -> None:
    slow = executor.submit(sleep_then, 60)
    bad = executor.submit(raise_value_error, "first")
    ok = executor.submit(mul, 2, 2)
    done, not_done = cf.wait([slow, bad, ok], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert bad in done and slow in not_done
    client.cancel([slow.task_id])  # a running task: killed, its future gets CancelledError
    assert isinstance(slow.exception(timeout=30), cf.CancelledError)


def test_wait_first_completed_and_all(executor: Executor) -> None:
    slow = executor.submit(sleep_then, 1.0)
    fast = executor.submit(mul, 1, 1)
    done, not_done = cf.wait([slow, fast], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert fast in done and slow in not_done
    done, not_done = cf.wait([slow, fast], timeout=30)
    assert done == {slow, fast} and not not_done


def test_client_submit_map_gather_and_job_handle(client: Client) -> None:
    worker = client.local_worker(2)
    try:
        fut = client.submit(mul, 6, 7, mem="64M", cpus=1)
        assert fut.result(timeout=30) == 42
        assert client.task(fut.task_id).cmd.startswith("python: ")
        futures = client.map(square, range(6))
        assert client.gather(futures, timeout=30) == [i * i for i in range(6)]
        job = client.job_handle(futures[0].job_id)
        assert job.results(timeout=30) == [i * i for i in range(6)]
        progress = job.progress()
        assert progress["total"] == 6 and progress["succeeded"] == 6
        # Two identical calls are two tasks: API submissions are never deduplicated.
        twice = [client.submit(mul, 1, 1), client.submit(mul, 1, 1)]
        assert twice[0].task_id != twice[1].task_id
        assert client.gather(twice, timeout=30) == [1, 1]
        # Single calls of one client share one job, instead of a job each.
        assert fut.job_id == twice[0].job_id == twice[1].job_id != futures[0].job_id
    finally:
        worker.stop()


def noop(x: int) -> int:
    return x


@pytest.mark.slow
def test_ten_thousand_calls_on_the_embedded_default(tmp_path: Path) -> None:
    """The Python-tasks acceptance run: 10,000 no-op calls through Executor.map on the
    embedded default server (started here in a private state directory) with its
    local worker; every result in order, each call one task."""
    try:
        with Executor(state_dir=tmp_path / "state") as ex:
            assert ex.client.url.startswith("unix://")
            results = list(ex.map(noop, range(10_000), timeout=600))
            assert results == list(range(10_000))
            job = ex.client.jobs()[-1]
            assert job.n_tasks == 10_000 and job.counts["succeeded"] == 10_000
    finally:
        stop_embedded(tmp_path / "state")


def test_futures_of_someone_elses_tasks_resolve(client: Client, redis_server: RedisProcess,
                                               queue_name: str, tmp_path: Path) -> None:
    """Outcomes of a client's own tasks come on its own notification stream; another
    client's futures for the same job (``job_handle(...).futures()``) hear them from
    the queue's event stream."""
    futures = client.map(sleep_then, [0.3, 0.3], ["a", "b"])
    other = Client(redis_server.url, queue_name, state_dir=tmp_path / "other")
    try:
        theirs = other.job_handle(futures[0].job_id).futures()
        assert not any(f.done() for f in theirs)
        worker = client.local_worker(2)
        try:
            assert client.gather(futures, timeout=30) == ["a", "b"]
            assert other.gather(theirs, timeout=30) == ["a", "b"]
        finally:
            worker.stop()
        notices = client.store.redis.xrange(
            client.store.notify_key(client._python().client_id))
        assert {fields["task"] for _, fields in notices} == {f.task_id for f in futures}
        assert not client.store.redis.exists(
            other.store.notify_key(other._python().client_id))  # it submitted nothing
    finally:
        other.close()
    client._python().close()
    assert not client.store.redis.exists(client.store.notify_key(client._python().client_id))


_ORPHAN = """
import os, sys, time
sys.path[:0] = {paths!r}
from distcomp import Client
client = Client({url!r}, {queue!r}, state_dir={state!r})
worker = client.local_worker(1)
fut = client.submit(time.sleep, 60)
while client.task(fut.task_id).state != "running":
    time.sleep(0.05)
print(worker.pid, fut.task_id, flush=True)
os._exit(0)  # no stop(), no cleanup: the client just dies
"""


def test_local_worker_stops_when_its_client_dies(redis_server: RedisProcess, queue_name: str,
                                                tmp_path: Path, client: Client) -> None:
    """The local worker is a child process; when its client dies without stopping it,
    it stops too (its lifeline pipe ends) and requeues what it was running."""
    import subprocess

    import psutil

    script = _ORPHAN.format(paths=sys.path, url=redis_server.url, queue=queue_name,
                            state=str(tmp_path / "state"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    pid, task_id = int(out[0]), out[1]
    wait_for(lambda: not psutil.pid_exists(pid) or
             psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=30)
    task = client.task(task_id)
    assert task.state == "queued" and "stopped" in (task.reason or "")


def test_local_worker_that_cannot_start_says_so(client: Client) -> None:
    """A local worker that fails at start (here: its name is taken) raises at once
    instead of leaving futures waiting for a worker that is not there."""
    from distcomp.local import LocalWorkerError

    first = client.local_worker(1, name="only-one")
    try:
        with pytest.raises(LocalWorkerError, match="did not start"):
            client.local_worker(1, name="only-one")
    finally:
        first.stop()


def test_local_worker_tasks_see_the_callers_pythonpath_only(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local worker imports distcomp through the client's sys.path, but its tasks
    get the environment's PYTHONPATH, not that list."""
    from distcomp.spec import TaskSpec

    monkeypatch.setenv("PYTHONPATH", "/nonexistent/marker")
    worker = client.local_worker(1)
    try:
        tid = client.store.submit([TaskSpec(cmd='echo "PP=$PYTHONPATH"')],
                                  job_name="env").task_ids[0]
        wait_for(lambda: client.task(tid).state == "succeeded")
        assert (client.store.task_fields([tid], ["out_tail"])[0][0] or "").strip() == \
            "PP=/nonexistent/marker"
    finally:
        worker.stop()
