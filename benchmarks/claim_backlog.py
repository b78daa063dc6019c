"""Claim cost against backlog size: does claiming get slower as the queue grows?

For each number of resource shapes (1 and 20) and each backlog size (10^3,
10^5, 10^6 queued tasks; ``--quick``: 10^3 and 10^5) the benchmark fills a
queue in its own private redis-server, registers a worker, and times N=500
claims of one task each, as a worker with room for everything would make them.

Every backlog stays alive in its own server for the whole benchmark, so the
repetitions interleave (each round visits the backlogs in a rotated order), and
before every round the queue is topped up so that at least ``size`` tasks are
queued at every timed claim. Per backlog it reports the client-side latency
(p50, p99, in microseconds), the server-side time of the claim script (from
``INFO commandstats``: the usec of EVALSHA) and the number of Redis commands the
script ran per claim (commandstats deltas), plus the ratio of each backlog's
cost to the smallest one's. A claim whose cost does not depend on the backlog
shows ratios near 1.0x and a constant command count.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any

from distcomp.spec import GIB, MIB, TaskSpec
from distcomp.store import Store

from .common import (
    RedisServer,
    Stopwatch,
    Summary,
    fmt_ratio,
    fmt_spread,
    fmt_summary,
    note,
    percentile,
    print_table,
    redis_server,
    redis_server_binary,
    redis_server_version,
    result_row,
    rotated,
    summarize,
)

DEFAULT_SIZES = (10**3, 10**5, 10**6)
QUICK_SIZES = (10**3, 10**5)
SHAPE_COUNTS = (1, 20)
CLAIMS = 500
WARMUP_CLAIMS = 5
CHUNK = 20_000
LEASE_MS = 60_000
FREE_MEM = 64 * GIB
FREE_CPUS = 64
WORKER = "bench-worker"
INSTANCE = "bench-instance"
QUEUE = "bench"

#: 5 memory sizes x 4 cpu counts = 20 shapes (each memory size is its own bucket).
SHAPE_MEMS = (256 * MIB, 512 * MIB, 1 * GIB, 2 * GIB, 4 * GIB)
SHAPE_CPUS = (1, 2, 4, 8)

#: Commands that are the claim itself or the benchmark's bookkeeping, not work
#: the claim script does inside Redis.
_NOT_INSIDE = frozenset({"evalsha", "eval", "script", "info", "config", "ping", "client",
                         "hello", "auth", "select"})


def size_label(size: int) -> str:
    exponent = round(math.log10(size)) if size > 0 else 0
    return f"10^{exponent}" if 10**exponent == size else f"{size:,}"


def spec_for(index: int, shapes: int) -> TaskSpec:
    """Task ``index`` of a backlog with ``shapes`` shapes: shapes cycle, commands unique."""
    k = index % shapes
    mem = SHAPE_MEMS[k % len(SHAPE_MEMS)]
    cpus = SHAPE_CPUS[(k // len(SHAPE_MEMS)) % len(SHAPE_CPUS)]
    return TaskSpec(cmd=f"true {index}", mem=mem, cpus=cpus)


@dataclass
class Backlog:
    """One queue of ``size`` tasks in ``shapes`` shapes, in its own redis-server."""

    size: int
    shapes: int
    server: RedisServer
    store: Store
    submitted: int = 0
    fill_seconds: float = 0.0
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    server_us: list[float] = field(default_factory=list)
    commands_per_claim: list[float] = field(default_factory=list)
    #: Last round, per command run inside the script: (calls, usec) per claim.
    command_breakdown: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.shapes} shape{'s' if self.shapes > 1 else ''}, {size_label(self.size)}"

    def fill(self, count: int) -> None:
        """Submit ``count`` more tasks, CHUNK specs per submit call (one job per call)."""
        left = count
        while left > 0:
            n = min(CHUNK, left)
            specs = [spec_for(i, self.shapes) for i in range(self.submitted, self.submitted + n)]
            result = self.store.submit(specs, job_name="bench", allow_duplicates=True)
            if result.new != n:
                raise RuntimeError(f"{self.label}: submitted {n} tasks, {result.new} were new")
            self.submitted += n
            left -= n

    def top_up(self, target: int) -> None:
        queued = self.store.queued_count()
        if queued < target:
            self.fill(target - queued)

    def claim_one(self) -> int:
        claims = self.store.claim(WORKER, INSTANCE, free_mem=FREE_MEM, free_cpus=FREE_CPUS,
                                  free_gpus=0, max_count=1, lease_ms=LEASE_MS)
        return len(claims)


def _commandstats(store: Store) -> dict[str, tuple[int, int]]:
    """(calls, usec) per command; read over the store's own, already open connection."""
    raw: dict[str, Any] = store.redis.info("commandstats")
    out: dict[str, tuple[int, int]] = {}
    for key, value in raw.items():
        name = key.removeprefix("cmdstat_")
        out[name] = (int(value["calls"]), int(value["usec"]))
    return out


def _setup(size: int, shapes: int, server: RedisServer, claims: int) -> Backlog:
    store = Store(server.url, QUEUE)
    backlog = Backlog(size=size, shapes=shapes, server=server, store=store)
    with Stopwatch() as sw:
        backlog.fill(size + claims + WARMUP_CLAIMS)
    backlog.fill_seconds = sw.seconds
    n_shapes = int(store.redis.scard(store.key("shapes")))
    if n_shapes != shapes:
        raise RuntimeError(f"{backlog.label}: expected {shapes} ready shapes, found {n_shapes}")
    store.register_worker(WORKER, INSTANCE, lease_ms=LEASE_MS, info={}, fields={})
    for _ in range(WARMUP_CLAIMS):  # loads the script (NOSCRIPT -> SCRIPT LOAD) untimed
        backlog.claim_one()
    return backlog


def _measure(backlog: Backlog, claims: int) -> None:
    """One round: top up to size + claims, then time ``claims`` claims of one task."""
    store = backlog.store
    backlog.top_up(backlog.size + claims)
    running_before = store.counts().get("running", 0)
    before = _commandstats(store)
    latencies_ns: list[int] = []
    got = 0
    gc.collect()
    gc.disable()  # a collection in the middle would be the client's pause, not Redis's
    try:
        for _ in range(claims):
            start = time.perf_counter_ns()
            n = backlog.claim_one()
            latencies_ns.append(time.perf_counter_ns() - start)
            got += n
    finally:
        gc.enable()
    after = _commandstats(store)
    if got != claims:
        raise RuntimeError(f"{backlog.label}: {claims} claims returned {got} tasks "
                           f"(expected one each)")
    running_after = store.counts().get("running", 0)
    if running_after - running_before != claims:
        raise RuntimeError(f"{backlog.label}: running count moved by "
                           f"{running_after - running_before}, expected {claims}")
    if store.queued_count() < backlog.size:
        raise RuntimeError(f"{backlog.label}: backlog fell below its size during the round")

    latencies_us = [ns / 1000 for ns in latencies_ns]
    backlog.p50_us.append(percentile(latencies_us, 50))
    backlog.p99_us.append(percentile(latencies_us, 99))
    delta: dict[str, tuple[int, int]] = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls != calls0:
            delta[name] = (calls - calls0, usec - usec0)
    evalsha_calls, evalsha_usec = delta.get("evalsha", (0, 0))
    if evalsha_calls < claims:
        raise RuntimeError(f"{backlog.label}: commandstats shows {evalsha_calls} EVALSHA "
                           f"calls for {claims} claims")
    backlog.server_us.append(evalsha_usec / claims)
    inside = {name: (calls / claims, usec / claims) for name, (calls, usec) in delta.items()
              if name not in _NOT_INSIDE}
    backlog.commands_per_claim.append(sum(calls for calls, _ in inside.values()))
    backlog.command_breakdown = dict(sorted(inside.items(), key=lambda kv: -kv[1][0]))


def run(*, quick: bool = False, repeat: int = 3) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else DEFAULT_SIZES
    binary = redis_server_binary()
    note(f"[bold]claim_backlog[/]: {CLAIMS} claims of 1 task per round, {repeat} rounds, "
         f"backlogs {', '.join(size_label(s) for s in sizes)} x shapes "
         f"{', '.join(map(str, SHAPE_COUNTS))}; {binary} {redis_server_version(binary)}")
    version = "?"
    backlogs: list[Backlog] = []
    with contextlib.ExitStack() as stack:
        for shapes in SHAPE_COUNTS:
            for size in sizes:
                server = stack.enter_context(redis_server())
                version = server.version()
                backlog = _setup(size, shapes, server, CLAIMS)
                stack.callback(backlog.store.close)
                note(f"  filled {backlog.label}: {backlog.submitted:,} tasks in "
                     f"{backlog.fill_seconds:.1f}s "
                     f"({backlog.submitted / backlog.fill_seconds:,.0f} tasks/s)")
                backlogs.append(backlog)
        for rep in range(repeat):
            for backlog in rotated(backlogs, rep):
                _measure(backlog, CLAIMS)
    return _report(backlogs, sizes, repeat, version)


def _report(backlogs: list[Backlog], sizes: tuple[int, ...], repeat: int,
            version: str) -> dict[str, Any]:
    rows: list[list[str]] = []
    results: list[dict[str, Any]] = []
    ratio_lines: list[str] = []
    ratios: list[dict[str, Any]] = []
    for shapes in SHAPE_COUNTS:
        group = [b for b in backlogs if b.shapes == shapes]
        base = group[0]
        base_p50 = summarize(base.p50_us).median
        base_server = summarize(base.server_us).median
        for b in group:
            p50, p99 = summarize(b.p50_us), summarize(b.p99_us)
            server_us, cmds = summarize(b.server_us), summarize(b.commands_per_claim)
            ratio = p50.median / base_p50
            rows.append([str(shapes), size_label(b.size),
                         f"{b.fill_seconds:.2f}s",
                         fmt_summary(p50), fmt_spread(p50), fmt_summary(p99),
                         fmt_summary(server_us), fmt_spread(server_us),
                         _fmt_commands(cmds), fmt_ratio(ratio)])
            results.append({
                "shapes": shapes, "size": b.size, "claims_per_round": CLAIMS,
                "fill_seconds": b.fill_seconds, "filled_tasks": b.submitted,
                "p50_us": p50.as_dict(), "p99_us": p99.as_dict(),
                "server_us_per_claim": server_us.as_dict(),
                "commands_per_claim": cmds.as_dict(),
                "command_breakdown_last_round": {
                    name: {"calls_per_claim": calls, "usec_per_claim": usec}
                    for name, (calls, usec) in b.command_breakdown.items()},
                "p50_ratio_vs_smallest": ratio,
            })
        for b in group[1:]:
            p50_ratio = summarize(b.p50_us).median / base_p50
            server_ratio = summarize(b.server_us).median / base_server
            ratio_lines.append(
                f"claim cost ratio {size_label(b.size)}/{size_label(base.size)} "
                f"({shapes} shape{'s' if shapes > 1 else ''}) = {fmt_ratio(p50_ratio)} "
                f"(p50 latency), {fmt_ratio(server_ratio)} (server time)")
            ratios.append({"shapes": shapes, "size": b.size, "base_size": base.size,
                           "p50_ratio": p50_ratio, "server_time_ratio": server_ratio})
    print_table(
        f"claim cost vs backlog ({CLAIMS} claims x {repeat} rounds, redis {version})",
        ["shapes", "queued", "fill", "p50 µs", "spread", "p99 µs", "server µs/claim",
         "spread", "redis cmds/claim", "p50 vs smallest"],
        rows,
        caption="Each cell: median over rounds [min, max]; spread = (max - min) / median. "
                "p50/p99: client latency of one claim (redis-py round trip included). "
                "server µs: EVALSHA usec from INFO commandstats. "
                "redis cmds/claim: commands run inside the claim script, per claim.",
    )
    for line in ratio_lines:
        note(line)
    rows_out: list[dict[str, Any]] = []
    for r in results:
        rows_out.append(result_row(
            "claim", "distcomp",
            f"claim p50, {r['shapes']} shape{'s' if r['shapes'] > 1 else ''}, "
            f"{size_label(r['size'])} queued", _summary(r["p50_us"]), "µs"))
    for r in ratios:
        rows_out.append(result_row(
            "claim", "distcomp",
            f"p50 {size_label(r['size'])} / {size_label(r['base_size'])}, {r['shapes']} "
            f"shape{'s' if r['shapes'] > 1 else ''}", summarize([r["p50_ratio"]]), "x"))
    return {"benchmark": "claim_backlog", "redis_version": version, "rows": rows_out,
            "config": {"sizes": list(sizes), "shape_counts": list(SHAPE_COUNTS),
                       "claims_per_round": CLAIMS, "rounds": repeat, "chunk": CHUNK,
                       "free_mem": FREE_MEM, "free_cpus": FREE_CPUS},
            "results": results, "ratios": ratios}


def _fmt_commands(summary: Summary) -> str:
    if summary.low == summary.high:
        return f"{summary.median:.2f}"
    return f"{summary.median:.2f} [{summary.low:.2f}, {summary.high:.2f}]"


def _summary(data: dict[str, Any]) -> Summary:
    return summarize(data["values"])
