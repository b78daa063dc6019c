"""Throughput on no-op tasks: how much does distcomp add per task, next to its peers?

N no-op shell tasks (``true``; default 2,000, ``--quick`` 300) on as many slots as
cores (``SLOTS``; 2 here), run by:

* **distcomp**: ``distcomp --state-dir TMP run FILE --cpus 2 --no-progress`` as
  a subprocess, with a fresh state directory each time, so the time includes
  interpreter start-up, starting the embedded redis-server (AOF on, as users get
  it), parsing and submitting the file, running every task with its log files,
  and reading the summary. A second number comes from the task records: the
  job's ``submitted_at`` to the last task's ``finished_at`` (server clock), i.e.
  the scheduling loop alone, without start-up.
* **GNU Parallel**: ``seq N | parallel --will-cite -j2 true`` (skipped, never
  faked, when GNU Parallel is not installed).
* **spawn floor**: a Python loop that ``posix_spawn``s ``/bin/sh -c true``
  keeping 2 running: the physical limit of starting a shell per task here.

Also timed: a 1-task distcomp run (its fixed start-up cost). Runs rotate order
each repetition. Reports tasks/s, the throughput ratio distcomp/parallel, and
distcomp's overhead per task above the floor in microseconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text

from distcomp.server import embedded_paths, embedded_running, stop_embedded
from distcomp.store import Store

from .common import (
    PARALLEL_SKIPPED,
    Standing,
    Stopwatch,
    Summary,
    console,
    fmt_ratio,
    fmt_spread,
    fmt_summary,
    gnu_parallel,
    gnu_parallel_version,
    note,
    print_table,
    redis_server_binary,
    redis_server_version,
    result_row,
    rotated,
    summarize,
)

DEFAULT_TASKS = 2000
QUICK_TASKS = 300
#: As many slots as cores, as issue 7 asks (2 on the reference machine).
SLOTS = os.cpu_count() or 1


class BenchError(RuntimeError):
    """A contender failed or produced a wrong result; its number is not reported."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@dataclass
class Contender(Standing):
    key: str
    label: str
    tasks: int
    seconds: list[float] = field(default_factory=list)
    #: Scheduling-only seconds (distcomp: submit -> last completion from task records).
    inner_seconds: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- distcomp


def distcomp_command() -> list[str]:
    """The CLI through this interpreter (a pyenv/venv shim would add its own start-up)."""
    return [sys.executable, "-m", "distcomp"]


def write_task_file(directory: Path, n: int) -> Path:
    """Line format ``type:priority:mem_GB:cpus:command``; ``true`` ignores its argument,
    which only makes each line unique (identical lines would be deduplicated)."""
    path = directory / f"noop-{n}.txt"
    path.write_text("".join(f"shell:0:0:1:true {i}\n" for i in range(n)))
    return path


def _stop_server(state: Path) -> None:
    """Shut the embedded server of ``state`` down; kill it by its pidfile if it will not go."""
    paths = embedded_paths(state)
    with contextlib.suppress(Exception):
        stop_embedded(state)
    if not embedded_running(state):
        return
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError,
                             PermissionError):
        os.kill(int(paths.pidfile.read_text().strip()), signal.SIGKILL)


def run_distcomp(task_file: Path, n: int, slots: int = SLOTS) -> tuple[float, float]:
    """(whole command seconds, submit-to-last-completion seconds); raises BenchError.

    Shared with the packing scenario: the same command a user types, timed from
    outside, plus the scheduling window read from the task records."""
    state = Path(tempfile.mkdtemp(prefix="dcbench-", dir="/tmp"))
    try:
        argv = [*distcomp_command(), "--state-dir", str(state), "run", str(task_file),
                "--cpus", str(slots), "--no-progress"]
        env = dict(os.environ)
        env.pop("DISTCOMP_REDIS", None)  # always the private embedded server in `state`
        env.pop("DISTCOMP_QUEUE", None)
        env["DISTCOMP_REDIS_SERVER"] = redis_server_binary()
        with Stopwatch() as sw:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                                  stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            output = proc.stderr.strip() or proc.stdout.strip()
            raise BenchError(f"`distcomp run` exited {proc.returncode}: {_last_line(output)}",
                             output[-6000:])
        return sw.seconds, _scheduling_seconds(state, n)
    finally:
        _stop_server(state)
        shutil.rmtree(state, ignore_errors=True)


def _scheduling_seconds(state: Path, n: int) -> float:
    """Check every task succeeded; return job submit -> last task finish (server clock)."""
    store = Store(embedded_paths(state).url, "default")
    try:
        jobs = store.jobs()
        ids = [tid for job in jobs for tid in store.task_ids_of_job(job.id)]
        rows = store.tasks(ids, fields=["state", "finished_at"])
    finally:
        store.close()
    succeeded = [r for r in rows if r.get("state") == "succeeded"]
    if len(succeeded) != n:
        states: dict[str, int] = {}
        for r in rows:
            states[r.get("state", "?")] = states.get(r.get("state", "?"), 0) + 1
        raise BenchError(f"expected {n} succeeded tasks, task records say {states}")
    submitted = min(job.submitted_at for job in jobs)
    finished = max(int(r["finished_at"]) for r in succeeded)
    return (finished - submitted) / 1000


# --------------------------------------------------------------------------- peers


def run_parallel(path: str, n: int) -> float:
    command = f"seq {n} | {path} --will-cite -j{SLOTS} true"
    with Stopwatch() as sw:
        proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                              check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BenchError(f"`{command}` exited {proc.returncode}: {_last_line(proc.stderr)}",
                         proc.stderr[-6000:])
    return sw.seconds


def run_floor(n: int) -> float:
    """posix_spawn ``/bin/sh -c true``, SLOTS at a time, reaping with os.wait()."""
    argv = ["/bin/sh", "-c", "true"]
    env = dict(os.environ)
    running: set[int] = set()
    started = failed = 0
    with Stopwatch() as sw:
        while started < n or running:
            while started < n and len(running) < SLOTS:
                running.add(os.posix_spawn("/bin/sh", argv, env))
                started += 1
            pid, status = os.wait()
            if pid in running:
                running.discard(pid)
                if os.waitstatus_to_exitcode(status) != 0:
                    failed += 1
    if failed:
        raise BenchError(f"{failed} of {n} floor processes failed")
    return sw.seconds


# --------------------------------------------------------------------------- driver


def run(*, quick: bool = False, repeat: int = 3) -> dict[str, Any]:
    """Rounds alternate the contenders (order rotating), so drift hits all alike."""
    n = QUICK_TASKS if quick else DEFAULT_TASKS
    parallel = gnu_parallel()
    binary = redis_server_binary()
    note(f"[bold]throughput[/]: {n:,} no-op tasks, {SLOTS} slots, {repeat} rounds "
         f"(order rotates each round); distcomp's embedded server: {binary} "
         f"{redis_server_version(binary)}")
    distcomp = Contender("distcomp", "distcomp run (whole command)", n)
    peer = Contender("parallel", f"GNU parallel -j{SLOTS}", n)
    floor = Contender("floor", f"spawn floor (posix_spawn sh -c true, {SLOTS} at a time)", n)
    startup = Contender("startup", "distcomp run, 1 task (fixed start-up)", 1)
    if parallel is None:
        peer.skipped = PARALLEL_SKIPPED
    workdir = Path(tempfile.mkdtemp(prefix="dcbench-files-", dir="/tmp"))
    try:
        big_file = write_task_file(workdir, n)
        one_file = write_task_file(workdir, 1)

        def do_distcomp() -> None:
            total, inner = run_distcomp(big_file, n)
            distcomp.seconds.append(total)
            distcomp.inner_seconds.append(inner)

        def do_startup() -> None:
            total, inner = run_distcomp(one_file, 1)
            startup.seconds.append(total)
            startup.inner_seconds.append(inner)

        def do_parallel() -> None:
            assert parallel is not None
            peer.seconds.append(run_parallel(parallel, n))

        def do_floor() -> None:
            floor.seconds.append(run_floor(n))

        steps: list[tuple[Contender, Callable[[], None]]] = [
            (distcomp, do_distcomp), (peer, do_parallel), (floor, do_floor),
            (startup, do_startup)]
        for rep in range(repeat):
            for contender, step in rotated(steps, rep):
                if not contender.active:
                    continue
                try:
                    step()
                except BenchError as exc:
                    contender.error = f"round {rep + 1}: {exc}"
                    contender.error_detail = exc.detail
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(n, repeat, distcomp, peer, floor, startup,
                   gnu_parallel_version(parallel) if parallel else None)


def _rate(summary: Summary | None, tasks: int) -> float | None:
    return None if summary is None else tasks / summary.median


def _report(n: int, repeat: int, distcomp: Contender, peer: Contender, floor: Contender,
            startup: Contender, parallel_version: str | None) -> dict[str, Any]:
    def summary(values: list[float], contender: Contender) -> Summary | None:
        return summarize(values) if contender.active and values else None

    d_total = summary(distcomp.seconds, distcomp)
    d_inner = summary(distcomp.inner_seconds, distcomp)
    p_total = summary(peer.seconds, peer)
    f_total = summary(floor.seconds, floor)
    s_total = summary(startup.seconds, startup)
    p_rate = _rate(p_total, n)
    f_med = f_total.median if f_total else None

    def row(label: str, contender: Contender, s: Summary | None, tasks: int,
            compare: bool) -> tuple[list[str], dict[str, Any]]:
        if contender.skipped or contender.error:
            text = contender.skipped or f"error: {contender.error}"[:240]
            return ([label, text, "-", "-", "-", "-"],
                    {"label": label, "skipped": contender.skipped, "error": contender.error})
        assert s is not None
        rate = tasks / s.median
        rates = summarize([tasks / v for v in s.values])
        vs_parallel = rate / p_rate if compare and p_rate else None
        overhead = ((s.median - f_med) / tasks * 1e6 if compare and f_med is not None
                    else None)
        cells = [label, fmt_summary(s, 3), fmt_spread(s),
                 f"{rate:,.0f}" if compare else "-",
                 fmt_ratio(vs_parallel) if compare else "-",
                 f"{overhead:,.0f}" if overhead is not None else "-"]
        data = {"label": label, "tasks": tasks, "seconds": s.as_dict(),
                "tasks_per_s": rates.as_dict(), "throughput_vs_parallel": vs_parallel,
                "overhead_us_per_task_above_floor": overhead}
        return cells, data

    table_rows: list[list[str]] = []
    results: dict[str, Any] = {}
    for key, label, contender, s, tasks, compare in (
        ("distcomp", distcomp.label, distcomp, d_total, n, True),
        ("distcomp_scheduling", "distcomp submit→last completion (task records)", distcomp,
         d_inner, n, True),
        ("parallel", peer.label, peer, p_total, n, True),
        ("floor", floor.label, floor, f_total, n, True),
        ("startup", startup.label, startup, s_total, 1, False),
    ):
        cells, data = row(label, contender, s, tasks, compare)
        table_rows.append(cells)
        results[key] = data

    print_table(
        f"throughput: {n:,} no-op tasks on {SLOTS} slots, {repeat} rounds",
        ["runner", "seconds", "spread", "tasks/s", "throughput vs parallel",
         "µs/task above floor"],
        table_rows,
        caption="seconds: median over rounds [min, max]; spread = (max - min) / median; "
                "tasks/s = tasks / median seconds. Throughput vs parallel > 1 means "
                "faster than GNU Parallel.",
    )
    ratios: dict[str, float | None] = {}
    if d_total and p_rate:
        ratios["distcomp_over_parallel"] = (n / d_total.median) / p_rate
        ratios["distcomp_scheduling_over_parallel"] = (
            (n / d_inner.median) / p_rate if d_inner else None)
        note(f"throughput ratio distcomp/parallel = "
             f"{fmt_ratio(ratios['distcomp_over_parallel'])} (whole command), "
             f"{fmt_ratio(ratios['distcomp_scheduling_over_parallel'])} "
             f"(submit→last completion)")
    elif peer.skipped:
        note(f"throughput ratio distcomp/parallel: n/a, GNU parallel {peer.skipped}")
    if d_total and f_total:
        per_task = (d_total.median - f_total.median) / n * 1e6
        ratios["distcomp_overhead_us_per_task"] = per_task
        line = f"distcomp overhead above the spawn floor: {per_task:,.0f} µs/task"
        if s_total:
            marginal = (d_total.median - s_total.median - f_total.median) / n * 1e6
            ratios["distcomp_overhead_us_per_task_without_startup"] = marginal
            line += (f"; {marginal:,.0f} µs/task after subtracting the 1-task run's "
                     f"{s_total.median:.2f}s start-up")
        note(line)
    rows = _summary_rows(n, distcomp, peer, floor, startup, d_total, d_inner, p_total,
                         f_total, s_total)
    for contender in (distcomp, peer, floor, startup):
        if contender.error:
            note(f"[red]{contender.label} failed[/] ({contender.error}); its output ends:")
            tail = contender.error_detail.splitlines()[-12:]
            console.print(Text("\n".join("    " + line for line in tail)))
    return {"benchmark": "throughput", "config": {"tasks": n, "slots": SLOTS, "rounds": repeat},
            "parallel_version": parallel_version, "results": results, "ratios": ratios,
            "redis_server": redis_server_binary(), "rows": rows,
            "errors": {c.key: {"error": c.error, "output": c.error_detail}
                       for c in (distcomp, peer, floor, startup) if c.error}}


def _summary_rows(n: int, distcomp: Contender, peer: Contender, floor: Contender,
                  startup: Contender, d_total: Summary | None, d_inner: Summary | None,
                  p_total: Summary | None, f_total: Summary | None,
                  s_total: Summary | None) -> list[dict[str, Any]]:
    """The runner's rows: tasks/s for both distcomp windows and the peers, the
    overhead per task above the floor, and the fixed start-up."""
    def rate(s: Summary | None) -> Summary | None:
        return None if s is None else summarize([n / v for v in s.values])

    def why(c: Contender) -> str | None:
        return c.skipped or (f"error: {c.error}"[:160] if c.error else None)

    d_rate, i_rate, p_rate, f_rate = rate(d_total), rate(d_inner), rate(p_total), rate(f_total)
    rows = [
        result_row("shell", "distcomp", "tasks/s, whole `distcomp run` command", d_rate,
                   "tasks/s", skipped=why(distcomp)),
        result_row("shell", "distcomp", "tasks/s, submit→last completion", i_rate,
                   "tasks/s", skipped=why(distcomp)),
        result_row("shell", f"GNU parallel -j{SLOTS}", "tasks/s, whole command", p_rate,
                   "tasks/s", skipped=why(peer),
                   ratio=d_rate.median / p_rate.median if d_rate and p_rate else None,
                   ratio_of="whole command"),
        result_row("shell", "spawn floor", "tasks/s, posix_spawn loop", f_rate, "tasks/s",
                   skipped=why(floor),
                   ratio=d_rate.median / f_rate.median if d_rate and f_rate else None,
                   ratio_of="whole command"),
    ]
    if d_total and f_total:
        floor_med = f_total.median
        rows.append(result_row(
            "shell", "distcomp", "overhead above floor, whole command",
            summarize([(v - floor_med) / n * 1e6 for v in d_total.values]), "µs/task"))
    if d_inner and f_total:
        floor_med = f_total.median
        rows.append(result_row(
            "shell", "distcomp", "overhead above floor, submit→last completion",
            summarize([(v - floor_med) / n * 1e6 for v in d_inner.values]), "µs/task"))
    rows.append(result_row("shell", "distcomp", "start-up: 1-task `distcomp run`", s_total,
                           "s", skipped=why(startup)))
    return rows
