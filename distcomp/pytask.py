"""Child side of a python task: ``python -m distcomp.pytask CALL_FILE RESULT_FILE``.

The worker runs this under the same one-line shell wrapper as a shell task (so
re-adoption, the guardian, timeouts, cancels and the memory guard treat both
alike). ``CALL_FILE`` holds either a cloudpickled ``(fn, args, kwargs)``
(submitted through the API) or JSON ``{"func": "pkg.mod:fn", "args": [...],
"kwargs": {...}}`` (a reference from a task file: no pickle involved).

The outcome goes to ``RESULT_FILE`` as a cloudpickled tuple, written to a
temporary name and renamed, so the worker never reads half a result:

* ``("ok", value)`` and exit status 0;
* ``("error", exc_pickle_or_None, "module.Type", message, traceback_text)`` and
  exit status 1. The exception is pickled separately so that an exception that
  cannot be pickled (or unpickled by the client) still reports its type,
  message and traceback.

A crash that kills the interpreter (a segfault) writes nothing; the worker then
reports the signal, as for any shell command.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

#: Marks a payload as a chunk of ``Executor.map`` calls: run fn on each item in turn.
CHUNK_MARK = "distcomp.chunk"


def resolve(ref: str) -> Callable[..., Any]:
    """``pkg.module:function`` (or ``pkg.module:Class.method``) -> the callable."""
    module_name, _, attr_path = ref.partition(":")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise TypeError(f"{ref} is not callable (it is a {type(target).__name__})")
    return target  # type: ignore[no-any-return]


def load_call(data: bytes) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Decode a call file: JSON for references, cloudpickle otherwise."""
    if data[:1] == b"{":
        call = json.loads(data)
        return resolve(call["func"]), tuple(call.get("args", ())), dict(call.get("kwargs", {}))
    fn, args, kwargs = cloudpickle.loads(data)
    return fn, tuple(args), dict(kwargs)


def run_chunk(fn: Callable[..., Any], items: list[tuple[Any, ...]]) -> list[Any]:
    """Run one chunk of ``Executor.map(chunksize=n)``; results in item order."""
    return [fn(*item) for item in items]


def _error_record(exc: BaseException) -> tuple[Any, ...]:
    kind = type(exc)
    name = f"{kind.__module__}.{kind.__qualname__}"
    text = "".join(traceback.format_exception(exc))
    try:
        blob: bytes | None = cloudpickle.dumps(exc)
    except Exception:  # any pickling failure: the type name will do
        blob = None
    return ("error", blob, name, str(exc), text)


def _write(path: str, record: tuple[Any, ...]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        cloudpickle.dump(record, handle)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m distcomp.pytask CALL_FILE RESULT_FILE", file=sys.stderr)
        return 2
    call_path, result_path = argv
    # Importable as the worker's cwd would be for ``python script.py``.
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        with open(call_path, "rb") as handle:
            fn, args, kwargs = load_call(handle.read())
        value = fn(*args, **kwargs)
    except BaseException as exc:  # every failure is reported, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        record = _error_record(exc)
        try:
            _write(result_path, record)
        except Exception as write_exc:
            print(f"distcomp: cannot write the result file: {write_exc}", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
        return 1
    try:
        _write(result_path, ("ok", value))
    except Exception as exc:  # an unpicklable return value
        _write(result_path, _error_record(
            TypeError(f"the task's return value could not be pickled: {exc}")))
        print(f"distcomp: the return value could not be pickled: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
