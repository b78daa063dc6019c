"""The worker running real processes against a real redis-server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import RedisProcess, WorkerThread, wait_for

from distcomp.spec import GIB, MIB, TaskSpec
from distcomp.store import Store

StartWorker = Callable[..., WorkerThread]


def spans(path: Path) -> list[tuple[str, float, float]]:
    """Read `name start end` lines written by tasks."""
    out = []
    for line in path.read_text().splitlines():
        name, start, end = line.split()
        out.append((name, float(start), float(end)))
    return out


def overlap(a: tuple[str, float, float], b: tuple[str, float, float]) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def timed(name: str, seconds: float, out: Path) -> str:
    return (f"s=$(date +%s.%N); sleep {seconds}; "
            f"echo {name} $s $(date +%s.%N) >> {out}")


def test_runs_tasks_with_environment_and_logs(store: Store, start_worker: StartWorker) -> None:
    store.submit([TaskSpec(cmd='echo "$DISTCOMP_TASK_ID $DISTCOMP_JOB_ID $DISTCOMP_ATTEMPT '
                               '$DISTCOMP_CPUS $OMP_NUM_THREADS $MYVAR"; echo oops >&2',
                           cpus=2, env=(("MYVAR", "hello"),))])
    w = start_worker(cpus=2, max_tasks=1)
    stats = w.join()
    assert stats.succeeded == 1
    task = store.task("1.1")
    assert task is not None and task["state"] == "succeeded" and task["exit_code"] == "0"
    assert task["out_tail"] == "1.1 1 1 2 2 hello\n" and task["err_tail"] == "oops\n"
    assert Path(task["out_path"]).read_text() == "1.1 1 1 2 2 hello\n"
    assert task["host"] and float(task["wall"]) >= 0


def test_tasks_get_default_signal_handling_and_no_worker_fds(
        store: Store, start_worker: StartWorker, tmp_path: Path) -> None:
    """Python ignores SIGPIPE; a task must not inherit that (``yes | head`` would
    complain of a broken pipe), nor any descriptor of the worker's (Redis sockets,
    pidfds, pipes, whatever the worker itself inherited): only 0, 1 and 2. Both
    ways of starting a task are covered (posix_spawn, and Popen for a cwd)."""
    leaked = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leaked, True)  # as if the worker's own parent had left one
    try:
        cmd = "yes | head -c 1 >/dev/null; ls /proc/$$/fd"
        store.submit([TaskSpec(cmd=cmd), TaskSpec(cmd=cmd + " ", cwd=str(tmp_path))])
        start_worker(max_tasks=2).join()
    finally:
        os.close(leaked)
    for tid in ("1.1", "1.2"):
        task = store.task(tid)
        assert task is not None and task["state"] == "succeeded", task
        assert task["err_tail"] == "", task["err_tail"]  # no "Broken pipe"
        assert sorted(int(fd) for fd in task["out_tail"].split()) == [0, 1, 2]


def test_failure_reports_never_hold_back_completions(store: Store,
                                                    start_worker: StartWorker) -> None:
    """Completions ride with the next claim; a failure report at the head of the
    outbox must still go at once, or the completions queued behind it wait while
    claims keep coming back full, their leases expire and the tasks run twice."""
    specs = [TaskSpec(cmd=f"exit {1 if i % 10 == 0 else 0}  # {i}", retries=0)
             for i in range(3000)]
    store.submit(specs)
    w = start_worker(cpus=8, max_running=4, heartbeat=0.3, lease=0.8, max_tasks=3000)
    stats = w.join(timeout=120)
    assert stats.stale == 0 and stats.requeued == 0
    assert (stats.succeeded, stats.failed) == (2700, 300)
    assert store.counts().get("succeeded") == 2700 and store.counts().get("failed") == 300


def test_failures_record_exit_code_and_signal(store: Store, start_worker: StartWorker,
                                              tmp_path: Path) -> None:
    store.submit([TaskSpec(cmd="exit 7"), TaskSpec(cmd="kill -9 $$"),
                  TaskSpec(cmd="true", cwd=str(tmp_path / "missing"))])
    start_worker(max_tasks=3).join()
    t1, t2, t3 = (store.task(f"1.{i}") for i in (1, 2, 3))
    assert t1 and t1["state"] == "failed" and t1["reason"] == "exit code 7"
    assert t2 and t2["state"] == "failed" and t2["reason"] == "killed by signal SIGKILL"
    assert t3 and t3["state"] == "failed" and "does not exist" in t3["reason"]


def test_priorities_are_honoured(store: Store, start_worker: StartWorker, tmp_path: Path
                                 ) -> None:
    out = tmp_path / "order"
    store.submit([TaskSpec(cmd=f"echo {p} >> {out}", priority=p) for p in (1, 5, 3, 9, 2)])
    start_worker(cpus=1, max_tasks=5).join()
    assert out.read_text().split() == ["9", "5", "3", "2", "1"]


def test_cpus_are_enforced(store: Store, start_worker: StartWorker, tmp_path: Path) -> None:
    out = tmp_path / "spans"
    store.submit([TaskSpec(cmd=timed(f"t{i}", 0.3, out), cpus=2) for i in range(4)])
    start_worker(cpus=2, max_tasks=4).join()
    rows = spans(out)
    assert len(rows) == 4
    assert not any(overlap(a, b) for i, a in enumerate(rows) for b in rows[i + 1:])


def test_big_task_waits_while_small_ones_run(store: Store, start_worker: StartWorker,
                                             tmp_path: Path) -> None:
    out = tmp_path / "spans"
    store.submit([TaskSpec(cmd=timed("big1", 0.6, out), mem=700 * MIB, priority=5),
                  TaskSpec(cmd=timed("big2", 0.6, out), mem=700 * MIB, priority=5),
                  TaskSpec(cmd=timed("small", 0.3, out), mem=100 * MIB)])
    start_worker(cpus=4, memory=1 * GIB, max_tasks=3).join()
    rows = {name: (name, s, e) for name, s, e in spans(out)}
    assert not overlap(rows["big1"], rows["big2"])  # 1.4 GiB would not fit in 1 GiB
    assert overlap(rows["big1"], rows["small"])  # the small one ran beside the first


def test_timeout_kills_the_whole_process_group(store: Store, start_worker: StartWorker) -> None:
    marker = f"300.{uuid.uuid4().int % 10**9:09d}"  # a sleep length no other process has
    store.submit([TaskSpec(cmd=f"sleep {marker} & sleep {marker}; wait",
                           timeout=0.5)])
    start_worker(max_tasks=1, kill_grace=0.5).join()
    task = store.task("1.1")
    assert task is not None and task["state"] == "failed"
    assert task["reason"] == "timed out after 0.5s"
    wait_for(lambda: not any(marker in " ".join(p.info["cmdline"] or [])
                             for p in psutil.process_iter(["cmdline"])), timeout=5)


def test_sigterm_ignoring_task_is_killed_after_grace(store: Store, start_worker: StartWorker
                                                     ) -> None:
    store.submit([TaskSpec(cmd="trap '' TERM; sleep 30", timeout=0.3)])
    start_worker(max_tasks=1, kill_grace=0.3).join(timeout=20)
    task = store.task("1.1")
    assert task is not None and task["state"] == "failed" and "timed out" in task["reason"]


def test_binary_and_huge_output_are_capped(store: Store, start_worker: StartWorker) -> None:
    store.submit([
        TaskSpec(cmd=r"printf 'ok \377\376 bad bytes\n'; printf '\377' >&2"),
        TaskSpec(cmd="head -c 100000000 /dev/zero | tr '\\0' x; echo; echo END"),
    ])
    start_worker(max_tasks=2, tail_bytes=4096).join()
    binary, huge = store.task("1.1"), store.task("1.2")
    assert binary and binary["state"] == "succeeded"
    assert binary["out_tail"] == "ok \ufffd\ufffd bad bytes\n" and binary["err_tail"] == "\ufffd"
    assert huge and huge["state"] == "succeeded"
    assert huge["out_tail"].endswith("END\n") and len(huge["out_tail"]) < 4096 + 200
    assert "earlier bytes" in huge["out_tail"]
    assert Path(huge["out_path"]).stat().st_size == 100_000_005


def test_cancel_kills_a_running_task(store: Store, start_worker: StartWorker) -> None:
    store.submit([TaskSpec(cmd="sleep 60")])
    w = start_worker()
    wait_for(lambda: store.counts().get("running") == 1)
    assert store.cancel(["1.1"]) == 1
    wait_for(lambda: not w.worker.running, timeout=10)
    task = store.task("1.1")
    assert task is not None and task["state"] == "cancelled"
    w.stop()


def test_idle_worker_wakes_on_submission(store: Store, start_worker: StartWorker) -> None:
    w = start_worker()
    wait_for(lambda: any(x["name"] == w.worker.name for x in store.workers()))
    time.sleep(0.3)
    store.submit([TaskSpec(cmd="true")])
    wait_for(lambda: store.counts().get("succeeded") == 1, timeout=1.5)
    w.stop()


def test_stop_requeues_running_tasks_and_drain_finishes_them(
        store: Store, start_worker: StartWorker) -> None:
    store.submit([TaskSpec(cmd="sleep 30"), TaskSpec(cmd="sleep 0.5")])
    w = start_worker(cpus=1)
    wait_for(lambda: store.counts().get("running") == 1)
    w.stop()
    assert store.counts()["queued"] == 2 and store.counts().get("running", 0) == 0
    task = store.task("1.1")
    assert task is not None and task["releases"] == "1"
    store.cancel(["1.1"])
    w2 = start_worker(cpus=1, drain=True)
    wait_for(lambda: store.counts().get("running") == 1)
    w2.stop()
    assert store.counts()["succeeded"] == 1


def test_worker_name_defaults_to_host_and_is_unique(store: Store, start_worker: StartWorker
                                                   ) -> None:
    a, b = start_worker(), start_worker()
    wait_for(lambda: len(store.workers()) == 2)
    assert a.worker.name != b.worker.name
    assert {a.worker.name, b.worker.name} == {a.worker.host, f"{a.worker.host}-2"}


def test_kill_9_worker_then_new_worker_finishes_everything(
        store: Store, tmp_path: Path, redis_server: object) -> None:
    """A worker process dies by SIGKILL mid-run: its leases expire, a new worker
    finishes every task, each recorded succeeded exactly once, and a completion
    carrying the dead attempt's token is rejected."""
    store.submit([TaskSpec(cmd=f"sleep 0.2; echo {i}") for i in range(30)])
    env = dict(os.environ, DISTCOMP_REDIS=store.url, DISTCOMP_QUEUE=store.queue)
    args = [sys.executable, "-m", "distcomp", "--state-dir", str(tmp_path), "worker",
            "--cpus", "2", "--heartbeat", "0.3s", "--lease", "1s", "--name", "victim"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    wait_for(lambda: store.counts().get("succeeded", 0) >= 5)
    running = store.running_task_ids()
    assert running
    stale = {tid: store.task(tid)["token"] for tid in running}  # type: ignore[index]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    args[-1] = "rescuer"
    proc2 = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.counts().get("succeeded", 0) == 30, timeout=60)
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(20)
    for tid, token in stale.items():
        assert store.complete(tid, token, {"host": "zombie"}) is False
    events = store.events(10_000)
    finished = [e["task"] for e in events if e["type"] == "succeeded"]
    assert sorted(finished) == sorted(f"1.{i}" for i in range(1, 31))  # once each
    assert all(store.task(t)["host"] != "zombie" for t in stale)  # type: ignore[index]
    assert store.counts().get("running", 0) == 0 and store.counts()["succeeded"] == 30


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_worker_process_stops_cleanly_on_signal(store: Store, tmp_path: Path,
                                                signum: int) -> None:
    store.submit([TaskSpec(cmd="sleep 60")])
    env = dict(os.environ, DISTCOMP_REDIS=store.url, DISTCOMP_QUEUE=store.queue)
    proc = subprocess.Popen([sys.executable, "-m", "distcomp", "--state-dir", str(tmp_path),
                             "worker"], env=env, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: store.counts().get("running") == 1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert store.counts()["queued"] == 1 and store.counts().get("running", 0) == 0
    assert "1 requeued" in err


def test_gpus_are_assigned_exclusively(store: Store, start_worker: StartWorker,
                                       tmp_path: Path) -> None:
    out = tmp_path / "gpus"
    store.submit([TaskSpec(cmd=f"s=$(date +%s.%N); sleep 0.3; "
                               f"echo $CUDA_VISIBLE_DEVICES $s $(date +%s.%N) >> {out}",
                           gpus=1, name=f"g{i}") for i in range(6)]
                 + [TaskSpec(cmd=f"echo none:$CUDA_VISIBLE_DEVICES >> {out}")])
    start_worker(cpus=8, gpus=[0, 2, 3], max_tasks=7).join()
    lines = out.read_text().splitlines()
    assert "none:" in lines  # a task without GPUs sees none
    rows = [tuple(line.split()) for line in lines if not line.startswith("none")]
    assert len(rows) == 6 and {r[0] for r in rows} == {"0", "2", "3"}
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a[0] == b[0]:
                assert not overlap((a[0], float(a[1]), float(a[2])),
                                   (b[0], float(b[1]), float(b[2])))


def test_worker_rides_out_a_redis_restart(tmp_path: Path) -> None:
    """kill -9 of Redis mid-run: the worker keeps its tasks running, reconnects with
    backoff when the server is back (from its AOF), and every task is recorded once."""
    server = RedisProcess(tmp_path / "r", aof=True)
    server.directory.mkdir()
    server.start()
    try:
        store = Store(server.url, "outage")
        store.submit([TaskSpec(cmd=f"sleep 0.8; echo {i}") for i in range(6)])
        w = WorkerThread(store, cpus=2, log_dir=tmp_path / "logs", state_dir=tmp_path / "s",
                         heartbeat=0.3,
                         lease=3.0).start()
        wait_for(lambda: store.counts().get("running") == 2)
        time.sleep(0.2)
        server.kill9()
        time.sleep(1.5)  # tasks finish while Redis is down; reports wait in the outbox
        server.start()
        wait_for(lambda: store.counts().get("succeeded") == 6, timeout=60)
        w.stop()
        assert store.counts().get("stale_reports", 0) == 0
        assert store.counts().get("running", 0) == 0
    finally:
        server.stop()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin apart")
def test_pin_gives_each_task_its_own_cores(store: Store, start_worker: StartWorker) -> None:
    show = f"{sys.executable} -c 'import os; print(sorted(os.sched_getaffinity(0)))'"
    store.submit([TaskSpec(cmd=f"sleep 0.5; {show}", name=f"p{i}") for i in range(2)])
    start_worker(cpus=2, pin=True, max_tasks=2).join()
    cores = [store.task(f"1.{i}")["out_tail"].strip() for i in (1, 2)]  # type: ignore[index]
    assert sorted(cores) == ["[0]", "[1]"]


def test_children_left_behind_are_killed_with_the_group(store: Store,
                                                        start_worker: StartWorker) -> None:
    marker = f"300.{uuid.uuid4().int % 10**9:09d}"
    store.submit([TaskSpec(cmd=f"sleep {marker} & echo started")])
    start_worker(max_tasks=1).join()
    assert store.task("1.1")["state"] == "succeeded"  # type: ignore[index]
    wait_for(lambda: not any(marker in " ".join(p.info["cmdline"] or [])
                             for p in psutil.process_iter(["cmdline"])), timeout=5)


def test_missing_command_and_unusable_log_dir(store: Store, start_worker: StartWorker,
                                              tmp_path: Path) -> None:
    store.submit([TaskSpec(cmd="no-such-command-here --flag")])
    start_worker(max_tasks=1).join()
    task = store.task("1.1")
    assert task is not None and task["reason"] == "exit code 127 (command not found)"
    assert "not found" in task["err_tail"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store.submit([TaskSpec(cmd="true")], allow_duplicates=True)
    w = start_worker(max_tasks=1, log_dir=blocker / "logs")
    w.join()
    task = store.task("2.1")
    assert task is not None and task["state"] == "failed"
    assert task["reason"].startswith("cannot create log directory")
    assert w.stats is not None and w.stats.failed == 1  # the worker carried on and stopped


@pytest.mark.skipif(not shutil.which("nvidia-smi"), reason="no nvidia-smi: no real GPU here")
def test_real_gpus_are_detected_and_assigned(store: Store, start_worker: StartWorker) -> None:
    from distcomp.resources import detect_gpus

    env_gpus = detect_gpus()
    assert env_gpus
    store.submit([TaskSpec(cmd="echo $CUDA_VISIBLE_DEVICES; nvidia-smi -L", gpus=1)])
    start_worker(max_tasks=1).join()
    task = store.task("1.1")
    assert task is not None and task["state"] == "succeeded"
    assert int(task["out_tail"].splitlines()[0]) in env_gpus


def test_custom_resource_limits_concurrency(store: Store, start_worker: StartWorker,
                                            tmp_path: Path) -> None:
    out = tmp_path / "spans"
    store.submit([TaskSpec(cmd=timed(f"t{i}", 0.3, out), resources=(("license", 1),))
                  for i in range(3)])
    start_worker(cpus=4, resources={"license": 1}, max_tasks=3).join()
    rows = spans(out)
    assert len(rows) == 3
    assert not any(overlap(a, b) for i, a in enumerate(rows) for b in rows[i + 1:])


def _states(store: Store, task_ids: list[str]) -> list[str | None]:
    return [row[0] for row in store.task_fields(task_ids, ["state"])]


def test_prefetch_holds_short_tasks_and_gives_them_back(
        store: Store, start_worker: Callable[..., WorkerThread], tmp_path: Path) -> None:
    """Once tasks are short, a busy worker holds claimed tasks (leased, not started)
    to start the moment a slot frees; held ones go back to the queue, never
    started, when their slot stays busy too long (and when the worker stops)."""
    warm = store.submit([TaskSpec(cmd=f"true {i}") for i in range(5)], job_name="warm")
    w = start_worker(cpus=1)
    wait_for(lambda: _states(store, warm.task_ids) == ["succeeded"] * 5)
    slow = store.submit([TaskSpec(cmd="sleep 30")], job_name="slow").task_ids[0]
    wait_for(lambda: _states(store, [slow]) == ["running"])
    quick = store.submit([TaskSpec(cmd=f"echo {i}") for i in range(3)], job_name="quick")
    # Depth 2 per running task: two are held (leased to us), the third stays queued.
    wait_for(lambda: _states(store, quick.task_ids) == ["running", "running", "queued"])
    assert len(w.worker.prefetched) == 2 and len(w.worker.running) == 1
    # The slot stays busy: after 2 s they go back, and are not claimed again while
    # the long task runs.
    wait_for(lambda: _states(store, quick.task_ids) == ["queued"] * 3, timeout=10)
    time.sleep(0.5)
    assert _states(store, quick.task_ids) == ["queued"] * 3 and not w.worker.prefetched
    w.stop()
    assert _states(store, quick.task_ids) == ["queued"] * 3
    rows = store.task_fields(quick.task_ids[:2], ["reason"])
    assert all("held by worker" in (row[0] or "") for row in rows)
    assert not list((tmp_path / "logs").rglob(f"{quick.task_ids[0]}.*"))  # never started


def test_held_tasks_start_when_the_slot_frees(
        store: Store, start_worker: Callable[..., WorkerThread]) -> None:
    """Held tasks run in claim order as slots free, and every task runs exactly once."""
    warm = store.submit([TaskSpec(cmd=f"true {i}") for i in range(5)], job_name="warm")
    w = start_worker(cpus=2)
    wait_for(lambda: _states(store, warm.task_ids) == ["succeeded"] * 5)
    many = store.submit([TaskSpec(cmd=f"echo {i}") for i in range(300)], job_name="many")
    wait_for(lambda: store.counts().get("succeeded", 0) == 305, timeout=60)
    stats = w.stop()
    assert stats.succeeded == 305 and stats.stale == 0 and stats.requeued == 0
    attempts = store.task_fields(many.task_ids, ["attempt"])
    assert {row[0] for row in attempts} == {"1"}


def test_no_prefetch_for_long_tasks(store: Store,
                                    start_worker: Callable[..., WorkerThread]) -> None:
    """A worker whose tasks are long holds nothing: the next task stays in the queue
    for whichever worker frees first."""
    first = store.submit([TaskSpec(cmd="sleep 0.4")], job_name="long").task_ids[0]
    w = start_worker(cpus=1)
    wait_for(lambda: _states(store, [first]) == ["succeeded"])
    slow = store.submit([TaskSpec(cmd="sleep 30")], job_name="slow").task_ids[0]
    wait_for(lambda: _states(store, [slow]) == ["running"])
    nxt = store.submit([TaskSpec(cmd="true")], job_name="next").task_ids[0]
    time.sleep(1.0)
    assert _states(store, [nxt]) == ["queued"] and not w.worker.prefetched


def test_held_tasks_go_back_when_the_worker_stops(
        store: Store, start_worker: Callable[..., WorkerThread]) -> None:
    warm = store.submit([TaskSpec(cmd=f"true {i}") for i in range(5)], job_name="warm")
    w = start_worker(cpus=1)
    wait_for(lambda: _states(store, warm.task_ids) == ["succeeded"] * 5)
    slow = store.submit([TaskSpec(cmd="sleep 30")], job_name="slow").task_ids[0]
    wait_for(lambda: _states(store, [slow]) == ["running"])
    quick = store.submit([TaskSpec(cmd="true")], job_name="quick").task_ids[0]
    wait_for(lambda: len(w.worker.prefetched) == 1)
    w.stop()
    assert _states(store, [quick, slow]) == ["queued", "queued"]
    reason = store.task_fields([quick], ["reason"])[0][0]
    assert reason is not None and "stopped" in reason


def test_prefetch_never_claims_a_task_larger_than_the_worker(
        store: Store, start_worker: Callable[..., WorkerThread]) -> None:
    """A prefetching claim asks with more than is free, but never for a task this
    worker could not run even when idle: that one stays for a bigger worker."""
    warm = store.submit([TaskSpec(cmd=f"true {i}") for i in range(5)], job_name="warm")
    w = start_worker(cpus=2)
    wait_for(lambda: _states(store, warm.task_ids) == ["succeeded"] * 5)
    slow = store.submit([TaskSpec(cmd="sleep 30", cpus=2)], job_name="slow").task_ids[0]
    wait_for(lambda: len(w.worker.running) == 1)
    big = store.submit([TaskSpec(cmd="true", cpus=4)], job_name="big").task_ids[0]
    small = store.submit([TaskSpec(cmd="true")], job_name="small").task_ids[0]
    wait_for(lambda: [c.task_id for c, _, _ in w.worker.prefetched] == [small])
    assert _states(store, [slow, big, small]) == ["running", "queued", "running"]
    w.stop()
