"""Memory pressure: a mixed workload that needs more memory than the budget.

The same task list, under the same memory budget (1.5 GiB) with the same number
of slots (4), run by:

* **distcomp, default guard** (growth-aware admission, victim policy
  ``youngest``), and with ``--victim-policy most-over-request`` /
  ``fastest-growing``;
* **distcomp ``--admission instant``** (start tasks on the instantaneous free
  memory alone), with each of the three victim policies: growth-aware admission
  rarely needs to preempt, so this is where the victim policies differ;
* **GNU Parallel ``-j4 --memfree 256M --retries 3``**.

Tasks are ``tests/memhog.py`` processes whose memory grows (200-800 MB over
2-2.5 s, some idling first) plus a few small flat ones; every distcomp task
declares 0.1 GiB, far below what most of them take, so only the measured-memory
guard can keep them inside the budget.

When this process is root and a memory cgroup can be made, every contender runs
inside a fresh cgroup limited to the budget (cgroup v1:
``/sys/fs/cgroup/memory/NAME`` + ``memory.limit_in_bytes``; v2: ``memory.max``),
so going over the budget means the kernel's OOM killer acts, as on a real node.
distcomp then gets no ``--memory``: it finds the limit itself, as it would in a
container. Otherwise distcomp runs with ``--memory 1536M`` and GNU Parallel with
``--memfree`` only; the kernel OOM killer cannot act then and the output says so.

Per contender (median over rounds): makespan; tasks succeeded / failed; attempts
the runner itself killed (distcomp: preemptions; GNU Parallel: ``--memfree``
kills); attempts killed by a SIGKILL the runner did not send (the kernel); the
wall-clock seconds those killed attempts had run (work thrown away); the kernel's
OOM kill counters (``/proc/vmstat`` and the cgroup's ``memory.oom_control``);
the cgroup's peak memory. See benchmarks/README.md for how each is computed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.table import Table
from rich.text import Text

from distcomp.memory import oom_kills
from distcomp.store import Store

from .common import (
    PARALLEL_SKIPPED,
    Standing,
    Stopwatch,
    console,
    fmt_ratio,
    fmt_spread,
    fmt_summary,
    gnu_parallel,
    gnu_parallel_version,
    note,
    redis_server,
    result_row,
    rotated,
    summarize,
)
from .throughput import distcomp_command

MIB = 2**20
BUDGET = 1536 * MIB
SLOTS = 4
#: GNU Parallel's --memfree: start no job below this much free memory, kill the
#: youngest below half of it.
MEMFREE = "256M"
#: GNU Parallel reruns a failed or killed job up to this many times in all.
RETRIES = 3
#: What each distcomp task declares (the task-file column is in GiB).
DECLARED_GIB = 0.1
#: A run still going after this many seconds is a hang: everything it started is killed.
RUN_TIMEOUT = 180.0
MEMHOG = Path(__file__).resolve().parent.parent / "tests" / "memhog.py"
#: Resident memory of an idle Python interpreter, for the blind-run estimate only.
_PYTHON_BASE_MB = 10


class BenchError(RuntimeError):
    """A run failed in a way that gives no number (hang, runner crash, bad records)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Hog:
    """``memhog.py PEAK_MB GROW_S IDLE_S HOLD_S``: idle, grow linearly to the peak, hold."""

    peak_mb: int
    grow_s: float
    idle_s: float = 0.0
    hold_s: float = 0.5

    @property
    def duration(self) -> float:
        return self.idle_s + self.grow_s + self.hold_s

    def command(self) -> str:
        return (f"{sys.executable} {MEMHOG} {self.peak_mb} {self.grow_s:g} {self.idle_s:g} "
                f"{self.hold_s:g}")

    def rss_mb(self, t: float) -> float:
        """Approximate resident memory ``t`` seconds after start (20 equal steps)."""
        if t < self.idle_s:
            return _PYTHON_BASE_MB
        steps = min(20, int((t - self.idle_s) / (self.grow_s / 20)) + 1)
        return _PYTHON_BASE_MB + self.peak_mb * steps / 20


#: 13 growing tasks (200-800 MB over 2-2.5 s, some idle first) and 3 small flat ones.
#: The order is fixed (every runner gets the same list in the same order) and chosen so
#: that, started blind 4 at a time, the big ones overlap: about 2x the budget at once.
#: Run one at a time they take 42 s, so even a fully serialised run stays under a minute.
DEFAULT_TASKS: tuple[Hog, ...] = (
    Hog(800, 2, 0, 0.5), Hog(600, 2, 0, 0.5), Hog(750, 2.5, 0, 0.3), Hog(800, 2.5, 0, 0.3),
    Hog(200, 2, 1, 0.3), Hog(550, 2, 1, 0.3), Hog(30, 0.2, 0, 1.3), Hog(650, 2, 0.5, 0.3),
    Hog(300, 2, 0, 0.3), Hog(700, 2.5, 0, 0.3), Hog(30, 0.2, 0, 1.2), Hog(450, 2, 0.5, 0.3),
    Hog(30, 0.2, 0, 1.1), Hog(500, 2.5, 1, 0.3), Hog(400, 2, 0, 0.3), Hog(350, 2, 1.5, 0.3),
)
#: --quick: 6 growing and 2 flat (19 s one at a time).
QUICK_TASKS: tuple[Hog, ...] = (
    Hog(800, 2, 0, 0.5), Hog(700, 2, 0, 0.3), Hog(750, 2, 0, 0.3), Hog(600, 2, 0.5, 0.3),
    Hog(500, 2, 1, 0.3), Hog(30, 0.2, 0, 1.3), Hog(400, 2, 1, 0.3), Hog(30, 0.2, 0, 1.2),
)


def blind_peak_mb(tasks: tuple[Hog, ...], slots: int, step: float = 0.01) -> float:
    """Peak total memory if the tasks ran in list order on ``slots`` slots with no
    memory control at all (each started as soon as a slot frees up)."""
    free_at = [0.0] * slots
    spans: list[tuple[float, Hog]] = []
    for hog in tasks:
        slot = min(range(slots), key=free_at.__getitem__)
        spans.append((free_at[slot], hog))
        free_at[slot] += hog.duration
    peak, t, end = 0.0, 0.0, max(free_at)
    while t < end:
        total = sum(h.rss_mb(t - s) for s, h in spans if s <= t < s + h.duration)
        peak = max(peak, total)
        t += step
    return peak


def write_task_files(directory: Path, tasks: tuple[Hog, ...], wrapper: Path,
                     attempts_log: Path) -> tuple[Path, Path]:
    """(distcomp task file, GNU Parallel command file) for the same commands."""
    commands = [hog.command() for hog in tasks]
    if len(set(commands)) != len(commands):
        raise ValueError("task commands must be unique (distcomp drops duplicates)")
    dc = directory / "tasks.txt"
    dc.write_text("".join(f"shell:1:{DECLARED_GIB:g}:1:{c}\n" for c in commands))
    gp = directory / "parallel-commands.txt"
    gp.write_text("".join(f"/bin/bash {wrapper} {attempts_log} {i} {c}\n"
                          for i, c in enumerate(commands, 1)))
    return dc, gp


#: Wraps each GNU Parallel job to log every attempt (its joblog keeps only the last
#: attempt of a retried job). A TERM from Parallel (its --memfree kill, sent to the
#: whole process group) is logged as "term" once the task has died.
_ATTEMPT_WRAPPER = """\
log=$1; id=$2; shift 2
echo "start $id $EPOCHREALTIME" >> "$log"
trap 'echo "end $id $EPOCHREALTIME term" >> "$log"; exit 143' TERM
"$@"
rc=$?
echo "end $id $EPOCHREALTIME $rc" >> "$log"
exit $rc
"""


# --------------------------------------------------------------------------- cgroup


@dataclass
class MemoryBox:
    """Where a run's processes live: a fresh memory cgroup of the budget, or nothing."""

    path: Path | None
    why_not: str = ""

    def prefix(self) -> list[str]:
        """Command prefix that moves the process into the cgroup, then execs the rest."""
        if self.path is None:
            return []
        return ["/bin/sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "box"]

    def oom_kills(self) -> int | None:
        """The cgroup's own OOM-kill count (v1 ``memory.oom_control``, v2 ``memory.events``)."""
        if self.path is None:
            return None
        for name in ("memory.oom_control", "memory.events"):
            with contextlib.suppress(OSError, ValueError):
                for line in (self.path / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return None

    def peak_bytes(self) -> int | None:
        if self.path is None:
            return None
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int((self.path / name).read_text())
        return None

    def pids(self) -> list[int]:
        if self.path is None:
            return []
        with contextlib.suppress(OSError, ValueError):
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        return []


def _make_cgroup(limit: int) -> tuple[Path | None, str]:
    """A memory cgroup limited to ``limit`` bytes, or (None, why not)."""
    if os.geteuid() != 0:
        return None, "not root"
    name = f"dcbench-memory-{uuid.uuid4().hex[:8]}"
    candidates: list[tuple[Path, str]] = []
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    with contextlib.suppress(OSError):
        if "memory" in v2.read_text().split():
            candidates.append((Path("/sys/fs/cgroup") / name, "memory.max"))
    candidates.append((Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"))
    errors: list[str] = []
    for path, knob in candidates:
        try:
            path.mkdir()
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror}")
            continue
        try:
            (path / knob).write_text(str(limit))
            return path, ""
        except OSError as exc:
            errors.append(f"{path / knob}: {exc.strerror}")
            path.rmdir()
    return None, "cannot make a memory cgroup (" + "; ".join(errors) + ")"


@contextlib.contextmanager
def memory_box(limit: int, use_cgroup: bool) -> Iterator[MemoryBox]:
    """A fresh cgroup per run (its counters start at zero), removed afterwards."""
    if not use_cgroup:
        yield MemoryBox(None)
        return
    path, why = _make_cgroup(limit)
    box = MemoryBox(path, why)
    try:
        yield box
    finally:
        if path is not None:
            for pid in box.pids():  # only what this run started is left in there
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def cgroup_available() -> tuple[bool, str]:
    """Whether each run can get its own cgroup; (False, why) if not."""
    path, why = _make_cgroup(BUDGET)
    if path is None:
        return False, why
    path.rmdir()
    return True, ""


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One contender, one round."""

    makespan: float
    succeeded: int
    failed: int
    #: Attempts the runner killed to free memory (and requeued or gave up on).
    preempted: int
    #: Attempts killed by a SIGKILL the runner did not send.
    sigkilled: int
    #: Wall-clock seconds the killed attempts had run: work thrown away.
    lost_preempted_s: float
    lost_sigkilled_s: float
    #: Other failed attempts (non-zero exit, other signals).
    other_failed_attempts: int
    oom_vmstat: int
    oom_cgroup: int | None
    cgroup_peak_mib: float | None
    exit_code: int
    #: distcomp: the sum of the tasks' ``preempts`` fields (cross-check of ``preempted``).
    preempts_field: int | None = None
    #: Most attempts running at once, and the time-average number running (attempt
    #: seconds / makespan): how much of the 4 slots the runner dared to use.
    max_running: int = 0
    mean_running: float = 0.0
    failure_reasons: list[str] = field(default_factory=list)
    #: (start, end) of every attempt, seconds (not in the JSON).
    spans: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def lost_s(self) -> float:
        return self.lost_preempted_s + self.lost_sigkilled_s


def _wait(proc: subprocess.Popen[bytes], box: MemoryBox, timeout: float) -> int:
    """Wait for the run; on a hang kill it and everything it started, by pid."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pids = set(box.pids())
        with contextlib.suppress(psutil.Error):
            pids |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        pids.add(proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise BenchError(f"still running after {timeout:.0f}s (hang): killed") from None


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _is_kernel_kill(reason: str) -> bool:
    return "OOM killer" in reason or "SIGKILL" in reason


def run_distcomp(task_file: Path, n: int, extra: list[str], box: MemoryBox, log: Path,
                 timeout: float) -> RunResult:
    """``distcomp -v run FILE --cpus 4`` in the box against a private redis-server
    (outside the box); returns what the task records and the event stream say."""
    state = Path(tempfile.mkdtemp(prefix="dcbench-mem-", dir="/tmp"))
    try:
        with redis_server() as server:
            env = dict(os.environ, DISTCOMP_REDIS=server.url, DISTCOMP_QUEUE="default")
            argv = [*box.prefix(), *distcomp_command(), "-v", "--state-dir", str(state),
                    "run", str(task_file), "--cpus", str(SLOTS), "--no-progress", *extra]
            if box.path is None:
                argv += ["--memory", f"{BUDGET // MIB}M"]
            oom_before = oom_kills()
            with open(log, "wb") as err, Stopwatch() as sw:
                err.write(("$ " + " ".join(argv) + "\n").encode())
                err.flush()
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                        stdout=err, stderr=err)
                code = _wait(proc, box, timeout)
            oom_vmstat = oom_kills() - oom_before
            if code not in (0, 1):  # 1: some task failed, which is a result
                raise BenchError(f"`distcomp run` exited {code}", _tail(log))
            try:
                result = _distcomp_records(server.url, n)
            except BenchError as exc:  # e.g. `distcomp` crashed before submitting
                raise BenchError(f"`distcomp run` exited {code}: {exc}", _tail(log)) from None
    finally:
        shutil.rmtree(state, ignore_errors=True)
    result.makespan = sw.seconds
    result.max_running, result.mean_running = _concurrency(result.spans, result.makespan)
    result.exit_code = code
    result.oom_vmstat = oom_vmstat
    result.oom_cgroup = box.oom_kills()
    peak = box.peak_bytes()
    result.cgroup_peak_mib = None if peak is None else peak / MIB
    return result


def _concurrency(spans: list[tuple[float, float]], makespan: float) -> tuple[int, float]:
    """(most spans open at once, total span length / makespan)."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = running = 0
    for _, delta in edges:
        running += delta
        most = max(most, running)
    total = sum(b - a for a, b in spans)
    return most, (total / makespan if makespan > 0 else 0.0)


def _stream_ms(event_id: str) -> int:
    return int(event_id.split("-", 1)[0])


def _distcomp_records(url: str, n: int) -> RunResult:
    """Task states and ``preempts`` from the task hashes; every attempt from the event
    stream: a ``claim`` opens it, the task's next succeeded / requeue / retry / failed
    event closes it, and the time between the two (stream ids are the server's clock
    in ms) is how long it ran."""
    store = Store(url, "default")
    try:
        ids = [tid for job in store.jobs() for tid in store.task_ids_of_job(job.id)]
        rows = store.tasks(ids, fields=["state", "preempts", "reason", "signal"])
        events = store.events(count=1_000_000)
    finally:
        store.close()
    if len(rows) != n:
        raise BenchError(f"expected {n} task records, found {len(rows)}")
    states: dict[str, int] = {}
    for r in rows:
        states[r.get("state", "?")] = states.get(r.get("state", "?"), 0) + 1
    if states.get("succeeded", 0) + states.get("failed", 0) != n:
        raise BenchError(f"the run ended with tasks not finished: {states}")
    result = RunResult(makespan=0.0, succeeded=states.get("succeeded", 0),
                       failed=states.get("failed", 0), preempted=0, sigkilled=0,
                       lost_preempted_s=0.0, lost_sigkilled_s=0.0, other_failed_attempts=0,
                       oom_vmstat=0, oom_cgroup=None, cgroup_peak_mib=None, exit_code=0,
                       preempts_field=sum(int(r.get("preempts") or 0) for r in rows))
    result.failure_reasons = sorted({f"{r['id']}: {r.get('reason', '')}" for r in rows
                                     if r.get("state") == "failed"})
    opened: dict[str, int] = {}
    for event in events:
        kind, tid, at = event.get("type"), event.get("task", ""), _stream_ms(event["id"])
        if kind == "claim":
            opened[tid] = at
            continue
        if kind not in ("succeeded", "requeue", "retry", "failed", "reaped"):
            continue
        start = opened.pop(tid, None)
        if start is None:
            continue
        result.spans.append((start / 1000, at / 1000))
        if kind == "succeeded":
            continue
        ran = (at - start) / 1000
        reason = event.get("reason", "")
        if "preempted" in reason:
            result.preempted += 1
            result.lost_preempted_s += ran
        elif _is_kernel_kill(reason):
            result.sigkilled += 1
            result.lost_sigkilled_s += ran
        else:
            result.other_failed_attempts += 1
    return result


def run_parallel(path: str, commands: Path, n: int, attempts_log: Path, box: MemoryBox,
                 log: Path, timeout: float) -> RunResult:
    """``parallel -j4 --memfree 256M --retries 3`` in the box; attempts from the wrapper
    log, final outcomes from ``--joblog``."""
    attempts_log.write_text("")
    joblog = log.with_suffix(".joblog")
    argv = [*box.prefix(), path, "--will-cite", f"-j{SLOTS}", "--memfree", MEMFREE,
            "--retries", str(RETRIES), "--joblog", str(joblog), "::::", str(commands)]
    oom_before = oom_kills()
    with open(log, "wb") as err, Stopwatch() as sw:
        err.write(("$ " + " ".join(argv) + "\n").encode())
        err.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
        code = _wait(proc, box, timeout)
    oom_vmstat = oom_kills() - oom_before
    final: dict[int, int] = {}
    for line in joblog.read_text().splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 9:
            seq, exitval, sig = int(cols[0]), int(cols[6]), int(cols[7])
            final[seq] = exitval if sig == 0 else 128 + sig
    if len(final) != n:
        raise BenchError(f"GNU Parallel exited {code} with {len(final)} of {n} jobs in its "
                         "joblog", _tail(log))
    result = RunResult(makespan=sw.seconds, succeeded=sum(1 for v in final.values() if v == 0),
                       failed=sum(1 for v in final.values() if v != 0), preempted=0,
                       sigkilled=0, lost_preempted_s=0.0, lost_sigkilled_s=0.0,
                       other_failed_attempts=0, oom_vmstat=oom_vmstat,
                       oom_cgroup=box.oom_kills(), cgroup_peak_mib=None, exit_code=code)
    peak = box.peak_bytes()
    result.cgroup_peak_mib = None if peak is None else peak / MIB
    result.failure_reasons = [f"job {seq}: exit {v}" + (" (SIGKILL)" if v == 137 else "")
                              for seq, v in sorted(final.items()) if v != 0]
    started: dict[str, float] = {}
    for line in attempts_log.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        what, tid, at = parts[0], parts[1], float(parts[2])
        if what == "start":
            started[tid] = at
            continue
        start = started.pop(tid, None)
        status = parts[3] if len(parts) > 3 else "?"
        if start is None:
            continue
        result.spans.append((start, at))
        if status == "0":
            continue
        ran = at - start
        if status in ("term", "143"):  # Parallel's own --memfree kill
            result.preempted += 1
            result.lost_preempted_s += ran
        elif status == "137":  # SIGKILL; Parallel only sends TERM to a job that dies of it
            result.sigkilled += 1
            result.lost_sigkilled_s += ran
        else:
            result.other_failed_attempts += 1
    result.max_running, result.mean_running = _concurrency(result.spans, result.makespan)
    return result


# --------------------------------------------------------------------------- driver


@dataclass
class Contender(Standing):
    key: str
    label: str
    runs: list[RunResult] = field(default_factory=list)


#: (key, label, extra `distcomp run` options). The victim policy only matters when the
#: guard preempts, which growth-aware admission mostly avoids: so every policy is also
#: run under instant admission, where preemption is the guard's main tool.
DISTCOMP_VARIANTS: tuple[tuple[str, str, list[str]], ...] = (
    ("default", "distcomp growth+youngest (default)", []),
    ("most_over", "distcomp growth+most-over-request", ["--victim-policy", "most-over-request"]),
    ("fastest", "distcomp growth+fastest-growing", ["--victim-policy", "fastest-growing"]),
    ("instant", "distcomp instant+youngest", ["--admission", "instant"]),
    ("instant_most_over", "distcomp instant+most-over-request",
     ["--admission", "instant", "--victim-policy", "most-over-request"]),
    ("instant_fastest", "distcomp instant+fastest-growing",
     ["--admission", "instant", "--victim-policy", "fastest-growing"]),
)


def run(*, quick: bool = False, repeat: int = 3) -> dict[str, Any]:
    tasks = QUICK_TASKS if quick else DEFAULT_TASKS
    rounds = 1 if quick else repeat
    n = len(tasks)
    parallel = gnu_parallel()
    use_cgroup, why_not = cgroup_available()
    blind = blind_peak_mb(tasks, SLOTS)
    peaks = sum(h.peak_mb for h in tasks)
    budget_mib = BUDGET // MIB
    if use_cgroup:
        where = (f"each run in its own memory cgroup of {budget_mib} MiB (going over it "
                 "means the kernel OOM killer acts); distcomp finds the limit itself")
    else:
        where = (f"NO cgroup ({why_not}): distcomp gets --memory {budget_mib}M and GNU "
                 f"Parallel only --memfree {MEMFREE}; nothing enforces the budget, so the "
                 "kernel OOM killer cannot act and over-budget runs are not punished")
    growing = [h.peak_mb for h in tasks if h.peak_mb > 100]
    note(f"[bold]memory[/]: {n} tasks ({len(growing)} growing to {min(growing)}-{max(growing)} "
         f"MB, the rest flat ~30 MB), each declaring {DECLARED_GIB:g} GiB to distcomp; "
         f"budget {budget_mib} MiB, {SLOTS} slots, {rounds} round(s), order rotates")
    note(f"sum of peaks {peaks / 1024:.1f} GiB ({peaks / budget_mib:.1f}x budget); run "
         f"blind in list order on {SLOTS} slots the total would peak near {blind:,.0f} MiB "
         f"({blind / budget_mib:.2f}x budget)")
    note(where)

    contenders = [Contender(key, label) for key, label, _ in DISTCOMP_VARIANTS]
    extras = {key: extra for key, _, extra in DISTCOMP_VARIANTS}
    peer = Contender("parallel", f"parallel -j{SLOTS} --memfree {MEMFREE} --retries {RETRIES}")
    if parallel is None:
        peer.skipped = PARALLEL_SKIPPED
    contenders.append(peer)

    workdir = Path(tempfile.mkdtemp(prefix="dcbench-memory-", dir="/tmp"))
    logdir = workdir / "logs"
    logdir.mkdir()
    anomalies: list[str] = []
    try:
        wrapper = workdir / "attempt.sh"
        wrapper.write_text(_ATTEMPT_WRAPPER)
        attempts_log = workdir / "attempts.log"
        dc_file, gp_file = write_task_files(workdir, tasks, wrapper, attempts_log)

        def step_for(contender: Contender, rep: int) -> Callable[[MemoryBox], RunResult]:
            log = logdir / f"{contender.key}-round{rep + 1}.log"
            if contender is peer:
                assert parallel is not None
                return lambda box: run_parallel(parallel, gp_file, n, attempts_log, box, log,
                                                RUN_TIMEOUT)
            return lambda box: run_distcomp(dc_file, n, extras[contender.key], box, log,
                                            RUN_TIMEOUT)

        for rep in range(rounds):
            for contender in rotated(contenders, rep):
                if not contender.active:
                    continue
                with memory_box(BUDGET, use_cgroup) as box:
                    if use_cgroup and box.path is None:
                        raise RuntimeError(f"could not make a cgroup for this run: "
                                           f"{box.why_not}")
                    try:
                        result = step_for(contender, rep)(box)
                    except BenchError as exc:
                        contender.error = f"round {rep + 1}: {exc}"
                        contender.error_detail = exc.detail
                        anomalies.append(f"{contender.label}: {contender.error}")
                        continue
                contender.runs.append(result)
                if contender is not peer and (result.failed or result.sigkilled
                                              or result.oom_cgroup):
                    anomalies.append(
                        f"{contender.label}, round {rep + 1}: {result.failed} failed, "
                        f"{result.sigkilled} attempts SIGKILLed by the kernel, cgroup OOM "
                        f"kills {result.oom_cgroup}; log: "
                        f"{logdir / f'{contender.key}-round{rep + 1}.log'}")
                note(f"[dim]round {rep + 1}: {contender.label}: {result.makespan:.1f}s, "
                     f"{result.succeeded}/{n} ok, {result.preempted} runner kills, "
                     f"{result.sigkilled} kernel kills[/]")
    finally:
        keep = bool(anomalies) or bool(os.environ.get("DCBENCH_KEEP_LOGS"))
        if keep:
            for leftover in (workdir / "tasks.txt", workdir / "parallel-commands.txt"):
                leftover.unlink(missing_ok=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return _report(tasks, rounds, contenders, peer, use_cgroup, why_not, blind,
                   gnu_parallel_version(parallel) if parallel else None,
                   str(logdir) if keep else None, anomalies)


def _print_table(title: str, columns: list[str], rows: list[list[str]], caption: str) -> None:
    """common.print_table, but the runner column never wraps (its labels are long)."""
    table = Table(title=Text(title, style="bold"), caption=Text(caption),
                  caption_justify="left")
    for i, name in enumerate(columns):
        if i == 0:
            table.add_column(Text(name), justify="left", no_wrap=True)
        else:
            table.add_column(Text(name), justify="right", overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


def _report(tasks: tuple[Hog, ...], rounds: int, contenders: list[Contender],
            peer: Contender, use_cgroup: bool, why_not: str, blind: float,
            parallel_version: str | None, logdir: str | None,
            anomalies: list[str]) -> dict[str, Any]:
    n = len(tasks)
    p_make = summarize([r.makespan for r in peer.runs]) if peer.active and peer.runs else None
    default = contenders[0]
    d_make = (summarize([r.makespan for r in default.runs])
              if default.active and default.runs else None)

    def cell_int(values: list[float]) -> str:
        s = summarize(values)
        text = f"{s.median:g}"
        return text + (f" [{s.low:g}, {s.high:g}]" if s.low != s.high else "")

    rows: list[list[str]] = []
    outcome_rows: list[list[str]] = []
    results: dict[str, Any] = {}
    for c in contenders:
        if not c.active or not c.runs:
            text = c.skipped or f"error: {c.error}"[:240]
            rows.append([c.label, text, *["-"] * 5])
            outcome_rows.append([c.label, text, *["-"] * 6])
            results[c.key] = {"label": c.label, "skipped": c.skipped, "error": c.error}
            continue
        runs = c.runs
        make = summarize([r.makespan for r in runs])
        lost = summarize([r.lost_s for r in runs])
        vs_parallel = make.median / p_make.median if p_make else None
        vs_default = make.median / d_make.median if d_make else None
        oom_cg = [r.oom_cgroup for r in runs if r.oom_cgroup is not None]
        peak = [r.cgroup_peak_mib for r in runs if r.cgroup_peak_mib is not None]
        rows.append([
            c.label,
            fmt_summary(make, 1),
            fmt_spread(make),
            fmt_ratio(vs_parallel),
            fmt_ratio(vs_default),
            cell_int([r.max_running for r in runs]),
            fmt_summary(summarize([r.mean_running for r in runs]), 1),
        ])
        outcome_rows.append([
            c.label,
            cell_int([r.succeeded for r in runs]),
            cell_int([r.failed for r in runs]),
            cell_int([r.preempted for r in runs]),
            cell_int([r.sigkilled for r in runs]),
            cell_int([float(x) for x in oom_cg]) if oom_cg else "-",
            fmt_summary(lost, 1),
            fmt_summary(summarize(peak), 0) if peak else "-",
        ])
        results[c.key] = {
            "label": c.label,
            "makespan_s": make.as_dict(),
            "makespan_vs_parallel": vs_parallel,
            "makespan_vs_distcomp_default": vs_default,
            "succeeded": summarize([r.succeeded for r in runs]).as_dict(),
            "failed": summarize([r.failed for r in runs]).as_dict(),
            "runner_kills": summarize([r.preempted for r in runs]).as_dict(),
            "work_lost_s": lost.as_dict(),
            "kernel_sigkills": summarize([r.sigkilled for r in runs]).as_dict(),
            "cgroup_oom_kills": summarize([float(x) for x in oom_cg]).as_dict() if oom_cg else None,
            "cgroup_peak_mib": summarize(peak).as_dict() if peak else None,
            "max_running": summarize([r.max_running for r in runs]).as_dict(),
            "mean_running": summarize([r.mean_running for r in runs]).as_dict(),
            "runs": [{k: v for k, v in asdict(r).items() if k != "spans"} | {"lost_s": r.lost_s}
                     for r in runs],
        }

    budget_mib = BUDGET // MIB
    title = (f"memory: {n} growing/flat tasks, budget {budget_mib} MiB, {SLOTS} slots, "
             f"{rounds} round(s), " + ("cgroup-enforced" if use_cgroup
                                       else "NOT enforced (no cgroup)"))
    _print_table(
        title + ": time",
        ["runner", "makespan s", "spread", "vs parallel", "vs default", "max running",
         "mean running"],
        rows,
        caption="Medians over rounds [min, max]; spread = (max - min) / median. vs "
                "parallel / vs default: makespan divided by GNU Parallel's / distcomp "
                "default's (< 1 = shorter; read with the failures below). max running: most "
                "attempts at once; mean running: attempt-seconds per second of makespan "
                f"(of {SLOTS} slots).",
    )
    _print_table(
        title + ": outcome",
        ["runner", "tasks ok", "tasks failed", "runner kills", "kernel kills",
         "cgroup OOM kills", "work lost s", "cgroup peak MiB"],
        outcome_rows,
        caption="runner kills: attempts the runner stopped to free memory (distcomp "
                "preemptions; Parallel --memfree kills). kernel kills: attempts that died of "
                "a SIGKILL the runner did not send; cgroup OOM kills: the cgroup's oom_kill "
                "counter. work lost: seconds the killed attempts had run (runner and kernel "
                "kills). cgroup peak: max_usage_in_bytes (tasks, runner, page cache).",
    )
    def medians(key: str) -> tuple[float, float, float] | None:
        data = results.get(key, {})
        if "makespan_s" not in data:
            return None
        return (data["makespan_s"]["median"], data["runner_kills"]["median"],
                data["work_lost_s"]["median"])

    for admission, keys in (("growth", ("default", "most_over", "fastest")),
                            ("instant", ("instant", "instant_most_over", "instant_fastest"))):
        parts = []
        for key, policy in zip(keys, ("youngest", "most-over-request", "fastest-growing"),
                               strict=True):
            m = medians(key)
            if m is not None:
                parts.append(f"{policy} {m[0]:.1f}s, {m[1]:g} preempted, {m[2]:.1f}s lost")
        if parts:
            note(f"victim policies under {admission} admission (median makespan, "
                 f"preemptions, work lost): " + "; ".join(parts))
    vm = {c.key: sum(r.oom_vmstat for r in c.runs) for c in contenders if c.runs}
    note("/proc/vmstat oom_kill moved during the runs (node-wide: counts any process on "
         "the machine, all rounds): "
         + ", ".join(f"{c.label}: {vm[c.key]}" for c in contenders if c.key in vm))
    if use_cgroup and peer.runs:
        note(f"note: GNU Parallel's --memfree reads system-wide /proc/meminfo (MemFree + "
             f"Buffers + Cached), {psutil.virtual_memory().available / 2**30:.1f} GiB "
             f"available here, and cannot see the {budget_mib} MiB cgroup: inside it, "
             "--memfree never holds a job back or kills one; only the kernel does.")
    for c in contenders:
        mismatch = [(r.preempted, r.preempts_field) for r in c.runs
                    if r.preempts_field is not None and r.preempts_field != r.preempted]
        if mismatch:
            note(f"[yellow]{c.label}: preemptions from the event stream vs the tasks' "
                 f"preempts fields differ: {mismatch}[/]")
        reasons = sorted({x for r in c.runs for x in r.failure_reasons})
        if reasons:
            note(f"{c.label}: failed tasks: " + "; ".join(reasons[:8])
                 + (" ..." if len(reasons) > 8 else ""))
        if c.error:
            note(f"[red]{c.label} failed[/] ({c.error}); its output ends:")
            console.print(Text("\n".join("    " + line
                                         for line in c.error_detail.splitlines()[-15:])))
    if logdir:
        note(f"run logs (distcomp -v stderr, GNU Parallel stderr and joblog) kept in {logdir}")
    ratios = {c.key: results[c.key].get("makespan_vs_parallel") for c in contenders
              if c.key != "parallel"}
    rows: list[dict[str, Any]] = []
    d_values = results.get("default", {}).get("makespan_s", {}).get("values")
    for c in contenders:
        data = results[c.key]
        values = data.get("makespan_s", {}).get("values")
        ratio = None
        if c.key == "parallel" and values and d_values:
            ratio = summarize(d_values).median / summarize(values).median
        why = data.get("skipped") or (f"error: {data['error']}"[:160] if data.get("error")
                                      else None)
        rows.append(result_row("memory", c.label, "makespan", summarize(values) if values
                               else None, "s", ratio=ratio,
                               ratio_of="default guard" if ratio else None, skipped=why))
        if values:
            rows.append(result_row("memory", c.label, "tasks failed",
                                   summarize(data["failed"]["values"]), "tasks"))
    return {
        "benchmark": "memory",
        "rows": rows,
        "config": {"tasks": [asdict(h) for h in tasks], "budget_bytes": BUDGET,
                   "slots": SLOTS, "rounds": rounds, "declared_gib": DECLARED_GIB,
                   "memfree": MEMFREE, "retries": RETRIES, "cgroup": use_cgroup,
                   "cgroup_unavailable_because": why_not or None,
                   "sum_of_peaks_mb": sum(h.peak_mb for h in tasks),
                   "blind_peak_mib_estimate": blind},
        "parallel_version": parallel_version,
        "results": results,
        "ratios": {"makespan_vs_parallel": ratios},
        "anomalies": anomalies,
        "logs": logdir,
        "errors": {c.key: {"error": c.error, "output": c.error_detail}
                   for c in contenders if c.error},
    }
