"""Warm interpreters for python tasks (``distcomp.pool``), on a real redis-server with
real workers: reuse, isolation between calls, and every way a call can end badly
(raise, segfault, leak past the memory guard, time out, return 200 MB) — each ends
with the right outcome and the worker runs on."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import RedisProcess, WorkerThread, wait_for

from distcomp import Client
from distcomp.executor import RemoteError
from distcomp.pool import eligible
from distcomp.spec import MIB, TaskSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])

StartWorker = Callable[..., WorkerThread]


def whoami(tag: object = None) -> tuple[int, str, str, str]:
    """The interpreter's pid and what this call sees of its task."""
    print(f"out of {tag}")
    print(f"err of {tag}", file=sys.stderr)
    return (os.getpid(), os.environ.get("DISTCOMP_TASK_ID", ""),
            os.environ.get("ONLY_FOR_ONE", ""), os.getcwd())


def keep_memory(mib: int) -> int:
    """Leaves ``mib`` MiB behind in the interpreter (a leak that outlives the call:
    this function travels by value, so its own globals would not)."""
    hoard = sys.__dict__.setdefault("_test_hoard", [])
    hoard.append(b"x" * (mib * MIB))
    return os.getpid()


def leak_forever(step_mib: int, cap_mib: int) -> None:
    """Grows until stopped (capped, so a broken guard cannot hurt the machine)."""
    hoard = []
    while len(hoard) * step_mib < cap_mib:
        hoard.append(b"x" * (step_mib * MIB))
        time.sleep(0.05)
    time.sleep(60)


def crash() -> None:
    import ctypes

    ctypes.string_at(0)


def raise_key_error() -> None:
    raise KeyError("missing")


def big_result(mib: int) -> bytes:
    return b"y" * (mib * MIB)


@pytest.fixture
def client(redis_server: RedisProcess, queue_name: str, tmp_path: Path) -> Iterator[Client]:
    c = Client(redis_server.url, queue_name, state_dir=tmp_path / "state")
    yield c
    c.close()


def test_what_runs_warm() -> None:
    py = TaskSpec(cmd="f", kind="python", func="m:f")
    assert eligible(py, gpus=0, pinned=False, cgroup=False)
    assert not eligible(TaskSpec(cmd="true"), gpus=0, pinned=False, cgroup=False)
    assert not eligible(py, gpus=1, pinned=False, cgroup=False)  # CUDA reads env once
    assert not eligible(py, gpus=0, pinned=True, cgroup=False)
    assert not eligible(py, gpus=0, pinned=False, cgroup=True)
    startup_env = TaskSpec(cmd="f", kind="python", func="m:f", env=(("PYTHONHASHSEED", "0"),))
    assert not eligible(startup_env, gpus=0, pinned=False, cgroup=False)


def test_calls_reuse_one_interpreter_each_with_its_own_task(
        client: Client, start_worker: StartWorker, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = client.submit(whoami, "a", env={"ONLY_FOR_ONE": "yes"}, cwd=str(elsewhere))
    rest = [client.submit(whoami, tag) for tag in "bcd"]
    w = start_worker(cpus=1, max_tasks=4, allow_pickle=True)
    results = [f.result(timeout=60) for f in [first, *rest]]
    w.join()
    pids = {r[0] for r in results}
    assert len(pids) == 1 and os.getpid() not in pids
    assert [r[1] for r in results] == [f.task_id for f in [first, *rest]]
    # the first call's environment and working directory did not leak into the next
    assert results[0][2:] == ("yes", str(elsewhere))
    assert results[1][2] == "" and results[1][3] != str(elsewhere)
    # each call's output went to its own logs
    for fut, tag in zip([first, *rest], "abcd", strict=True):
        raw = client.task_raw(fut.task_id)
        assert raw["out_tail"] == f"out of {tag}\n" and raw["err_tail"] == f"err of {tag}\n"
    assert w.worker.pool.started == 1


def test_pool_off_runs_a_fresh_interpreter_per_call(client: Client,
                                                     start_worker: StartWorker) -> None:
    futures = [client.submit(whoami, i) for i in range(2)]
    start_worker(cpus=1, max_tasks=2, allow_pickle=True, python_pool=False).join()
    assert len({f.result(timeout=60)[0] for f in futures}) == 2


def test_interpreter_is_recycled_after_max_tasks_and_max_rss(
        client: Client, start_worker: StartWorker) -> None:
    by_count = [client.submit(whoami, i) for i in range(4)]
    w = start_worker(cpus=1, max_tasks=4, allow_pickle=True, pool_max_tasks=2)
    pids = [f.result(timeout=60)[0] for f in by_count]
    w.join()
    assert pids[0] == pids[1] != pids[2] == pids[3]

    leaky = [client.submit(keep_memory, 64) for _ in range(2)]
    w = start_worker(cpus=1, max_tasks=2, allow_pickle=True, pool_max_rss=48 * MIB)
    first, second = (f.result(timeout=60) for f in leaky)
    w.join()
    assert first != second  # the first call left the interpreter too big to keep


def test_raise_and_segfault_end_only_their_call(client: Client,
                                                start_worker: StartWorker) -> None:
    raising = client.submit(raise_key_error)
    crashing = client.submit(crash)
    after = client.submit(whoami, "after")
    w = start_worker(cpus=1, max_tasks=3, allow_pickle=True)
    with pytest.raises(KeyError, match="missing"):
        raising.result(timeout=60)
    exc = crashing.exception(timeout=60)
    assert isinstance(exc, RemoteError) and "SIGSEGV" in str(exc)
    assert after.result(timeout=60)[1] == after.task_id  # the worker lives on
    w.join()
    assert client.task(raising.task_id).reason == "raised KeyError: 'missing'"
    # the crash's traceback (faulthandler) is in that call's own stderr log
    assert "Fatal Python error" in client.task_raw(crashing.task_id)["err_tail"]
    assert w.worker.pool.started == 2  # a fresh interpreter after the crash


def test_timeout_kills_the_call_and_its_interpreter(client: Client,
                                                    start_worker: StartWorker) -> None:
    slow = client.submit(time.sleep, 30, timeout="0.5s")
    after = client.submit(whoami, "after")
    w = start_worker(cpus=1, max_tasks=2, allow_pickle=True, kill_grace=0.5)
    exc = slow.exception(timeout=60)
    assert isinstance(exc, RemoteError) and "timed out after 0.5s" in str(exc)
    assert after.result(timeout=60)[1] == after.task_id
    w.join()


@pytest.mark.slow
def test_leak_past_the_guard_is_preempted_then_fails_cleanly(
        client: Client, start_worker: StartWorker) -> None:
    # A 640 MiB budget (--memory): the leak is stopped by the guard long before
    # the machine notices; it does not fit this node, so it fails, not loops.
    leaking = client.submit(leak_forever, 32, 2048, retries=0)
    after = client.submit(whoami, "after")
    w = start_worker(cpus=1, memory=640 * MIB, max_tasks=3, allow_pickle=True,
                     sample_interval=0.05, kill_grace=1.0)
    exc = leaking.exception(timeout=120)
    assert isinstance(exc, RemoteError)
    assert "needs more memory than this node has" in str(exc), str(exc)
    assert after.result(timeout=60)[1] == after.task_id  # the worker survived
    w.stop()
    assert client.task(leaking.task_id).state == "failed"


@pytest.mark.slow
def test_a_200_mb_result_comes_back_through_a_file(client: Client, start_worker: StartWorker,
                                                   tmp_path: Path) -> None:
    fut = client.submit(big_result, 200)
    after = client.submit(whoami, "after")
    w = start_worker(cpus=1, max_tasks=2, allow_pickle=True, result_dir=tmp_path / "results")
    value = fut.result(timeout=120)
    assert len(value) == 200 * MIB and value[:1] == b"y"
    del value
    assert after.result(timeout=60)[1] == after.task_id
    w.join()
    raw = client.task_raw(fut.task_id)
    assert raw["result"] == "" and raw["result_path"].startswith(str(tmp_path / "results"))


def leave_a_thread_behind() -> int:
    import threading

    threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon
    return os.getpid()


def fork_then_die() -> None:
    if os.fork() == 0:  # the child keeps the reply pipe's copy... if it had one
        time.sleep(30)
        os._exit(0)
    os._exit(3)


def sleep_then(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def test_retired_interpreter_with_a_leftover_thread_is_killed(
        client: Client, start_worker: StartWorker) -> None:
    import psutil

    fut = client.submit(leave_a_thread_behind)
    w = start_worker(cpus=1, allow_pickle=True, pool_max_tasks=1, heartbeat=0.3, lease=2.0)
    pid = fut.result(timeout=60)
    # retired after its one call; its own exit waits on nothing (os._exit), and the
    # pool's sweep would kill it after the grace in any case
    wait_for(lambda: not psutil.pid_exists(pid)
             or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=15)
    w.stop()


def test_crash_is_seen_even_if_a_forked_child_lives_on(client: Client,
                                                       start_worker: StartWorker) -> None:
    fut = client.submit(fork_then_die)
    w = start_worker(cpus=1, max_tasks=1, allow_pickle=True)
    started = time.monotonic()
    exc = fut.exception(timeout=60)
    assert time.monotonic() - started < 15  # not when the child's 30 s sleep ends
    assert isinstance(exc, RemoteError) and "exit code 3" in str(exc)
    w.join()


def test_stopping_worker_requeues_pooled_calls_and_deregisters(
        client: Client, start_worker: StartWorker) -> None:
    fut = client.submit(sleep_then, 30)
    w = start_worker(cpus=1, allow_pickle=True, kill_grace=0.5)
    wait_for(lambda: client.task_raw(fut.task_id).get("state") == "running")
    w.stop()
    assert client.task_raw(fut.task_id)["state"] == "queued"  # given back, not lost
    assert not w.worker.pool.members
    rows = [r for r in client.workers() if r.get("name") == w.worker.name]
    assert rows and rows[0].get("status") != "alive", rows


def test_guardian_finds_the_pool_interpreters(client: Client,
                                              start_worker: StartWorker) -> None:
    from distcomp.runner import find_interpreters

    fut = client.submit(whoami, "x")
    w = start_worker(cpus=1, allow_pickle=True)
    pid = fut.result(timeout=60)[0]
    assert pid in [p for p, _ in find_interpreters(w.worker.tag)]
    assert find_interpreters("someone-else") == [] or pid not in [
        p for p, _ in find_interpreters("someone-else")]
    w.stop()
