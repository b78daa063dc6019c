"""Where the queue lives: connection settings from flags, environment, or a file.

Precedence, highest first: a command-line flag (``--redis``, ``--queue``,
``--state-dir``), the environment (``DISTCOMP_REDIS``, ``DISTCOMP_QUEUE``,
``DISTCOMP_STATE_DIR``), a ``distcomp.toml`` (the working directory's, else
``~/.config/distcomp/distcomp.toml``), then the built-in default (the embedded
server in ``./.distcomp``). A file lets a whole lab share one setting
(``redis = "rediss://..."``) without every shell exporting it; the flag and the
environment still win so one command can point elsewhere.

A ``[history]`` table says how long finished tasks' records stay in Redis and
where they go afterwards (:class:`HistorySettings`, :mod:`distcomp.history`).

Passwords live inside the Redis URL. Anything that shows a URL to a person
goes through :func:`mask_url`, so a password never lands in a terminal
scrollback, a CI log or a bug report.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .spec import FieldError, parse_duration
from .taskfile import toml_key_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    # unused-ignore: the ignore is only needed where tomli is not installed.
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

CONFIG_NAME = "distcomp.toml"
#: Keys a distcomp.toml may set; anything else is a typo we refuse to guess about.
CONFIG_KEYS = ("redis", "queue", "state_dir", "history")
#: Keys of the ``[history]`` table.
HISTORY_KEYS = ("mode", "keep", "keep_failed", "archive")
HISTORY_MODES = ("archive", "expire", "off")
#: Shortest ``keep`` a file may set: a record must outlive the client waiting for it
#: (a python task's future reads its result from the record).
MIN_KEEP_S = 60.0
MASK = "****"

_TOML_WHERE_RE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")
_URL_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")


class ConfigError(ValueError):
    """A configuration file cannot be used; names the file, the line and the fix."""


@dataclass(frozen=True)
class FileConfig:
    """The settings one distcomp.toml holds (``None`` where it says nothing)."""

    path: Path
    redis: str | None = None
    queue: str | None = None
    state_dir: str | None = None
    history: HistoryFile | None = None


@dataclass(frozen=True)
class HistoryFile:
    """What a ``[history]`` table sets (``None``: not set, the default applies)."""

    mode: str | None = None
    keep_s: float | None = None
    #: ``inf`` for "never" (the default): failed and cancelled tasks stay retryable.
    keep_failed_s: float | None = None
    archive: Path | None = None


@dataclass(frozen=True)
class HistorySettings:
    """The history policy in effect: how long finished tasks stay in Redis.

    ``mode``: ``archive`` (records go to ``archive`` as JSON lines, then leave
    Redis), ``expire`` (they just leave) or ``off`` (they stay). ``keep_s``: age
    after which a succeeded task goes. ``keep_failed_s``: the same for failed and
    cancelled tasks, ``None`` = never (a removed task can no longer be retried).
    """

    mode: str = "archive"
    keep_s: float = 7 * 86400.0
    keep_failed_s: float | None = None
    archive: Path = Path(".distcomp/history/default.jsonl")
    #: Where the settings came from, for messages: a distcomp.toml, or "defaults".
    source: str = "defaults"


def config_paths(cwd: Path | None = None) -> list[Path]:
    """Candidate files, most specific first: a project's own file beats the user's."""
    here = (cwd or Path.cwd()) / CONFIG_NAME
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [here, Path(xdg).expanduser() / "distcomp" / CONFIG_NAME]


def find_config(cwd: Path | None = None) -> Path | None:
    for path in config_paths(cwd):
        if path.is_file():
            return path
    return None


def parse_config(path: Path) -> FileConfig:
    """Read and validate one distcomp.toml; any problem raises ConfigError naming
    ``file:line`` and what to write instead."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the distcomp configuration file: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_WHERE_RE.search(message)
        line = match.group(1) if match and match.group(1) else str(text.count("\n") + 1)
        if match:
            message = message[: match.start()]
        raise ConfigError(f"{path}:{line}: TOML syntax error: {message}; fix the syntax "
                          f"(the file holds lines like redis = \"redis://head:6379/0\")"
                          ) from None
    values: dict[str, str] = {}
    history: HistoryFile | None = None
    for key, value in doc.items():
        line = toml_key_line(text, key)
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{path}:{line}: unknown setting {key!r}; a distcomp.toml may "
                              f"set {', '.join(CONFIG_KEYS)}")
        if key == "history":
            history = _parse_history(path, text, value)
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{path}:{line}: {key!r} must be a non-empty string in quotes, "
                              f"got {_describe(value)}")
        values[key] = value.strip()
    if "redis" in values:
        problem = url_problem(values["redis"])
        if problem:
            raise ConfigError(f"{path}:{toml_key_line(text, 'redis')}: {problem}")
    return FileConfig(path=path, history=history, **values)


def _parse_history(path: Path, text: str, table: Any) -> HistoryFile:
    """Validate the ``[history]`` table; errors name ``file:line`` and the fix."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}:{toml_key_line(text, 'history')}: 'history' must be a "
                          f"table, e.g. [history] then keep = \"7d\", got {_describe(table)}")
    found: dict[str, Any] = {}
    for key, value in table.items():
        line = _history_line(text, key)
        where = f"{path}:{line}: history.{key}"
        if key not in HISTORY_KEYS:
            raise ConfigError(f"{path}:{line}: unknown setting history.{key}; [history] may "
                              f"set {', '.join(HISTORY_KEYS)}")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where} must be a non-empty string in quotes, "
                              f"got {_describe(value)}")
        found[key] = _history_value(where, key, value.strip(), path.parent)
    return HistoryFile(mode=found.get("mode"), keep_s=found.get("keep"),
                       keep_failed_s=found.get("keep_failed"), archive=found.get("archive"))


def _history_value(where: str, key: str, value: str, base: Path) -> Any:
    if key == "mode":
        if value not in HISTORY_MODES:
            raise ConfigError(f"{where} is {value!r}; use one of "
                              + ", ".join(f'"{m}"' for m in HISTORY_MODES))
        return value
    if key == "archive":
        return (base / Path(value).expanduser()).absolute()
    if key == "keep_failed" and value == "never":
        return math.inf
    seconds = history_duration(value, where)
    if seconds < MIN_KEEP_S:
        raise ConfigError(f"{where} is {value!r}, shorter than {MIN_KEEP_S:.0f}s: a record "
                          "must outlive the client waiting for it; use e.g. \"1h\" or \"7d\"")
    return seconds


def history_duration(value: str, where: str) -> float:
    """A duration with a unit (``90s``, ``12h``, ``7d``); a bare number is refused,
    since seconds and days are both plausible readings of ``keep = "7"``."""
    try:
        if not value or not value[-1].isalpha():
            raise FieldError(where, "needs a unit")
        return parse_duration(value, where)
    except FieldError:
        raise ConfigError(f"{where} is {value!r}; give a duration with a unit, "
                          "e.g. \"90m\", \"12h\" or \"7d\"") from None


def _history_line(text: str, key: str) -> int:
    """Line of ``key`` in the [history] table (or of a dotted ``history.key``); the
    table's own line when not found."""
    pattern = re.compile(rf"^\s*(?:history\s*\.\s*)?[\"']?{re.escape(key)}[\"']?\s*=")
    for number, raw in enumerate(text.split("\n"), start=1):
        if pattern.match(raw):
            return number
    return toml_key_line(text, "history")


def history_settings(state_dir: str | os.PathLike[str] | None, queue: str,
                     file_cfg: FileConfig | None) -> HistorySettings:
    """The policy in effect: the file's ``[history]`` over the defaults. The default
    archive is ``<state dir>/history/<queue>.jsonl``."""
    from .server import state_dir_path  # server imports config: import here, not on top

    default_archive = state_dir_path(state_dir) / "history" / f"{queue}.jsonl"
    h = file_cfg.history if file_cfg is not None else None
    if h is None:
        return HistorySettings(archive=default_archive.absolute())
    keep_failed = None if h.keep_failed_s in (None, math.inf) else h.keep_failed_s
    return HistorySettings(
        mode=h.mode or "archive",
        keep_s=h.keep_s if h.keep_s is not None else HistorySettings.keep_s,
        keep_failed_s=keep_failed,
        archive=h.archive or default_archive.absolute(),
        source=str(file_cfg.path) if file_cfg is not None else "defaults")


def load_history(state_dir: str | os.PathLike[str] | None, queue: str,
                 cwd: Path | None = None) -> HistorySettings:
    """The history policy for a queue, from the distcomp.toml found from ``cwd``."""
    return history_settings(state_dir, queue, load_config(cwd))


def load_config(cwd: Path | None = None) -> FileConfig | None:
    """The first distcomp.toml found, parsed; None when there is none."""
    path = find_config(cwd)
    return parse_config(path) if path is not None else None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def url_problem(url: str) -> str | None:
    """Why a Redis URL cannot work, or None. Catches the usual slips early, with a fix."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _URL_SCHEMES:
        return (f"Redis URL {mask_url(url)!r} must start with redis://, rediss:// (TLS) or "
                "unix://, e.g. redis://:PASSWORD@head:6379/0")
    return None


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``****`` (also a ``?password=`` query)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    # Edit the text in place rather than urlunsplit: that would turn unix:///p into unix:/p.
    out = url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            out = out.replace(f"//{netloc}", f"//{user}:{MASK}@{hostport}", 1)
    if parts.query:
        query = re.sub(r"(^|&)(password=)[^&]*", rf"\1\2{MASK}", parts.query)
        out = out.replace(f"?{parts.query}", f"?{query}", 1)
    return out


def url_password(url: str) -> str | None:
    """The password a URL carries, if any (used to mask it in free text)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return parts.password


def mask_text(text: str, *secrets: str | None) -> str:
    """``text`` with every given secret replaced by ``****`` (for error messages
    that may quote a URL or a command line)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
            quoted = quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, MASK)
    return text


@dataclass(frozen=True)
class Resolved:
    """Connection settings after applying the precedence, with where each came from."""

    redis: str | None
    queue: str
    state_dir: str | None
    config_file: Path | None


def resolve(redis: str | None, queue: str | None, state_dir: str | None, *,
            cwd: Path | None = None) -> Resolved:
    """Fill what flags and environment left unset from distcomp.toml.

    Callers pass ``None`` for anything the user did not give on the command
    line or in the environment; the file is read only if something is missing,
    so a broken file does not stop a fully specified command.
    """
    redis = redis or os.environ.get("DISTCOMP_REDIS") or None
    queue = queue or os.environ.get("DISTCOMP_QUEUE") or None
    state_dir = state_dir or os.environ.get("DISTCOMP_STATE_DIR") or None
    file_cfg: FileConfig | None = None
    if redis is None or queue is None or state_dir is None:
        file_cfg = load_config(cwd)
    if file_cfg is not None:
        redis = redis or file_cfg.redis
        queue = queue or file_cfg.queue
        if state_dir is None and file_cfg.state_dir is not None:
            base = file_cfg.path.parent
            state_dir = str((base / Path(file_cfg.state_dir).expanduser()).resolve())
    if redis is not None:
        problem = url_problem(redis)
        if problem:
            raise ConfigError(problem)
    return Resolved(redis=redis, queue=queue or "default", state_dir=state_dir,
                    config_file=file_cfg.path if file_cfg else None)
