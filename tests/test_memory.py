"""The memory guard: admission, preemption with a learned requirement, limits, OOM.

Integration tests run real `distcomp worker` processes inside a small memory
cgroup when the test can create one (root, cgroup v1 or v2 memory controller),
else with a small ``--memory`` budget — never by exhausting the machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for

from distcomp import memory
from distcomp.spec import GIB, MIB, TaskSpec
from distcomp.store import Store

MEMHOG = Path(__file__).resolve().parent / "memhog.py"


def hog(peak_mb: int, grow_s: float, idle_s: float = 0.0, hold_s: float = 0.5) -> str:
    return f"{sys.executable} {MEMHOG} {peak_mb} {grow_s} {idle_s} {hold_s}"


# -- the arithmetic ------------------------------------------------------------

def usage_of(*points: tuple[float, int]) -> memory.Usage:
    u = memory.Usage()
    for t, r in points:
        u.add(t, r)
    return u


def test_slope_and_projection() -> None:
    u = usage_of((0, 100 * MIB), (1, 200 * MIB), (2, 300 * MIB))
    assert u.slope() == pytest.approx(100 * MIB)
    assert u.projected_growth(10, None) == pytest.approx(1000 * MIB, rel=1e-6)
    assert u.projected_growth(10, 400 * MIB) == 100 * MIB  # capped by the learned peak
    assert usage_of((0, 5 * MIB), (1, 1 * MIB)).projected_growth(10, None) == 0  # shrinking
    assert u.peak == 300 * MIB and u.current == 300 * MIB


def cand(tid: str, started: float, declared: int, *points: tuple[float, int]
         ) -> memory.Candidate:
    return memory.Candidate(tid, tid.split(".")[0], started, declared, usage_of(*points))


def test_victim_policies() -> None:
    old_big = cand("1.1", 0, 100 * MIB, (0, 0), (1, 900 * MIB))
    young_flat = cand("1.2", 5, 500 * MIB, (5, 300 * MIB), (6, 300 * MIB))
    fast = cand("1.3", 3, 800 * MIB, (3, 0), (4, 700 * MIB))
    tasks = [old_big, young_flat, fast]
    assert memory.youngest(tasks) is young_flat
    assert memory.most_over_request(tasks) is old_big
    assert memory.fastest_growing(tasks) is old_big


def test_guard_preempts_until_headroom_is_back() -> None:
    guard = memory.Guard(1000 * MIB, memory.Watermarks(low=100 * MIB, high=200 * MIB))
    tasks = [cand(f"1.{i}", i, 0, (i, 320 * MIB)) for i in range(1, 4)]  # 960 MiB used
    verdicts = guard.check(tasks, dying=0)
    assert [v.task_id for v in verdicts] == ["1.3"]  # youngest; frees enough
    assert not verdicts[0].alone
    assert guard.check(tasks, dying=300 * MIB) == []  # one already being stopped
    [alone] = guard.check([cand("1.9", 0, 0, (0, 950 * MIB))], dying=0)
    assert alone.alone


def test_admission_waits_for_a_new_job_then_uses_its_profile() -> None:
    guard = memory.Guard(4 * GIB, memory.Watermarks(low=200 * MIB, high=400 * MIB))
    now = time.monotonic()
    assert guard.admission([], now)[1] == 1  # nothing known: one task at a time
    young = cand("7.1", now, 100 * MIB, (now, 10 * MIB))
    assert guard.admission([young], now + 0.1) == (0, 0)  # on probation
    young.usage.add(now + 0.5, 500 * MIB)
    young.usage.add(now + 1.0, 1000 * MIB)
    guard.observe("7", young.usage, "7.1")
    budget, count = guard.admission([young], now + 1.1)
    assert budget <= 0 or count == 0  # growing 1 GiB/s: nothing else may start
    done = usage_of((0, 1000 * MIB))
    guard.observe("7", done)
    budget, count = guard.admission([], now + 5)
    assert count == budget // (1000 * MIB) >= 1  # as many as a 1 GiB peak allows
    # A job whose tasks peaked above what this node has free must not keep the
    # node idle: with nothing running, one task may always try.
    huge = memory.Guard(1 * GIB, memory.Watermarks(low=100 * MIB, high=200 * MIB))
    huge.observe("8", usage_of((0, 900 * MIB)), "8.1")
    assert huge.admission([], now)[1] == 1
    assert huge.admission([cand("9.1", now - 10, 10 * MIB, (now - 9, 10 * MIB),
                                (now - 1, 10 * MIB))], now)[1] == 0


def test_default_watermarks() -> None:
    small = memory.Watermarks.default(1536 * MIB)
    assert small.low < small.high < 1536 * MIB
    big = memory.Watermarks.default(512 * GIB)
    assert big.low == 2 * GIB and big.high == 4 * GIB


# -- real workers --------------------------------------------------------------

def _make_cgroup(limit: int) -> Path | None:
    """A memory cgroup with ``limit`` bytes, or None if this process cannot make one."""
    if os.geteuid() != 0:
        return None
    name = f"distcomp-test-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    candidates = []
    if v2.exists() and "memory" in v2.read_text().split():
        candidates.append((Path("/sys/fs/cgroup") / name, "memory.max"))
    candidates.append((Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"))
    for path, knob in candidates:
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            (path / knob).write_text(str(limit))
            return path
        except OSError:
            path.rmdir()
    return None


def _cgroup_oom_kills(group: Path) -> int:
    """OOM kills inside this cgroup only (v2 memory.events, v1 memory.oom_control):
    the node-wide counter would also count other processes' OOMs."""
    for name in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(OSError):
            for line in (group / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


@contextlib.contextmanager
def memory_box(limit: int) -> Iterator[tuple[list[str], Path | None]]:
    """How to start a worker in ``limit`` bytes: inside a cgroup if possible, else
    with --memory. Yields (command prefix, cgroup)."""
    group = _make_cgroup(limit)
    try:
        if group is None:
            yield [sys.executable, "-m", "distcomp"], None
        else:
            yield ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "box",
                   sys.executable, "-m", "distcomp"], group
    finally:
        if group is not None:
            for _ in range(50):
                with contextlib.suppress(OSError):
                    group.rmdir()
                    break
                time.sleep(0.1)


def start_worker(prefix: list[str], store: Store, state: Path, *args: str
                 ) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DISTCOMP_REDIS=store.url, DISTCOMP_QUEUE=store.queue)
    return subprocess.Popen([*prefix, "--state-dir", str(state), "worker", "--heartbeat",
                             "0.5s", "--lease", "5s", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_growing_tasks_are_preempted_never_oom_killed(store: Store, tmp_path: Path) -> None:
    """12 tasks declare 100 MB and grow to 300-600 MB in a 1.5 GiB box: the guard
    preempts (at least once), requeued tasks carry their learned requirement, all 12
    succeed, and the kernel's OOM killer never acts."""
    peaks = [300, 350, 400, 450, 500, 550, 600, 300, 400, 500, 600, 450]
    # idle first (so the first task's probation sees nothing), then grow
    store.submit([TaskSpec(cmd=hog(p, 4.0, idle_s=1.5), mem=100 * MIB, name=f"hog{i}")
                  for i, p in enumerate(peaks)])
    with memory_box(1536 * MIB) as (prefix, group):
        extra = [] if group is not None else ["--memory", "1536M"]
        proc = start_worker(prefix, store, tmp_path / "state", "--cpus", "12", *extra)
        try:
            wait_for(lambda: store.counts().get("succeeded", 0)
                     + store.counts().get("failed", 0) == 12, timeout=240, interval=0.2)
        finally:
            stop(proc)
        group_ooms = _cgroup_oom_kills(group) if group is not None else 0
    rows = [store.task(f"1.{i}") for i in range(1, 13)]
    assert all(r is not None for r in rows)
    assert [r["state"] for r in rows] == ["succeeded"] * 12, [  # type: ignore[index]
        (r["id"], r["state"], r.get("reason")) for r in rows]  # type: ignore[index, union-attr]
    preempted = [r for r in rows if int(r.get("preempts", 0)) > 0]  # type: ignore[union-attr]
    assert preempted, "the guard never had to act: the test did not exercise it"
    for r in preempted:  # max(declared, peak x 1.2): a victim may have been caught idle
        assert int(r["mem"]) >= int(r["declared_mem"]) == 100 * MIB
    assert group_ooms == 0  # the kernel's OOM killer never acted in the box
    assert all(r["signal"] == "" for r in rows)  # type: ignore[index]


def test_preempted_task_learns_its_requirement(store: Store, start_worker: object) -> None:
    """Three tasks declaring 100 MB grow to 500 MB in an 800 MB budget: the victims
    go back to the queue needing max(declared, observed peak x 1.2)."""
    store.submit([TaskSpec(cmd=hog(500, 2.0), mem=100 * MIB, name=f"h{i}") for i in range(3)])
    w = start_worker(memory=800 * MIB, cpus=4)  # type: ignore[operator]
    wait_for(lambda: store.counts().get("succeeded", 0) == 3, timeout=90, interval=0.2)
    w.stop()
    rows = [store.task(f"1.{i}") for i in range(1, 4)]
    preempted = [r for r in rows if r and int(r.get("preempts", 0)) > 0]
    assert preempted
    for r in preempted:
        assert int(r["mem"]) > 100 * MIB == int(r["declared_mem"])
        assert int(r["mem"]) <= int(1.2 * 600 * MIB)
    events = [e for e in store.events(1000) if e["type"] == "requeue"]
    assert all(e["reason"].startswith("preempted: memory low") for e in events)


def test_task_too_big_for_the_node_fails_then_runs_on_a_bigger_one(
        store: Store, tmp_path: Path) -> None:
    store.submit([TaskSpec(cmd=hog(700, 2.0), mem=100 * MIB)])
    small = start_worker([sys.executable, "-m", "distcomp"], store, tmp_path / "s",
                         "--memory", "500M", "--name", "small")
    try:
        wait_for(lambda: store.counts().get("failed") == 1, timeout=60)
    finally:
        stop(small)
    task = store.task("1.1")
    assert task is not None
    assert task["reason"].startswith("needs more memory than this node has (peak ")
    assert "of 500.0M" in task["reason"]
    assert store.retry(["1.1"]) == 1
    big = start_worker([sys.executable, "-m", "distcomp"], store, tmp_path / "b",
                       "--memory", "2G", "--name", "big")
    try:
        wait_for(lambda: store.counts().get("succeeded") == 1, timeout=60)
    finally:
        stop(big)
    task = store.task("1.1")
    assert task is not None and task["worker"] == "big"


def test_task_is_requeued_to_a_bigger_live_worker(store: Store, tmp_path: Path) -> None:
    """While a big enough worker is alive, a task too big for its node goes to it."""
    big = start_worker([sys.executable, "-m", "distcomp"], store, tmp_path / "b",
                       "--memory", "2G", "--name", "big", "--cpus", "1")
    store.submit([TaskSpec(cmd="sleep 30", name="occupy", cpus=1)])
    wait_for(lambda: store.counts().get("running") == 1)
    store.submit([TaskSpec(cmd=hog(700, 2.0), mem=100 * MIB)])
    small = start_worker([sys.executable, "-m", "distcomp"], store, tmp_path / "s",
                         "--memory", "500M", "--name", "small")
    try:
        wait_for(lambda: (store.task("2.1") or {}).get("preempts") == "1", timeout=60)
        assert store.task("2.1")["state"] in ("queued", "running")  # type: ignore[index]
        store.cancel(["1.1"])  # free the big worker's core
        wait_for(lambda: (store.task("2.1") or {}).get("state") == "succeeded", timeout=60)
    finally:
        stop(small)
        stop(big)
    assert store.task("2.1")["worker"] == "big"  # type: ignore[index]


def test_mem_limit_kills_the_task(store: Store, tmp_path: Path) -> None:
    store.submit([TaskSpec(cmd=hog(400, 1.0, hold_s=3), mem_limit=150 * MIB)])
    proc = start_worker([sys.executable, "-m", "distcomp"], store, tmp_path / "s")
    try:
        wait_for(lambda: store.counts().get("failed") == 1, timeout=60)
    finally:
        stop(proc)
    task = store.task("1.1")
    assert task is not None and task["reason"].startswith("exceeded its memory limit (")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a memory cgroup")
def test_kernel_oom_kill_is_recorded_distinctly(store: Store, tmp_path: Path) -> None:
    """With the guard switched off, the kernel's OOM killer acts; it is handled like a
    preemption, and as the task ran alone it fails, with a reason that says so
    instead of a bare SIGKILL."""
    store.submit([TaskSpec(cmd=hog(600, 1.0, hold_s=2))])
    with memory_box(300 * MIB) as (prefix, group):
        if group is None:
            pytest.skip("cannot create a memory cgroup here")
        proc = start_worker(prefix, store, tmp_path / "s", "--low-water", "0",
                            "--high-water", "0", "--reserve", "0")
        try:
            wait_for(lambda: store.counts().get("failed") == 1, timeout=60)
        finally:
            stop(proc)
    task = store.task("1.1")
    assert task is not None and task["state"] == "failed"
    assert task["reason"].startswith("killed by the kernel OOM killer: needs more memory "
                                     "than this node has"), task["reason"]
    assert int(task["preempts"]) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create per-task memory cgroups")
def test_mem_limit_is_enforced_by_the_kernel_in_a_task_cgroup(store: Store, tmp_path: Path
                                                              ) -> None:
    from distcomp.cgroups import TaskCgroups

    if TaskCgroups.detect("probe") is None:
        pytest.skip("no writable cgroup v1 memory hierarchy here")
    store.submit([TaskSpec(cmd=hog(400, 0.5, hold_s=3), mem_limit=150 * MIB),
                  TaskSpec(cmd=hog(50, 0.5), mem_limit=150 * MIB)])
    proc = start_worker([sys.executable, "-m", "distcomp"], store, tmp_path / "s")
    try:
        wait_for(lambda: store.counts().get("failed") == 1
                 and store.counts().get("succeeded") == 1, timeout=60)
    finally:
        stop(proc)
    task = store.task("1.1")
    assert task is not None and task["reason"] == (
        "exceeded its memory limit (150.0M; stopped by the kernel in its cgroup)")
    assert int(task.get("preempts", 0)) == 0  # a limit, not memory pressure: not requeued
