"""Task specifications: the validated, immutable description of one task.

Everything that reaches the store has passed through :class:`TaskSpec`, so the
store and the worker can trust its fields. Parsing of task *files* lives in
:mod:`distcomp.taskfile`; this module holds the value types and the field
validators both the file parsers and the CLI flags share, so an error reads the
same wherever the bad value came from.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

GIB = 1024**3
MIB = 1024**2

#: Priorities are packed into a sorted-set score together with the submission
#: sequence number (see ``store``); this range keeps that score exact in a double.
PRIORITY_MIN = -999
PRIORITY_MAX = 999

TASK_KINDS = ("shell", "python")

#: ``pkg.module:function`` (the function part may be dotted: ``Class.method``).
FUNC_REF_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": GIB, "k": 1024, "m": MIB, "g": GIB, "t": 1024**4, "p": 1024**5}
_RESOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}


#: The one JSON form of a spec (compact, sorted keys), both on the wire and hashed for
#: deduplication. One shared encoder: ``json.dumps`` with options builds a new
#: encoder per call, which showed up when submitting 100,000 tasks.
_CANONICAL = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


class FieldError(ValueError):
    """A single field holds a value that cannot be used; names the field and the fix."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"field '{field_name}': {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one line of one input."""

    source: str
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.message}"


class SpecError(ValueError):
    """Input was refused as a whole; carries every problem found (capped)."""

    def __init__(self, problems: list[Problem], total: int | None = None) -> None:
        self.problems = problems
        self.total = total if total is not None else len(problems)
        lines = [str(p) for p in problems]
        if self.total > len(problems):
            lines.append(f"... and {self.total - len(problems)} more problems")
        lines.append("nothing was submitted; fix the lines above and submit again")
        super().__init__("\n".join(lines))


def parse_size(value: Any, field_name: str = "mem") -> int:
    """Parse a memory size into bytes.

    A bare number means GiB, because the predecessor's ``min_dram_GB`` column
    did, and a task file should not change meaning when moved to TOML.
    """
    if isinstance(value, bool):
        raise FieldError(field_name, f"expected a size like 512M or 4G, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0 or value > 2**50:
            raise FieldError(field_name, f"size must be a finite positive number, got {value!r}")
        return int(value * GIB)
    if not isinstance(value, str):
        raise FieldError(field_name, f"expected a size like 512M or 4G, got {value!r}")
    match = _SIZE_RE.match(value) if len(value) < 64 else None
    unit, suffix = (match.group(2).lower(), match.group(3).lower()) if match else ("", "")
    if not match or (suffix and suffix not in ("b", "ib")) or (not unit and suffix == "ib"):
        raise FieldError(
            field_name, f"cannot read size {value!r}; use a number of GiB or a unit: 512M, 4G"
        )
    multiplier = 1 if (not unit and suffix == "b") else _SIZE_UNITS[unit]
    return int(float(match.group(1)) * multiplier)


def parse_duration(value: Any, field_name: str = "timeout") -> float:
    """Parse a duration into seconds: ``90``, ``90s``, ``5m``, ``1h30m``, ``250ms``."""
    if isinstance(value, bool):
        raise FieldError(field_name, f"expected a duration like 90s or 2h, got {value!r}")
    bad = FieldError(field_name, f"cannot read duration {value!r}; use e.g. 90, 90s, 5m, 2h")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise bad
        return float(value)
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise bad
    parts = list(_DURATION_RE.finditer(value.strip()))
    text = value.strip()
    # Parts must tile the text exactly; only the last may omit its unit ("1h30").
    if not parts or ("".join(m.group(0) for m in parts) != text.replace(" ", "") and \
            " ".join(m.group(0) for m in parts) != text):
        raise bad
    total = 0.0
    for i, match in enumerate(parts):
        unit = (match.group(2) or "").lower()
        if not unit and i != len(parts) - 1:
            raise bad
        total += float(match.group(1)) * _DURATION_UNITS[unit]
    if not math.isfinite(total):
        raise bad
    return total


def format_size(nbytes: int | float | None) -> str:
    """Render bytes the way people write them in task files (``1.5G``)."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}P"  # pragma: no cover - loop returns at T


def check_int(value: Any, field_name: str, low: int, high: int | None = None) -> int:
    """An integer in range; refuses bools and floats with a fraction."""
    if type(value) is int and value >= low and (high is None or value <= high):
        return value  # the common case, checked first: a TaskSpec checks six fields
    if isinstance(value, bool):
        raise FieldError(field_name, f"expected an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,18}\s*", value):
        value = int(value)
    if not isinstance(value, int):
        raise FieldError(field_name, f"expected an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise FieldError(field_name, f"must be {bound}, got {value}")
    return value


@dataclass(frozen=True)
class TaskSpec:
    """What to run and what it needs. Immutable; ``source`` is where it was written."""

    cmd: str
    kind: str = "shell"
    name: str | None = None
    priority: int = 0
    mem: int = 0
    #: Hard per-task memory limit: the task is killed (and fails) above it.
    mem_limit: int | None = None
    cpus: int = 1
    gpus: int = 0
    #: Custom named resources a worker offers (``--resource license=2``).
    resources: tuple[tuple[str, int], ...] = ()
    timeout: float | None = None
    retries: int | None = None
    #: Wait before a retry; doubles with each failure (exponential backoff).
    retry_delay: float | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    tags: tuple[str, ...] = ()
    #: Python tasks (``kind="python"``): a ``pkg.module:function`` reference called
    #: with JSON ``args``/``kwargs``, or ``payload``, the store key of a cloudpickled
    #: ``(fn, args, kwargs)`` (API submissions), or ``inline:`` + that pickle in
    #: base64 when it is small. ``cmd`` is then only for display.
    func: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    payload: str | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Normalise so equal tasks compare (and deduplicate) equal however they were written.
        object.__setattr__(self, "priority", check_int(self.priority, "priority", PRIORITY_MIN,
                                                       PRIORITY_MAX))
        object.__setattr__(self, "env", tuple(sorted(self.env)))
        object.__setattr__(self, "resources", tuple(sorted(self.resources)))
        for name, amount in self.resources:
            if not _RESOURCE_NAME_RE.match(name):
                raise FieldError("resources", f"invalid resource name {name!r}; use letters, "
                                 "digits, '_', '.' or '-'")
            check_int(amount, "resources", 1, 10**9)
        if self.kind not in TASK_KINDS:
            raise FieldError(
                "type", f"unknown task type {self.kind!r}; supported: {', '.join(TASK_KINDS)}"
            )
        if self.kind == "python":
            self._check_python()
        elif self.func is not None or self.payload is not None or self.args or self.kwargs:
            raise FieldError("func", "func/args/kwargs/payload are for python tasks; "
                             "set type = 'python'")
        if not isinstance(self.cmd, str) or not self.cmd.strip():
            raise FieldError("cmd", "the command is empty; write the command to run")
        if "\x00" in self.cmd:
            raise FieldError("cmd", "the command contains a NUL byte")
        check_int(self.mem, "mem", 0)
        if self.mem_limit is not None:
            check_int(self.mem_limit, "mem_limit", 1)
        check_int(self.cpus, "cpus", 0, 4096)
        check_int(self.gpus, "gpus", 0, 1024)
        if self.timeout is not None and not self.timeout > 0:
            raise FieldError("timeout", f"must be positive, got {self.timeout!r}")
        if self.retries is not None:
            check_int(self.retries, "retries", 0, 1000)
        if self.retry_delay is not None and not 0 <= self.retry_delay <= 86400:
            raise FieldError("retry_delay",
                             f"must be between 0 and 1 day, got {self.retry_delay!r}")
        for key, val in self.env:
            if not key or "=" in key or "\x00" in key or "\x00" in val:
                raise FieldError("env", f"invalid environment variable {key!r}")

    def _check_python(self) -> None:
        """A python task names exactly one callable; its cmd defaults to a readable call."""
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", tuple(sorted(self.kwargs)))
        if (self.func is None) == (self.payload is None):
            raise FieldError("func", "a python task needs a function reference like "
                             "'pkg.module:function'")
        if self.func is not None and not FUNC_REF_RE.match(self.func):
            raise FieldError("func", f"cannot read function reference {self.func!r}; "
                             "write 'pkg.module:function'")
        try:
            json.dumps([self.args, dict(self.kwargs)])
        except (TypeError, ValueError) as exc:
            raise FieldError("args", f"arguments must be JSON values: {exc}") from None
        for key, _ in self.kwargs:
            if not isinstance(key, str) or not key.isidentifier():
                raise FieldError("kwargs", f"invalid keyword argument name {key!r}")
        if not isinstance(self.cmd, str) or not self.cmd.strip():
            object.__setattr__(self, "cmd", python_display(self.func or "<pickled>",
                                                           self.args, dict(self.kwargs)))

    @property
    def display_name(self) -> str:
        return self.name or self.cmd

    def to_dict(self) -> dict[str, Any]:
        """The wire form stored in Redis (compact: defaults are left out)."""
        out: dict[str, Any] = {"cmd": self.cmd}
        if self.kind != "shell":
            out["kind"] = self.kind
        if self.name is not None:
            out["name"] = self.name
        if self.priority:
            out["priority"] = self.priority
        if self.mem:
            out["mem"] = self.mem
        if self.mem_limit is not None:
            out["mem_limit"] = self.mem_limit
        if self.cpus != 1:
            out["cpus"] = self.cpus
        if self.gpus:
            out["gpus"] = self.gpus
        if self.resources:
            out["resources"] = dict(self.resources)
        if self.timeout is not None:
            out["timeout"] = self.timeout
        if self.retries is not None:
            out["retries"] = self.retries
        if self.retry_delay is not None:
            out["retry_delay"] = self.retry_delay
        if self.env:
            out["env"] = dict(self.env)
        if self.cwd is not None:
            out["cwd"] = self.cwd
        if self.tags:
            out["tags"] = list(self.tags)
        if self.func is not None:
            out["func"] = self.func
        if self.args:
            out["args"] = list(self.args)
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        if self.payload is not None:
            out["payload"] = self.payload
        if self.source:
            out["source"] = self.source
        return out

    def to_json(self) -> str:
        return _CANONICAL.encode(self.to_dict())

    def wire_and_dedup_key(self) -> tuple[str, str]:
        """``(to_json(), dedup_key())`` from one ``to_dict``: a bulk submission of
        100,000 tasks needs both for every task, and building the dict twice was a
        measurable share of its time."""
        wire = _CANONICAL.encode(self.to_dict())
        canonical = wire
        if self.source:
            # Cut `,"source":"..."` out instead of encoding a second dict. It is the
            # last such text: keys are sorted, every key after "source" ("tags",
            # "timeout") holds no object, and a quote inside a string is escaped.
            # ("cmd" always precedes it, hence the comma.)
            piece = ',"source":' + _CANONICAL.encode(self.source)
            at = wire.rfind(piece)
            canonical = wire[:at] + wire[at + len(piece):]
        return wire, hashlib.sha1(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return cls(
            cmd=data["cmd"],
            kind=data.get("kind", "shell"),
            name=data.get("name"),
            priority=data.get("priority", 0),
            mem=data.get("mem", 0),
            mem_limit=data.get("mem_limit"),
            cpus=data.get("cpus", 1),
            gpus=data.get("gpus", 0),
            resources=tuple(data.get("resources", {}).items()),
            timeout=data.get("timeout"),
            retries=data.get("retries"),
            retry_delay=data.get("retry_delay"),
            env=tuple(sorted(data.get("env", {}).items())),
            cwd=data.get("cwd"),
            tags=tuple(data.get("tags", ())),
            func=data.get("func"),
            args=tuple(data.get("args", ())),
            kwargs=tuple(sorted(data.get("kwargs", {}).items())),
            payload=data.get("payload"),
            source=data.get("source", ""),
        )

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_stored(cls, text: str) -> TaskSpec:
        """A spec read back from the store (a worker's claim): it was validated before
        it was stored, as ``to_json`` wrote it, so it is rebuilt without validating
        again (which cost more than the rest of a no-op call's claim)."""
        data = json.loads(text)
        if "cmd" not in data or not _STORED_DEFAULTS.keys() >= data.keys() - {"cmd"}:
            return cls.from_dict(data)  # not as to_json writes it: the careful way
        spec = object.__new__(cls)
        spec.__dict__.update(_STORED_DEFAULTS)
        spec.__dict__.update(data)
        values = spec.__dict__
        for name in ("resources", "env", "kwargs"):
            if name in data:
                values[name] = tuple(sorted(data[name].items()))
        for name in ("tags", "args"):
            if name in data:
                values[name] = tuple(data[name])
        return spec

    def dedup_key(self) -> str:
        """Identity for "submit the same file again": every field but where it was written."""
        return self.wire_and_dedup_key()[1]


#: Every field's default, for ``TaskSpec.from_stored`` (``to_dict`` leaves defaults out).
_STORED_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(TaskSpec) if f.name != "cmd"}


def python_display(func: str, args: Any = (), kwargs: dict[str, Any] | None = None,
                   limit: int = 200) -> str:
    """``python: pkg.mod:fn(1, "a", k=2)``: what ``tasks``/``status`` show for a python
    task, since it has no shell command; long argument lists are shortened."""
    parts = [json.dumps(a, separators=(",", ":")) for a in args]
    parts += [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in (kwargs or {}).items()]
    inner = ", ".join(parts)
    if len(inner) > limit:
        inner = inner[: limit - 3] + "..."
    return f"python: {func}({inner})"
