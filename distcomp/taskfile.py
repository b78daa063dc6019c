"""Task files: many tasks written down once, submitted all-or-nothing.

Three formats share one set of field rules (those of :mod:`distcomp.spec`):

* the predecessor's line format ``type:priority:min_dram_GB:min_cpu:command``,
  kept byte-for-byte compatible so old files still submit;
* JSON Lines (``.jsonl`` / ``.ndjson``), easy to generate from scripts;
* TOML (``.toml``), easy to write by hand, with a ``[defaults]`` table.

A file is refused as a whole: a half-submitted sweep is worse than none, since
re-submitting the fixed file would then run the good half twice. So every
parser reads the whole input, collects every problem it can (capped, but
counted), and raises one :class:`~distcomp.spec.SpecError` that says where each
problem is and how to fix it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from distcomp.spec import (
    FUNC_REF_RE,
    PRIORITY_MAX,
    PRIORITY_MIN,
    TASK_KINDS,
    FieldError,
    Problem,
    SpecError,
    TaskSpec,
    check_int,
    parse_duration,
    parse_size,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    # unused-ignore: the ignore is only needed where tomli is not installed.
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "KNOWN_FIELDS",
    "LINE_FORMAT",
    "parse_jsonl",
    "parse_lines",
    "parse_task_file",
    "parse_toml",
    "spec_from_fields",
]

T = TypeVar("T")


class _Parser(Protocol):
    def __call__(self, text: str, source: str, *, max_problems: int = ...) -> list[TaskSpec]: ...


LINE_FORMAT = "type:priority:min_dram_GB:min_cpu:command"
_LINE_EXAMPLE = "shell:1:2:1:./run.sh --seed 1"

_TOML_SUFFIXES = (".toml",)
_JSONL_SUFFIXES = (".jsonl", ".ndjson")

_TASK_HEADER_RE = re.compile(r"^\s*\[\[\s*task\s*\]\]")
_DEFAULTS_HEADER_RE = re.compile(r"^\s*\[\s*defaults\s*\]")
_TOML_WHERE_RE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")

#: How to fix a field, appended to messages from :mod:`distcomp.spec` that only
#: say what is wrong (those that already suggest a fix contain "; ").
_HINTS: dict[str, str] = {
    "cmd": 'write the command to run, e.g. "./run.sh --seed 1"',
    "name": "write a short non-empty string, or leave the field out",
    "type": "write 'shell'",
    "priority": f"write a whole number from {PRIORITY_MIN} to {PRIORITY_MAX}; higher runs first",
    "mem": "write a number of GiB (2, 0.5) or a size with a unit (512M, 4G)",
    "mem_limit": "write a size like 2G; the task is killed if it uses more",
    "cpus": "write a whole number of CPUs from 0 to 4096",
    "gpus": "write a whole number of GPUs from 0 to 1024",
    "timeout": "write seconds (90) or a duration (90s, 5m, 2h), or leave it out for none",
    "retries": "write a whole number from 0 to 1000, or leave it out",
    "retry_delay": "write seconds (30) or a duration (30s, 5m); it doubles with each failure",
    "env": 'write a table of names to strings, e.g. {"OMP_NUM_THREADS": "4"}',
    "cwd": "write a directory path, or leave it out",
    "tags": 'write a list of strings, e.g. ["sweep", "gpu"]',
    "resources": "write a table of names to counts, e.g. {license = 1}",
}


# --------------------------------------------------------------------------- problems


class _Problems:
    """Collects problems for one input; keeps the first few, counts them all.

    Counting past the cap matters: "... and 9,980 more" tells the user the file
    is systematically wrong (wrong format?) rather than a typo or two.
    """

    def __init__(self, source: str, max_problems: int) -> None:
        self.source = source
        self.cap = max(1, max_problems)
        self.kept: list[Problem] = []
        self.total = 0

    def add(self, line: int, field_name: str | None, message: str) -> None:
        self.total += 1
        if len(self.kept) < self.cap:
            self.kept.append(Problem(self.source, line, field_name, message))

    def add_field_error(self, line: int, err: FieldError) -> None:
        self.add(line, err.field, _with_hint(err.field, err.message))

    def raise_if_any(self) -> None:
        """Raise in line order: TOML checks run per table, not top to bottom."""
        if self.total:
            raise SpecError(sorted(self.kept, key=lambda p: p.line), self.total)


def _with_hint(field_name: str, message: str) -> str:
    """Make sure a message also says how to fix the value, not only what is wrong."""
    hint = _HINTS.get(field_name)
    if hint is None or "; " in message:
        return message
    return f"{message}; {hint}"


def _guard(field_name: str, convert: Callable[[], T]) -> T:
    """Run a spec validator, turning its stray ValueErrors into a FieldError.

    ``parse_size`` and ``check_int`` can leak plain ``ValueError`` or
    ``OverflowError`` (NaN, 400-digit numbers, ints over Python's digit limit);
    a task file must never crash the parser, only be refused with a reason.
    """
    try:
        return convert()
    except FieldError:
        raise
    except (ValueError, OverflowError) as exc:
        raise FieldError(field_name, "cannot use this value: too large or not a number") from exc


# --------------------------------------------------------------------------- fields


def _as_str(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise FieldError(field_name, f"expected a string, got {value!r}")
    if not value.strip():
        raise FieldError(field_name, "is empty")
    _check_encodable(value, field_name)
    return value


def _check_encodable(value: str, field_name: str) -> None:
    """Refuse lone surrogates (possible via JSON ``\\ud800``): they cannot reach exec()."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldError(
            field_name, f"contains a character that is not valid Unicode ({exc.reason})"
        ) from exc
    if "\x00" in value:
        raise FieldError(field_name, "contains a NUL character; remove it")


def _field_cmd(value: Any) -> str:
    """A list is an argv, joined with shell quoting so the worker's shell sees it intact."""
    if isinstance(value, list):
        if not value:
            raise FieldError("cmd", "the command list is empty")
        if not all(isinstance(part, str) for part in value):
            raise FieldError(
                "cmd", f"a command list must hold only strings, got {value!r}; quote numbers"
            )
        value = shlex.join(value)
    if not isinstance(value, str):
        raise FieldError("cmd", f"expected a string or a list of strings, got {value!r}")
    cmd = value.strip()
    if not cmd:
        raise FieldError("cmd", "the command is empty")
    _check_encodable(cmd, "cmd")
    return cmd


def _field_kind(value: Any) -> str:
    kind = _as_str(value, "type")
    if kind not in TASK_KINDS:
        supported = ", ".join(repr(k) for k in TASK_KINDS)
        raise FieldError(
            "type", f"task type {kind!r} is not supported yet; use one of: {supported}"
        )
    return kind


def _field_mem(value: Any) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError("mem", f"must be a finite size, got {value!r}")
    return _guard("mem", lambda: parse_size(value, "mem"))


def _field_mem_limit(value: Any) -> int:
    limit = _guard("mem_limit", lambda: parse_size(value, "mem_limit"))
    if limit <= 0:
        raise FieldError("mem_limit", f"must be a positive size, got {value!r}")
    return limit


def _field_timeout(value: Any) -> float:
    seconds = _guard("timeout", lambda: parse_duration(value, "timeout"))
    if not math.isfinite(seconds) or seconds <= 0:
        raise FieldError("timeout", f"must be a positive, finite duration, got {value!r}")
    return seconds


def _field_retry_delay(value: Any) -> float:
    seconds = _guard("retry_delay", lambda: parse_duration(value, "retry_delay"))
    if not 0 <= seconds <= 86400:
        raise FieldError("retry_delay", f"must be between 0 and 1 day, got {value!r}")
    return seconds


def _field_int(field_name: str, low: int, high: int) -> Callable[[Any], int]:
    return lambda value: _guard(field_name, lambda: check_int(value, field_name, low, high))


def _env_items(value: Any) -> Iterator[tuple[Any, Any]]:
    """Accept a mapping (JSON/TOML) or ``KEY=VALUE`` strings (repeated CLI flags)."""
    if isinstance(value, Mapping):
        yield from value.items()
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        for item in value:
            key, sep, val = item.partition("=")
            if not sep:
                raise FieldError("env", f"expected KEY=VALUE, got {item!r}")
            yield key, val
    else:
        raise FieldError("env", f"expected a table of names to strings, got {value!r}")


def _env_value(key: str, value: Any) -> str:
    """Scalars become strings so ``THREADS = 4`` works; bools read as in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    raise FieldError("env", f"the value of {key!r} must be a string or number, got {value!r}")


def _field_env(value: Any) -> tuple[tuple[str, str], ...]:
    """Sorted, so the same environment always gives the same spec (and dedup key)."""
    env: dict[str, str] = {}
    for key, val in _env_items(value):
        if not isinstance(key, str) or not key or "=" in key:
            raise FieldError("env", f"invalid environment variable name {key!r}")
        env[key] = _env_value(key, val)
        _check_encodable(key, "env")
        _check_encodable(env[key], "env")
    return tuple(sorted(env.items()))


def _field_resources(value: Any) -> tuple[tuple[str, int], ...]:
    """``{license = 1}``: custom resources a worker offers with ``--resource``."""
    if not isinstance(value, Mapping):
        raise FieldError("resources", f"expected a table of names to counts, got {value!r}")
    return tuple(sorted((str(k), check_int(v, "resources", 1, 10**9)) for k, v in value.items()))


def _field_tags(value: Any) -> tuple[str, ...]:
    """Order kept (people read it), duplicates dropped (a tag is a set member)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
        raise FieldError("tags", f"expected a list of non-empty strings, got {value!r}")
    for tag in items:
        _check_encodable(tag, "tags")
    return tuple(dict.fromkeys(items))


def _field_func(value: Any) -> str:
    func = _as_str(value, "func").strip()
    if not FUNC_REF_RE.match(func):
        raise FieldError("func", f"cannot read function reference {func!r}; "
                         "write 'pkg.module:function'")
    return func


def _field_args(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise FieldError("args", f"expected a list of arguments, got {value!r}")
    return tuple(value)


def _field_kwargs(value: Any) -> tuple[tuple[str, Any], ...]:
    if not isinstance(value, dict):
        raise FieldError("kwargs", f"expected a table/object of keyword arguments, got {value!r}")
    for key in value:
        if not isinstance(key, str) or not key.isidentifier():
            raise FieldError("kwargs", f"invalid keyword argument name {key!r}")
    return tuple(sorted(value.items()))


def _json_or_str(token: str) -> Any:
    """A python line's argument value: single quotes only group words (and are
    removed); the text is then a JSON value if it parses as one, else a string."""
    if len(token) >= 2 and token[0] == token[-1] == "'":
        token = token[1:-1]
    try:
        return json.loads(token)
    except ValueError:
        return token


def _split_arguments(text: str) -> list[str]:
    """Split on whitespace outside quotes, keeping the quotes: ``"a b"`` stays a JSON
    string and ``{"k":1}`` keeps its inner quotes (a shell split would eat them)."""
    tokens: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            current.append(char)
            if char == "\\" and quote == '"' and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif char == quote:
                quote = ""
        elif char.isspace():
            if current:
                tokens.append("".join(current))
                current = []
        else:
            if char in "\"'":
                quote = char
            current.append(char)
        i += 1
    if quote:
        raise FieldError("args", f"cannot split the arguments: no closing {quote} quote")
    if current:
        tokens.append("".join(current))
    return tokens


def parse_python_call(text: str) -> tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]]:
    """``pkg.mod:fn 1 "two words" x=[1,2] name=bob`` -> (func, args, kwargs).

    Arguments are separated by whitespace outside quotes. Each is a JSON value if
    it parses as one (``1``, ``2.5``, ``true``, ``null``, ``[1,2]``, ``{"k":1}``,
    ``"7"`` for the string 7), else a plain string (``bob``, ``data/x.csv``).
    Single quotes group words containing spaces: ``'{"k": 1}'``, ``'two words'``.
    ``name=value`` (``name`` an identifier) is a keyword argument; keywords come
    after the positional arguments, as in Python.
    """
    tokens = _split_arguments(text)
    if not tokens:
        raise FieldError("func", "missing; write 'pkg.module:function' and its arguments")
    func = _field_func(tokens[0])
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for token in tokens[1:]:
        name, eq, value = token.partition("=")
        if eq and name.isidentifier():
            if name in kwargs:
                raise FieldError("args", f"keyword argument {name!r} given twice")
            kwargs[name] = _json_or_str(value)
        elif kwargs:
            raise FieldError("args", f"positional argument {token!r} after keyword arguments")
        else:
            args.append(_json_or_str(token))
    return func, tuple(args), tuple(sorted(kwargs.items()))


#: field name -> (TaskSpec attribute, converter)
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "cmd": ("cmd", _field_cmd),
    "name": ("name", lambda v: _as_str(v, "name")),
    "type": ("kind", _field_kind),
    "priority": ("priority", _field_int("priority", PRIORITY_MIN, PRIORITY_MAX)),
    "mem": ("mem", _field_mem),
    "mem_limit": ("mem_limit", _field_mem_limit),
    "cpus": ("cpus", _field_int("cpus", 0, 4096)),
    "gpus": ("gpus", _field_int("gpus", 0, 1024)),
    "timeout": ("timeout", _field_timeout),
    "retries": ("retries", _field_int("retries", 0, 1000)),
    "retry_delay": ("retry_delay", _field_retry_delay),
    "env": ("env", _field_env),
    "cwd": ("cwd", lambda v: _as_str(v, "cwd")),
    "tags": ("tags", _field_tags),
    "resources": ("resources", _field_resources),
    "func": ("func", _field_func),
    "args": ("args", _field_args),
    "kwargs": ("kwargs", _field_kwargs),
}

#: Field names accepted by JSON Lines, TOML and :func:`spec_from_fields`.
KNOWN_FIELDS: tuple[str, ...] = tuple(_FIELDS)


def _unknown_field(name: str) -> FieldError:
    close = difflib.get_close_matches(name, KNOWN_FIELDS, n=1)
    if close:
        return FieldError(name, f"unknown field {name!r}; did you mean {close[0]!r}?")
    return FieldError(name, f"unknown field {name!r}; known fields: {', '.join(KNOWN_FIELDS)}")


def _convert_fields(fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[FieldError]]:
    """Convert every field, collecting all errors so one pass reports them all.

    ``None`` means "not set", so callers (the CLI) can pass unset options as is.
    """
    values: dict[str, Any] = {}
    errors: list[FieldError] = []
    for name, raw in fields.items():
        entry = _FIELDS.get(name)
        if entry is None:
            errors.append(_unknown_field(str(name)))
            continue
        if raw is None:
            continue
        attr, convert = entry
        try:
            values[attr] = convert(raw)
        except FieldError as err:
            errors.append(err)
    return values, errors


def _build(values: Mapping[str, Any], label: str) -> TaskSpec:
    if "func" in values and "kind" not in values:
        values = {**values, "kind": "python"}  # func = "..." alone says what it is
    if values.get("kind") == "python" and "cmd" not in values:
        values = {**values, "cmd": ""}  # TaskSpec writes a readable one
    if "cmd" not in values:
        raise FieldError("cmd", "missing; every task needs a command to run")
    return TaskSpec(**values, source=label)


def spec_from_fields(fields: dict[str, Any], source: str, line: int) -> TaskSpec:
    """Build one spec from named fields; raises the first FieldError found.

    The single entry point for field rules, so TOML, JSON Lines and the CLI's
    flags accept and refuse exactly the same values.
    """
    values, errors = _convert_fields(fields)
    if errors:
        raise errors[0]
    return _build(values, f"{source}:{line}")


def _spec_or_problems(
    values: dict[str, Any], errors: list[FieldError], problems: _Problems, line: int
) -> TaskSpec | None:
    for err in errors:
        problems.add_field_error(line, err)
    if errors:
        return None
    try:
        return _build(values, f"{problems.source}:{line}")
    except FieldError as err:
        problems.add_field_error(line, err)
        return None


# --------------------------------------------------------------------------- line format


def _parse_line(text: str, problems: _Problems, line: int,
                columns_seen: dict[tuple[str, str, str], dict[str, Any]] | None = None,
                ) -> TaskSpec | None:
    """One ``type:priority:min_dram_GB:min_cpu:command`` line; every bad column reported.

    ``columns_seen`` maps (priority, mem, cpus) texts already converted without error
    to their values: a sweep of 100,000 lines has a handful of distinct requirement
    columns, and converting them again was a third of the parse time.
    """
    parts = text.split(":", 4)
    if len(parts) < 5:
        problems.add(
            line,
            None,
            f"expected 5 colon-separated fields {LINE_FORMAT}, found {len(parts)}; "
            f"write e.g. {_LINE_EXAMPLE}",
        )
        return None
    kind, priority, mem, cpus, cmd = (part.strip() for part in parts)
    values: dict[str, Any] = {}
    errors: list[FieldError] = []
    if not kind:
        errors.append(FieldError("type", "the task type is empty; write 'shell'"))
    elif kind not in TASK_KINDS:
        errors.append(
            FieldError(
                "type", f"unknown task type {kind!r}; write 'shell' or 'python'"
            )
        )
    known = columns_seen.get((priority, mem, cpus)) if columns_seen is not None else None
    if known is not None and kind == "shell":
        values.update(known)
        try:
            values["cmd"] = _field_cmd(cmd)
        except FieldError as err:
            errors.append(err)
        return _spec_or_problems(values, errors, problems, line)
    columns: list[tuple[str, Any, Callable[[Any], Any]]] = [
        ("priority", priority, _FIELDS["priority"][1]),
        ("mem", mem, _field_mem),
        ("cpus", cpus, _FIELDS["cpus"][1]),
    ]
    if kind == "python":
        values["kind"] = "python"
        try:
            values["func"], values["args"], values["kwargs"] = parse_python_call(cmd)
        except FieldError as err:
            errors.append(err)
    else:
        columns.append(("cmd", cmd, _field_cmd))
    column_errors = len(errors)
    for attr, raw, convert in columns:
        try:
            values[attr] = convert(raw)
        except FieldError as err:
            errors.append(err)
    if columns_seen is not None and len(errors) == column_errors and len(columns_seen) < 1024:
        columns_seen[(priority, mem, cpus)] = {
            attr: values[attr] for attr in ("priority", "mem", "cpus")}
    return _spec_or_problems(values, errors, problems, line)


def parse_lines(text: str, source: str, *, max_problems: int = 20) -> list[TaskSpec]:
    """Parse the predecessor's line format; blank lines and ``#`` comments are skipped."""
    problems = _Problems(source, max_problems)
    specs: list[TaskSpec] = []
    columns_seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        spec = _parse_line(stripped, problems, number, columns_seen)
        if spec is not None:
            specs.append(spec)
    problems.raise_if_any()
    return specs


# --------------------------------------------------------------------------- JSON Lines


def _load_json_object(text: str, problems: _Problems, line: int) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.add(
            line,
            None,
            f"invalid JSON: {exc.msg} (column {exc.colno}); "
            'write one JSON object per line, e.g. {"cmd": "echo hi"}',
        )
        return None
    except (ValueError, RecursionError) as exc:  # digit limit, absurd nesting
        problems.add(line, None, f"unreadable JSON ({exc}); write one flat JSON object per line")
        return None
    if not isinstance(data, dict):
        problems.add(
            line,
            None,
            f"expected a JSON object, got {type(data).__name__}; "
            'write e.g. {"cmd": "echo hi", "cpus": 2}',
        )
        return None
    return data


def parse_jsonl(text: str, source: str, *, max_problems: int = 20) -> list[TaskSpec]:
    """Parse one JSON object per line; blank lines and ``#`` comments are skipped."""
    problems = _Problems(source, max_problems)
    specs: list[TaskSpec] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        data = _load_json_object(stripped, problems, number)
        if data is None:
            continue
        values, errors = _convert_fields(data)
        spec = _spec_or_problems(values, errors, problems, number)
        if spec is not None:
            specs.append(spec)
    problems.raise_if_any()
    return specs


# --------------------------------------------------------------------------- TOML


def _header_lines(text: str, pattern: re.Pattern[str]) -> list[int]:
    """1-based lines of table headers, so errors point at the task, not line 1.

    A regex scan, not a TOML parse: tomllib gives no positions. It can be fooled
    by a header inside a multi-line string, which only shifts a line number.
    """
    return [n for n, raw in enumerate(text.split("\n"), start=1) if pattern.match(raw)]


def toml_key_line(text: str, key: str) -> int:
    """Best-effort line of a top-level key or table header; 1 when not found."""
    pattern = re.compile(rf"^\s*(?:\[\[?\s*)?[\"']?{re.escape(key)}[\"']?\s*[\]=.]")
    for number, raw in enumerate(text.split("\n"), start=1):
        if pattern.match(raw):
            return number
    return 1


def _toml_syntax_problem(exc: tomllib.TOMLDecodeError, text: str, problems: _Problems) -> None:
    message = str(exc)
    match = _TOML_WHERE_RE.search(message)
    line = text.count("\n") + 1
    where = ""
    if match:
        message = message[: match.start()]
        if match.group(1):
            line = int(match.group(1))
            where = f" at column {match.group(2)}"
        else:
            where = " at the end of the file"
    problems.add(line, None, f"TOML syntax error: {message}; fix the syntax{where}")


def _merge_defaults(defaults: Mapping[str, Any], task: Mapping[str, Any]) -> dict[str, Any]:
    """Task fields win; env is merged key by key and tags are a union, defaults first."""
    merged = {**defaults, **task}
    if "env" in defaults and "env" in task:
        merged["env"] = tuple(sorted({**dict(defaults["env"]), **dict(task["env"])}.items()))
    if "tags" in defaults and "tags" in task:
        merged["tags"] = tuple(dict.fromkeys((*defaults["tags"], *task["tags"])))
    return merged


def _toml_defaults(doc: Mapping[str, Any], text: str, problems: _Problems) -> dict[str, Any]:
    """Converted once and reported once, at the ``[defaults]`` header, not per task."""
    raw = doc.get("defaults", {})
    headers = _header_lines(text, _DEFAULTS_HEADER_RE)
    line = headers[0] if headers else toml_key_line(text, "defaults")
    if not isinstance(raw, dict):
        problems.add(line, None, "'defaults' must be a table; write [defaults] and fields under it")
        return {}
    values, errors = _convert_fields(raw)
    for err in errors:
        problems.add_field_error(line, err)
    return values


def _toml_tasks(doc: Mapping[str, Any], text: str, problems: _Problems) -> list[Any]:
    tasks = doc.get("task", [])
    if not isinstance(tasks, list):
        problems.add(
            toml_key_line(text, "task"),
            None,
            "'task' must be an array of tables; write each task under its own [[task]] header",
        )
        return []
    if not tasks:
        problems.add(1, None, "no [[task]] tables found; add one [[task]] table per task")
    return tasks


def _check_top_level(doc: Mapping[str, Any], text: str, problems: _Problems) -> None:
    for key in doc:
        if key in ("defaults", "task"):
            continue
        close = difflib.get_close_matches(key, ("defaults", "task"), n=1)
        fix = f"did you mean {close[0]!r}?" if close else "only [defaults] and [[task]] are allowed"
        problems.add(toml_key_line(text, key), None, f"unknown top-level key {key!r}; {fix}")


def parse_toml(text: str, source: str, *, max_problems: int = 20) -> list[TaskSpec]:
    """Parse ``[defaults]`` plus ``[[task]]`` tables; a file without tasks is refused.

    Unlike an empty line file (which may be a generated sweep that came out
    empty), a TOML file is hand-written, so no tasks almost surely means a typo
    such as ``[task]`` or ``[[tasks]]``.
    """
    problems = _Problems(source, max_problems)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        _toml_syntax_problem(exc, text, problems)
        raise SpecError(problems.kept, problems.total) from exc
    _check_top_level(doc, text, problems)
    defaults = _toml_defaults(doc, text, problems)
    tasks = _toml_tasks(doc, text, problems)
    headers = _header_lines(text, _TASK_HEADER_RE)
    fallback = toml_key_line(text, "task")
    specs: list[TaskSpec] = []
    for index, task in enumerate(tasks):
        line = headers[index] if index < len(headers) else fallback
        if not isinstance(task, dict):
            problems.add(line, None, f"each task must be a table, got {task!r}")
            continue
        values, errors = _convert_fields(task)
        spec = _spec_or_problems(_merge_defaults(defaults, values), errors, problems, line)
        if spec is not None:
            specs.append(spec)
    problems.raise_if_any()
    return specs


# --------------------------------------------------------------------------- files


def _read_error(source: str, exc: OSError) -> SpecError:
    if isinstance(exc, FileNotFoundError):
        fix = f"no such file; check the path (relative paths start at {os.getcwd()})"
    elif isinstance(exc, IsADirectoryError):
        fix = "is a directory; give the path of a task file inside it"
    elif isinstance(exc, PermissionError):
        fix = "permission denied; make the file readable (chmod +r) or copy it"
    else:
        fix = f"cannot read the file ({exc.strerror or exc}); check the path and try again"
    return SpecError([Problem(source, 0, None, fix)])


def _decode(data: bytes, source: str, max_problems: int) -> str:
    """UTF-8 (a leading BOM is dropped); otherwise every undecodable line is reported."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    problems = _Problems(source, max_problems)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            problems.add(
                number,
                None,
                f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                "save the file as UTF-8",
            )
    problems.raise_if_any()
    raise AssertionError("unreachable: whole-file decode failed but every line decoded")


def _parser_for(path: str) -> _Parser:
    suffix = Path(path).suffix.lower()
    if suffix in _TOML_SUFFIXES:
        return parse_toml
    if suffix in _JSONL_SUFFIXES:
        return parse_jsonl
    return parse_lines


def parse_task_file(path: str | os.PathLike[str], *, max_problems: int = 20) -> list[TaskSpec]:
    """Read a task file and parse it by suffix (``.toml``, ``.jsonl``/``.ndjson``, else lines).

    Reads bytes and decodes itself, so an encoding problem is reported with its
    line instead of surfacing as a bare ``UnicodeDecodeError``.
    """
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise _read_error(source, exc) from exc
    text = _decode(data, source, max_problems)
    return _parser_for(source)(text, source, max_problems=max_problems)
