"""Sleep packing: do short tasks keep every slot busy?

200 tasks of ``sleep 0.2`` (``--quick``: 40) on 8 slots. Ideal makespan =
tasks x 0.2 s / 8 (5 s; 1 s quick): anything above it is time a slot sat idle
between tasks (claim latency, start-up, reaping) or start-up of the runner.
Sleeping tasks need no CPU, so 8 slots on 2 cores is fair to every runner.

* **distcomp**: ``distcomp --state-dir TMP run FILE --cpus 8 --no-progress``
  (``--cpus`` sets the slots: each task asks for 1 cpu); the whole command, and
  the job's submit → last completion from the task records.
* **GNU Parallel**: ``seq N | parallel --will-cite -N0 -j8 sleep 0.2`` (``-N0``:
  read one input line per job but pass none to the command).

Rounds alternate the runners; makespan / ideal is reported for each.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .common import (
    PARALLEL_SKIPPED,
    Stopwatch,
    fmt_summary,
    gnu_parallel,
    gnu_parallel_version,
    note,
    print_table,
    result_row,
    rotated,
    summarize,
)
from .throughput import BenchError, run_distcomp

SLOTS = 8
SLEEP = 0.2
DEFAULT_TASKS = 200
QUICK_TASKS = 40


def write_task_file(directory: Path, n: int) -> Path:
    """``: i`` keeps the lines distinct (equal lines would be deduplicated)."""
    path = directory / f"sleep-{n}.txt"
    path.write_text("".join(f"shell:0:0:1:sleep {SLEEP}; : {i}\n" for i in range(n)))
    return path


def run_parallel(path: str, n: int) -> float:
    command = f"seq {n} | {path} --will-cite -N0 -j{SLOTS} sleep {SLEEP}"
    with Stopwatch() as sw:
        proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                              check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BenchError(f"`{command}` exited {proc.returncode}", proc.stderr[-4000:])
    return sw.seconds


def run(*, quick: bool = False, repeat: int = 3) -> dict[str, Any]:
    n = QUICK_TASKS if quick else DEFAULT_TASKS
    ideal = n * SLEEP / SLOTS
    parallel = gnu_parallel()
    note(f"[bold]packing[/]: {n} tasks of sleep {SLEEP} on {SLOTS} slots, ideal makespan "
         f"{ideal:.2f}s, {repeat} rounds alternating")
    workdir = Path(tempfile.mkdtemp(prefix="dcbench-pack-", dir="/tmp"))
    whole: list[float] = []
    window: list[float] = []
    peer: list[float] = []
    errors: dict[str, str] = {}
    try:
        task_file = write_task_file(workdir, n)
        steps = ["distcomp", "parallel"] if parallel else ["distcomp"]
        for rep in range(repeat):
            for step in rotated(steps, rep):
                if step in errors:
                    continue
                try:
                    if step == "distcomp":
                        total, inner = run_distcomp(task_file, n, SLOTS)
                        whole.append(total)
                        window.append(inner)
                    else:
                        assert parallel is not None
                        peer.append(run_parallel(parallel, n))
                except BenchError as exc:
                    errors[step] = f"round {rep + 1}: {exc}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    s_whole = summarize(whole) if whole else None
    s_window = summarize(window) if window else None
    s_peer = summarize(peer) if peer else None
    peer_why = PARALLEL_SKIPPED if parallel is None else errors.get("parallel")
    d_why = errors.get("distcomp")

    def of_ideal(values: list[float]) -> Any:
        return summarize([v / ideal for v in values]) if values else None

    rows = [
        result_row("packing", "distcomp", "makespan / ideal, whole `distcomp run` command",
                   of_ideal(whole), "x ideal", skipped=d_why),
        result_row("packing", "distcomp", "makespan / ideal, submit→last completion",
                   of_ideal(window), "x ideal", skipped=d_why),
        result_row("packing", f"GNU parallel -j{SLOTS}", "makespan / ideal, whole command",
                   of_ideal(peer), "x ideal", skipped=peer_why,
                   ratio=s_whole.median / s_peer.median if s_whole and s_peer else None,
                   ratio_of="whole command"),
    ]
    table = []
    for label, s, why in (("distcomp run (whole command)", s_whole, d_why),
                          ("distcomp submit→last completion", s_window, d_why),
                          (f"GNU parallel -j{SLOTS}", s_peer, peer_why)):
        if s is None:
            table.append([label, why or "no result", "-"])
        else:
            table.append([label, fmt_summary(s, 2), f"{s.median / ideal:.2f}x"])
    print_table(f"packing: {n} x sleep {SLEEP} on {SLOTS} slots, ideal {ideal:.2f}s",
                ["runner", "makespan s", "makespan / ideal"], table,
                caption="makespan: median over rounds [min, max]. The whole command "
                        "includes the runner's start-up (distcomp: interpreter, embedded "
                        "redis-server, submit).")
    return {"benchmark": "packing",
            "config": {"tasks": n, "sleep": SLEEP, "slots": SLOTS, "rounds": repeat,
                       "ideal_seconds": ideal},
            "parallel_version": gnu_parallel_version(parallel) if parallel else None,
            "results": {"distcomp_whole": s_whole.as_dict() if s_whole else None,
                        "distcomp_window": s_window.as_dict() if s_window else None,
                        "parallel": s_peer.as_dict() if s_peer else None},
            "rows": rows, "errors": errors}
