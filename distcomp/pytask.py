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

With ``--serve`` the same code runs in a warm pool process (see ``distcomp.pool``):
one interpreter runs call after call, so a call costs no interpreter start-up.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import faulthandler
import importlib
import json
import os
import pickle
import resource
import signal
import struct
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import cloudpickle

#: A task spec's ``payload`` that holds the pickled call itself (base64), not a key.
INLINE_PREFIX = "inline:"

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


#: A pickled call whose function is pickled on its own: ``SPLIT_MAGIC``, the
#: function pickle's length (4 bytes, big-endian), the function pickle, then the
#: pickle of ``(args, kwargs)``. ``Executor.map`` pickles its function once for
#: thousands of calls this way, and a warm interpreter unpickles each distinct
#: function once (``_FUNCTIONS``) instead of once per call.
SPLIT_MAGIC = b"DCS1"
_FUNCTIONS: collections.OrderedDict[bytes, Callable[..., Any]] = collections.OrderedDict()
_FUNCTIONS_KEPT = 32


def pack_call(function_pickle: bytes, args: Sequence[Any], kwargs: dict[str, Any]) -> bytes:
    """A split call (see ``SPLIT_MAGIC``) from an already pickled function."""
    return b"".join((SPLIT_MAGIC, _FRAME.pack(len(function_pickle)), function_pickle,
                     cloudpickle.dumps((tuple(args), kwargs))))


def _function(function_pickle: bytes) -> Callable[..., Any]:
    fn = _FUNCTIONS.get(function_pickle)
    if fn is None:
        fn = cloudpickle.loads(function_pickle)
        _FUNCTIONS[function_pickle] = fn
        while len(_FUNCTIONS) > _FUNCTIONS_KEPT:
            _FUNCTIONS.popitem(last=False)
    else:
        _FUNCTIONS.move_to_end(function_pickle)
    return fn


def load_call(data: bytes) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Decode a call: JSON for references, a split call, or a cloudpickled
    ``(fn, args, kwargs)``."""
    if data[:1] == b"{":
        call = json.loads(data)
        return resolve(call["func"]), tuple(call.get("args", ())), dict(call.get("kwargs", {}))
    if data[:len(SPLIT_MAGIC)] == SPLIT_MAGIC:
        start = len(SPLIT_MAGIC) + FRAME_HEADER
        (size,) = _FRAME.unpack_from(data, len(SPLIT_MAGIC))
        fn = _function(bytes(data[start:start + size]))
        args, kwargs = cloudpickle.loads(data[start + size:])
        return fn, tuple(args), dict(kwargs)
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


class _OutcomeSink:
    """Where a call's pickled outcome goes: memory up to ``limit`` bytes (a warm
    interpreter sends it back in its reply), past that a temporary file renamed to
    ``path`` at the end, so the worker never reads half a result and a large one
    is never held in memory twice. ``limit`` < 0: always the file."""

    def __init__(self, path: str, limit: int) -> None:
        self.path, self.limit = path, limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.file: BinaryIO | None = None

    def write(self, data: bytes | memoryview | pickle.PickleBuffer) -> int:
        # Protocol 5 hands large buffers (numpy arrays...) over as PickleBuffers,
        # which have no len(); a memoryview's len() counts items, not bytes.
        size = memoryview(data).nbytes
        if self.file is None and self.size + size > self.limit:
            self.file = open(f"{self.path}.tmp", "wb")  # noqa: SIM115 (closed in finish)
            self.file.writelines(self.chunks)
            self.chunks = []
        if self.file is not None:
            self.file.write(data)
        else:
            self.chunks.append(bytes(data))
        self.size += size
        return size

    def reset(self) -> None:
        """Forget what was written (a value that failed to pickle half-way)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}.tmp")
        self.chunks, self.size, self.file = [], 0, None

    def finish(self) -> bytes | None:
        """The outcome if it stayed in memory; None once it is in the file."""
        if self.file is None:
            return b"".join(self.chunks)
        self.file.close()
        os.replace(f"{self.path}.tmp", self.path)
        return None


def execute(data: bytes, result_path: str, inline_max: int = -1) -> tuple[int, bytes | None]:
    """Run one call; returns 0 if it returned, 1 if it raised (or its value could not
    be pickled or kept), and its pickled outcome record if at most ``inline_max``
    bytes (else the record is in ``result_path``). Shared by both modes."""
    record: tuple[Any, ...]
    try:
        fn, args, kwargs = load_call(data)
        record, code = ("ok", fn(*args, **kwargs)), 0
    except BaseException as exc:  # every failure is reported, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exception(exc, file=sys.stderr)
        record, code = _error_record(exc), 1
    sink = _OutcomeSink(result_path, inline_max)
    try:
        try:
            try:
                # Plain pickle first: several times faster, and it refuses (rather
                # than mis-pickles) what only cloudpickle can carry, such as
                # classes the call's own by-value module defined.
                pickle.dump(record, sink, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                sink.reset()
                cloudpickle.dump(record, sink)
        except Exception as exc:
            if code:
                raise  # an error record always pickles: this is the file failing
            sink.reset()
            print(f"distcomp: the return value could not be pickled: {exc}", file=sys.stderr)
            record, code = _error_record(
                TypeError(f"the task's return value could not be pickled: {exc}")), 1
            cloudpickle.dump(record, sink)
        return code, sink.finish()
    except OSError as exc:
        sink.reset()
        print(f"distcomp: cannot write the result file: {exc}", file=sys.stderr)
        return 1, None


# -- pool mode ------------------------------------------------------------------
# ``python -m distcomp.pytask --serve REQUEST_FD REPLY_FD WORKER_PID TAG``: a warm
# interpreter that runs one call after another for the worker (``distcomp.pool``).
# Each request names the attempt's log files, which become fds 1 and 2 for the
# call, so the call's output lands exactly where a one-shot task's would.

_FRAME = struct.Struct("!I")
FRAME_HEADER = _FRAME.size
_PR_SET_PDEATHSIG = 1


def frame_size(buffer: bytes | bytearray) -> int | None:
    """The length of the complete frame at the start of ``buffer``, if it is all there."""
    if len(buffer) < FRAME_HEADER:
        return None
    (size,) = _FRAME.unpack_from(buffer)
    return FRAME_HEADER + size if len(buffer) >= FRAME_HEADER + size else None


def read_frame(stream: BinaryIO) -> Any:
    """One length-prefixed pickle from ``stream``; None at end of stream."""
    head = stream.read(FRAME_HEADER)
    if len(head) < FRAME_HEADER:
        return None
    (size,) = _FRAME.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


def frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(body)) + body


def _die_with(worker_pid: int) -> None:
    """Ask the kernel to kill us when the worker dies (a crashed worker must not
    leave warm interpreters behind); if it is already gone, go now."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != worker_pid:
        os._exit(0)


class _Interpreter:
    """What a warm interpreter keeps open between calls (each saves a syscall or
    three per call): /dev/null for fds 1 and 2 between calls, and its own statm."""

    def __init__(self) -> None:
        self.null = os.open(os.devnull, os.O_WRONLY)
        self.statm = os.open("/proc/self/statm", os.O_RDONLY) \
            if os.path.exists("/proc/self/statm") else -1

    def rss(self) -> int:
        if self.statm < 0:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return int(os.pread(self.statm, 128, 0).split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _run_request(request: dict[str, Any], here: _Interpreter) -> dict[str, Any]:
    """Run one call with the attempt's logs as stdout/stderr, its environment and
    working directory; put everything back afterwards. The reply carries the
    outcome record when it is small enough, and the logs' sizes (the worker reads
    no log that stayed empty)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out = os.open(request["out"], flags, 0o644)
    err = os.open(request["err"], flags, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    # Set (and later put back) only what differs (calls of one map share most of
    # it): each os.environ assignment is a putenv and two encodes.
    saved_env = {name: os.environ.get(name) for name in request["env"]}
    saved_streams = sys.stdout, sys.stderr
    os.environ.update({name: value for name, value in request["env"].items()
                       if saved_env[name] != value})
    home = os.getcwd()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sizes = [0, 0]
    try:
        if request["cwd"]:
            os.chdir(request["cwd"])
        data = request["call"]
        if data is None:
            with open(request["call_path"], "rb") as handle:
                data = handle.read()
        code, result = execute(data, request["result"], request.get("inline_max", -1))
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.chdir(home)
        sys.stdout, sys.stderr = saved_streams  # in case the call replaced them
        for stream in saved_streams:
            with contextlib.suppress(Exception):
                stream.flush()
        for name, value in saved_env.items():
            if os.environ.get(name) == value:
                continue
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                sizes[fd - 1] = os.fstat(fd).st_size
            os.dup2(here.null, fd)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss only grows: a rise during this call is this call's peak.
    peak = after * 1024 if after > before else 0
    return {"code": code, "peak": peak, "rss": here.rss(), "result": result,
            "out_size": sizes[0], "err_size": sizes[1]}


def serve(request_fd: int, reply_fd: int, worker_pid: int) -> int:
    _die_with(worker_pid)
    # Not inherited by anything a call starts: a leftover grandchild holding the
    # reply pipe would hide this interpreter's death from the worker.
    os.set_inheritable(request_fd, False)
    os.set_inheritable(reply_fd, False)
    faulthandler.enable()  # a segfault's traceback goes to the call's stderr log
    if "" not in sys.path:
        sys.path.insert(0, "")
    here = _Interpreter()
    with open(request_fd, "rb") as requests, open(reply_fd, "wb", buffering=0) as replies:
        while True:
            request = read_frame(requests)
            if request is None:
                return 0  # the worker closed the pipe: retire
            view = memoryview(frame(_run_request(request, here)))
            while view:  # a reply with a result can be larger than the pipe
                view = view[replies.write(view) or 0:]


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "--serve":
        code = serve(int(argv[1]), int(argv[2]), int(argv[3]))
        # Exit now: a non-daemon thread some call left running must not keep a
        # retired interpreter (and the memory it was retired for) alive.
        os._exit(code)
    if len(argv) != 2:
        print("usage: python -m distcomp.pytask CALL_FILE RESULT_FILE", file=sys.stderr)
        return 2
    call_path, result_path = argv
    # Importable as the worker's cwd would be for ``python script.py``.
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        with open(call_path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        print(f"distcomp: cannot read the call file: {exc}", file=sys.stderr)
        return 2
    return execute(data, result_path)[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
