"""Host files for ``distcomp up``/``down``: which machines, and how many workers on each.

One host per line, the way people already write them for parallel-ssh, with
optional per-host settings after it::

    # head node runs Redis; these run workers
    node1
    alice@node2:2222   workers=2 memory=16G cpus=8
    node3              python=/opt/venv/bin/python name=big
    [fe80::1]:22       gpus=0,1

``#`` starts a comment. Settings: ``workers`` (how many on the host), ``memory``,
``cpus``, ``gpus`` (passed to each worker as ``--memory``/``--cpus``/``--gpus``),
``python`` (the interpreter that has distcomp on that host) and ``name`` (the
worker name; default the host's own hostname, with ``-1``, ``-2``... when
several run there). A bad line is reported as ``file:line`` and nothing is
started, like a bad task file.

Host names and user names are checked strictly because they end up as
arguments to ``ssh``: a "host" such as ``-oProxyCommand=...`` must never reach it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .resources import parse_gpu_list
from .spec import FieldError, parse_size

HOST_KEYS = ("workers", "memory", "cpus", "gpus", "python", "name")
MAX_WORKERS_PER_HOST = 64

_HOST_RE = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9_.\-]*)@)?"
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9_.\-]*))"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class HostFileError(ValueError):
    """The host file cannot be used; lists every bad line as ``file:line: problem``."""


@dataclass(frozen=True)
class Host:
    """One line of a host file."""

    host: str
    user: str | None = None
    port: int | None = None
    workers: int | None = None
    memory: str | None = None
    cpus: int | None = None
    gpus: str | None = None
    python: str | None = None
    name: str | None = None
    source: str = ""
    line: int = 0

    @property
    def label(self) -> str:
        """The host as written (``user@host:port``), for tables and messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{host}{port}"

    @property
    def key(self) -> tuple[str, int | None, str | None]:
        """Two lines with the same key would fight over the same workers."""
        return (self.host, self.port, self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Host:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def parse_host(spec: str) -> tuple[str, str | None, int | None]:
    """``[user@]host[:port]`` (IPv6 in brackets) -> (host, user, port); ValueError if bad."""
    match = _HOST_RE.match(spec)
    if not match:
        raise ValueError(f"cannot read host {spec!r}: write [user@]host[:port], e.g. "
                         "alice@node2:2222 (IPv6 in brackets: [fe80::1]:22)")
    port = int(match.group("port")) if match.group("port") else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port {port} of {spec!r} is not in 1..65535")
    return match.group("ipv6") or match.group("host"), match.group("user"), port


def _setting(key: str, value: str) -> Any:
    """Validate one ``key=value``; returns the value to store."""
    if key == "workers":
        if not value.isdigit() or not 1 <= int(value) <= MAX_WORKERS_PER_HOST:
            raise ValueError(f"workers={value!r}: expected a whole number from 1 to "
                             f"{MAX_WORKERS_PER_HOST}")
        return int(value)
    if key == "cpus":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"cpus={value!r}: expected a whole number of cores, at least 1")
        return int(value)
    if key == "memory":
        try:
            parse_size(value, "memory")
        except FieldError as exc:
            raise ValueError(f"memory={value!r}: {exc.message}") from None
        return value
    if key == "gpus":
        parse_gpu_list(value)
        return value
    if key == "python":
        if any(ch.isspace() for ch in value) or value.startswith("-"):
            raise ValueError(f"python={value!r}: expected a path or command without spaces, "
                             "e.g. /opt/venv/bin/python")
        return value
    if key == "name":
        if not _NAME_RE.match(value):
            raise ValueError(f"name={value!r}: use letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit)")
        return value
    raise ValueError(f"unknown setting {key!r}; known: {', '.join(HOST_KEYS)}")


def parse_hosts(text: str, source: str = "<hosts>") -> list[Host]:
    """Parse a host file's text; raises HostFileError listing every bad line."""
    hosts: list[Host] = []
    problems: list[str] = []
    seen: dict[tuple[str, int | None, str | None], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{source}:{number}"
        try:
            host, user, port = parse_host(words[0])
            settings: dict[str, Any] = {}
            for word in words[1:]:
                key, sep, value = word.partition("=")
                if not sep or not key or not value:
                    raise ValueError(f"cannot read {word!r}: settings look like key=value "
                                     f"({', '.join(HOST_KEYS)})")
                key = key.lower()
                if key in settings:
                    raise ValueError(f"{key} is given twice")
                settings[key] = _setting(key, value)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        entry = Host(host=host, user=user, port=port, source=source, line=number, **settings)
        if entry.key in seen:
            problems.append(f"{where}: {entry.label} is already listed on line "
                            f"{seen[entry.key]}; give each line its own name= to run "
                            "separate groups of workers on one host")
            continue
        seen[entry.key] = number
        hosts.append(entry)
    if problems:
        shown = problems[:20]
        if len(problems) > 20:
            shown.append(f"... and {len(problems) - 20} more problems")
        raise HostFileError("bad host file (nothing was started):\n  " + "\n  ".join(shown))
    if not hosts:
        raise HostFileError(f"{source}: no hosts listed (one host per line, e.g. node1 or "
                            "alice@node2:2222 workers=2)")
    return hosts


def read_hosts(path: str | Path) -> list[Host]:
    """Read a host file; errors name the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HostFileError(f"{path}: cannot read the host file: {exc}") from None
    return parse_hosts(text, str(path))
