"""Python API for python tasks: futures resolved from the event stream, and
:class:`Executor`, a real :class:`concurrent.futures.Executor`.

How a call travels: the client cloudpickles ``(fn, args, kwargs)`` into
``P payload:<id>`` (see ``store``), then submits a ``kind="python"`` task naming
that key, in one atomic ``submit`` per batch (``map`` of 10,000 calls is one
job, one script call). A worker runs it in a warm interpreter (``distcomp.pool``)
or a fresh one (``distcomp.pytask``) and puts the pickled outcome into the task
record (or a file, past the size cap).

How a future resolves: each :class:`Client` has at most one listener thread,
blocked in ``XREAD`` on its own notification stream (``P notify:<client>``),
where the Lua transitions tell the final outcome (``succeeded``/``failed``/
``cancelled``) of each task it submitted. The listener sets those futures; a
small result comes inside the notice, others are read for a whole batch of
notices in one pipelined read. No future polls, and a client wakes for its own
tasks' outcomes only, not for every event of the queue. Futures for tasks
someone else submitted (``client.job_handle(...).futures()``) are served from
the queue's event stream, read beside the client's own while there are any.
Both streams are capped (about 10,000 entries), so a client that fell far
behind could miss an entry: every few seconds the listener checks the states
of the futures still pending, in one pipelined read, as a safety net.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures as cf
import contextlib
import logging
import os
import reprlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle
import redis

from .pytask import INLINE_PREFIX, pack_call, run_chunk
from .spec import TaskSpec, parse_duration, parse_size
from .store import NoJobError, Store, SubmitResult

if TYPE_CHECKING:
    from .client import Client
    from .store import JobInfo

log = logging.getLogger("distcomp.executor")

#: Keyword arguments of ``submit``/``map`` that are task options, not the function's.
#: A function taking a keyword of one of these names gets it through functools.partial.
#: Pickled calls up to this size travel inside the task's spec (``payload`` =
#: ``inline:<base64>``): no key of their own, and the worker gets them with the
#: claim instead of fetching them. Larger ones get a ``P payload:<id>`` key.
INLINE_PAYLOAD_BYTES = 8 * 1024
OPTION_NAMES = ("mem", "mem_limit", "cpus", "gpus", "resources", "priority", "timeout",
                "retries", "retry_delay", "tags", "name", "env", "cwd")

_OUTCOME_FIELDS = ("state", "result", "result_path", "result_size", "reason", "host")
_FINAL_EVENTS = ("succeeded", "failed", "cancelled")
#: Final events kept for tasks whose future does not exist yet (see ``_early``).
_EARLY_KEPT = 10_000
#: Every so many seconds, pending futures are checked against their tasks' states
#: (safety net for events missed or trimmed from the stream).
_RECONCILE_AFTER = 5.0


class RemoteError(Exception):
    """A python task failed without an exception we could rebuild here: it crashed
    (signal, out of memory, timeout), or its exception could not be unpickled."""

    def __init__(self, message: str, task_id: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.task_id = task_id
        self.reason = reason


class ResultUnavailableError(RemoteError):
    """The result is larger than the record's cap and its file is not readable here."""


class RemoteTraceback(Exception):
    """Carries the task's traceback text; set as ``__cause__`` of the re-raised
    exception so the usual traceback display shows where it went wrong remotely."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class TaskFuture(cf.Future[Any]):
    """A future for one python task; ``cancel()`` cancels the task in the queue
    while it is still queued (a running task cannot be cancelled, as in the stdlib)."""

    def __init__(self, api: PythonTasks, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id
        self._api = api

    @property
    def job_id(self) -> str:
        return self.task_id.split(".", 1)[0]

    def running(self) -> bool:
        """Asks the queue while the call is not known to have started (no notice is
        sent when a task starts: it would wake the client once more per call)."""
        if super().running():
            return True
        if self.done() or not self._api.is_running(self.task_id):
            return False
        _mark_running(self)
        return super().running()

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        if super().running():
            return False
        if not self._api.cancel_queued([self.task_id]):
            return self.cancelled()
        return _mark_cancelled(self)


def _mark_running(fut: cf.Future[Any]) -> None:
    """PENDING -> RUNNING from what the queue said; a no-op if the future is running
    or finished already (or gets there meanwhile, from another thread)."""
    with contextlib.suppress(RuntimeError):
        if not cf.Future.running(fut) and not fut.done():
            fut.set_running_or_notify_cancel()


def _mark_cancelled(fut: cf.Future[Any]) -> bool:
    """Cancel locally and notify waiters (``wait``/``as_completed`` count a future as
    done only once ``set_running_or_notify_cancel`` saw it cancelled)."""
    already = fut.cancelled()  # and notified: notifying twice logs an error
    if not cf.Future.cancel(fut):
        return False
    if not already:
        with contextlib.suppress(RuntimeError):
            fut.set_running_or_notify_cancel()
    return True


def _display(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """What ``distcomp tasks`` shows for a pickled call: ``python: mod.fn(1, 'a')``."""
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    short = reprlib.Repr()
    short.maxstring, short.maxother = 40, 40
    parts = [short.repr(a) for a in args] + [f"{k}={short.repr(v)}" for k, v in kwargs.items()]
    inner = ", ".join(parts)
    return f"python: {name}({inner[:200]})"


def _task_spec(payload: str, display: str, options: dict[str, Any]) -> TaskSpec:
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown task options: {', '.join(sorted(unknown))}")
    mem, mem_limit = options.get("mem"), options.get("mem_limit")
    timeout, retry_delay = options.get("timeout"), options.get("retry_delay")
    return TaskSpec(
        cmd=display, kind="python", payload=payload,
        mem=parse_size(mem) if mem is not None else 0,
        mem_limit=parse_size(mem_limit) if mem_limit is not None else None,
        cpus=options.get("cpus", 1), gpus=options.get("gpus", 0),
        resources=tuple(sorted(dict(options.get("resources", {})).items())),
        priority=options.get("priority", 0),
        timeout=parse_duration(timeout) if timeout is not None else None,
        retries=options.get("retries"),
        retry_delay=parse_duration(retry_delay) if retry_delay is not None else None,
        tags=tuple(options.get("tags", ())), name=options.get("name"),
        env=tuple(sorted((str(k), str(v)) for k, v in dict(options.get("env", {})).items())),
        cwd=options.get("cwd"))


def decode_outcome(task_id: str, fields: dict[str, str | None]) -> tuple[bool, Any]:
    """(True, value) or (False, exception) from a finished task's record fields."""
    state = fields.get("state")
    reason = fields.get("reason") or ""
    if state == "cancelled":
        return False, cf.CancelledError(f"task {task_id} was cancelled: {reason}")
    data: bytes | None = None
    try:
        if fields.get("result"):
            data = base64.b64decode(fields["result"] or "")
        elif fields.get("result_path"):
            path = Path(fields["result_path"] or "")
            try:
                data = path.read_bytes()
            except OSError as exc:
                return False, ResultUnavailableError(
                    f"the result of task {task_id} ({fields.get('result_size')} bytes, over "
                    f"the worker's --result-max-bytes) is in {path} on {fields.get('host')}, "
                    f"which is not readable here ({exc.strerror}); give the workers a "
                    "--result-dir this machine shares, or raise --result-max-bytes",
                    task_id, reason)
    except (ValueError, TypeError) as exc:
        return False, RemoteError(f"task {task_id}: corrupt result: {exc}", task_id, reason)
    if data is None:
        if state == "succeeded":
            return False, RemoteError(f"task {task_id} succeeded but left no result",
                                      task_id, reason)
        return False, RemoteError(f"task {task_id} failed: {reason}", task_id, reason)
    try:
        record = cloudpickle.loads(data)
    except Exception as exc:  # a type that does not import here
        return False, RemoteError(f"task {task_id}: cannot unpickle its result here: "
                                  f"{type(exc).__name__}: {exc}", task_id, reason)
    if record[0] == "ok":
        return True, record[1]
    return False, _exception_from(task_id, record, reason)


def _exception_from(task_id: str, record: tuple[Any, ...], reason: str) -> BaseException:
    _, blob, name, message, tb = record
    exc: Any = None
    if blob is not None:
        with contextlib.suppress(Exception):
            exc = cloudpickle.loads(blob)
    if not isinstance(exc, BaseException):
        exc = RemoteError(f"task {task_id} raised {name}: {message}", task_id, reason)
    exc.__cause__ = RemoteTraceback(tb)
    if hasattr(exc, "add_note"):
        exc.add_note(f"(raised in distcomp task {task_id})")
    return exc  # type: ignore[no-any-return]


class PythonTasks:
    """Submission and the one listener that resolves futures, for one Client."""

    def __init__(self, store: Store) -> None:
        # Our own connections: the listener blocks in XREAD on one of them.
        self.store = Store(store.url, store.queue)
        self._events = Store(store.url, store.queue)
        self._lock = threading.Lock()
        self._pending: dict[str, TaskFuture] = {}
        #: This client's notification stream, where our tasks' outcomes are told.
        self.client_id = uuid.uuid4().hex[:16]
        self._notify_key = self.store.notify_key(self.client_id)
        #: Last entry read of each stream the listener reads: ours from its start;
        #: the queue's events once a future for someone else's task exists.
        self._after: dict[str, str] = {self._notify_key: "0-0"}
        #: Pending futures of tasks submitted by others (no notices for those).
        self._foreign: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: The job single calls (``submit``) of this client go into, made on the first.
        self._session_job: str | None = None
        #: Final events of tasks with no future yet: a warm interpreter can finish a
        #: call before ``submit`` has returned its id (bounded; oldest dropped).
        self._early: collections.OrderedDict[str, dict[str, str | None] | None] = \
            collections.OrderedDict()
        self._session_lock = threading.Lock()

    # -- submitting ------------------------------------------------------
    def submit_calls(self, fn: Callable[..., Any],
                     calls: Sequence[tuple[Sequence[Any], dict[str, Any]]],
                     options: dict[str, Any], *, job_name: str = "",
                     session: bool = False) -> list[TaskFuture]:
        """Submit many calls of ``fn`` atomically, as a new job; ``session``: into this
        client's one job for single calls instead (a loop of ``submit`` calls is then
        one job of many tasks, not many jobs of one). One round trip either way:
        the payloads travel with the submission."""
        if not calls:
            return []
        self._ensure_listener()
        blobs: dict[str, bytes] = {}
        specs: list[TaskSpec] = []
        function_pickle = cloudpickle.dumps(fn)  # once, however many calls
        for args, kwargs in calls:
            blob = pack_call(function_pickle, args, kwargs)
            if len(blob) <= INLINE_PAYLOAD_BYTES:
                key = INLINE_PREFIX + base64.b64encode(blob).decode()
            else:
                key = self.store.payload_key(uuid.uuid4().hex)
                blobs[key] = blob
            display = _display(run_chunk if fn is run_chunk else fn, args, kwargs)
            specs.append(_task_spec(key, display, options))
        if session:
            result = self._submit_to_session(specs, blobs)
        else:
            name = job_name or f"python: {getattr(fn, '__qualname__', 'call')}"
            result = self.store.submit(specs, job_name=name, dedup=False, payloads=blobs,
                                       notify=self.client_id)
        futures = [TaskFuture(self, tid) for tid in result.task_ids]
        carried: dict[str, dict[str, str | None]] = {}
        unread: list[str] = []
        with self._lock:
            for fut in futures:
                self._pending[fut.task_id] = fut
                if fut.task_id in self._early:  # it finished before we knew its id
                    outcome = self._early.pop(fut.task_id)
                    if outcome is None:
                        unread.append(fut.task_id)
                    else:
                        carried[fut.task_id] = outcome
        for tid, outcome in carried.items():
            self._settle(tid, outcome)
        if unread:
            self._resolve(unread)
        return futures

    def _submit_to_session(self, specs: list[TaskSpec], blobs: dict[str, bytes]
                           ) -> SubmitResult:
        with self._session_lock:
            if self._session_job is not None:
                try:
                    return self.store.submit(specs, dedup=False, payloads=blobs,
                                             job_id=self._session_job,
                                             notify=self.client_id)
                except NoJobError:  # archived or deleted meanwhile: start another
                    pass
            name = f"python: calls from {socket.gethostname()} (pid {os.getpid()})"
            result = self.store.submit(specs, job_name=name, dedup=False, payloads=blobs,
                                       notify=self.client_id)
            self._session_job = result.job_id
            return result

    def cancel_queued(self, task_ids: Sequence[str]) -> list[str]:
        """Cancel those of the tasks that are still queued (not running ones), in two
        round trips however many; returns those it cancelled. (A task claimed between
        the read and the cancel is cancelled too, and its future set to CancelledError
        by the listener.)"""
        if not task_ids:
            return []
        rows = self.store.task_fields(task_ids, ["state"])
        queued = [tid for tid, row in zip(task_ids, rows, strict=True) if row[0] == "queued"]
        if queued:
            self.store.cancel(queued, reason="cancelled through its future")
        return queued

    def cancel_futures(self, futures: Sequence[TaskFuture]) -> None:
        """``cancel()`` for many futures at once."""
        # (The local state only: ``running()`` would ask Redis once per future.)
        waiting = [f for f in futures if not f.done() and not cf.Future.running(f)]
        cancelled = set(self.cancel_queued([f.task_id for f in waiting]))
        for fut in waiting:
            if fut.task_id in cancelled:
                _mark_cancelled(fut)

    def futures_of(self, task_ids: Sequence[str]) -> list[TaskFuture]:
        """Futures for tasks submitted by anyone (e.g. ``client.job(...)``); resolved by
        the listener like our own, or at once if already finished."""
        self._ensure_listener()
        futures = []
        with self._lock:
            events = self.store.events_key()
            if events not in self._after:
                # Taken before the reconcile below, so no outcome can slip between.
                self._after[events] = self._events.last_event_id()
            for tid in task_ids:
                fut = self._pending.get(tid)
                if fut is None:
                    fut = self._pending[tid] = TaskFuture(self, tid)
                    self._foreign.add(tid)
                futures.append(fut)
        self._reconcile(list(task_ids))
        return futures

    def is_running(self, task_id: str) -> bool:
        try:
            return self.store.task_fields([task_id], ["state"])[0][0] == "running"
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    # -- the listener ----------------------------------------------------
    def _ensure_listener(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._listen, name="distcomp-futures",
                                            daemon=True)
            self._thread.start()

    def _listen(self) -> None:
        state = {"last_check": time.monotonic(), "backoff": 0.1}
        while not self._stop.is_set():
            try:
                self._listen_once(state)
                state["backoff"] = 0.1
            except Exception as exc:  # a listener that dies leaves every future hanging
                if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
                    log.warning("future listener lost Redis (%s); retrying", exc)
                else:
                    log.exception("future listener: unexpected error; retrying")
                self._stop.wait(state["backoff"])
                state["backoff"] = min(state["backoff"] * 2, 5.0)
                with self._lock:
                    ids = list(self._pending)
                # What was read but not settled before the error: the states say.
                with contextlib.suppress(Exception):
                    if ids:
                        self._reconcile(ids)

    def _listen_once(self, state: dict[str, float]) -> None:
        """One read of the streams and what it settles; the safety net when due."""
        events_key = self.store.events_key()
        with self._lock:
            if not self._foreign:
                self._after.pop(events_key, None)  # nobody else's tasks to hear of
            after = dict(self._after)
        replies = self._events.read_streams(after, block_ms=500)
        now = time.monotonic()
        if now - state["last_check"] > _RECONCILE_AFTER:
            # Safety net, busy stream or not: an entry trimmed from a capped
            # stream before we read it must not leave a future waiting forever.
            state["last_check"] = now
            with self._lock:
                ids = list(self._pending)
            if ids:
                self._reconcile(ids)
        for key, entries in replies:
            if entries:
                with self._lock:
                    if key in self._after:
                        self._after[key] = entries[-1][0]
                self._take_notices(entries, own=key != events_key)

    def _take_notices(self, entries: list[tuple[str, dict[str, str]]], *, own: bool) -> None:
        """Settle the futures these entries finish. ``own``: from our notification
        stream (every entry is one of our tasks' outcomes, perhaps of a future not
        made yet); else from the queue's events, where only foreign futures count."""
        finished: list[str] = []
        carried: dict[str, dict[str, str | None]] = {}
        with self._lock:
            for _, fields in entries:
                tid = fields.get("task", "")
                kind = fields.get("type")
                fut = self._pending.get(tid)
                if not own and tid not in self._foreign:
                    continue  # ours come on our own stream
                if fut is None:
                    if own and kind in _FINAL_EVENTS:
                        self._early[tid] = ({"state": "succeeded", "result": fields["result"]}
                                            if kind == "succeeded" and fields.get("result")
                                            else None)
                        while len(self._early) > _EARLY_KEPT:
                            self._early.popitem(last=False)
                    continue
                if kind == "claim":
                    _mark_running(fut)
                elif kind == "cancelled" and fields.get("was") == "running":
                    # It had started (we are told no starts): as in the stdlib, a
                    # running call is not cancelled() but raises CancelledError.
                    _mark_running(fut)
                    finished.append(tid)
                elif kind == "succeeded" and fields.get("result"):
                    # a small result came with the notice: nothing to read
                    carried[tid] = {"state": "succeeded", "result": fields["result"]}
                elif kind in _FINAL_EVENTS:
                    finished.append(tid)
        for tid, outcome in carried.items():
            self._settle(tid, outcome)
        if finished:
            self._resolve(finished)

    def _reconcile(self, task_ids: list[str]) -> None:
        """Resolve any of these tasks that already finished (safety net, and for
        futures created after the fact)."""
        try:
            rows = self.store.task_fields(task_ids, ["state"])
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return
        done = [tid for tid, row in zip(task_ids, rows, strict=True)
                if row[0] in _FINAL_EVENTS]
        if done:
            self._resolve(done)

    def _resolve(self, task_ids: list[str]) -> None:
        rows = self.store.task_fields(task_ids, _OUTCOME_FIELDS)
        for tid, row in zip(task_ids, rows, strict=True):
            fields = dict(zip(_OUTCOME_FIELDS, row, strict=True))
            if fields["state"] not in _FINAL_EVENTS:
                continue  # retried meanwhile: a later event will come
            self._settle(tid, fields)

    def _settle(self, tid: str, fields: dict[str, str | None]) -> None:
        """Set the future of a finished task from its outcome fields."""
        with self._lock:
            fut = self._pending.pop(tid, None)
            self._foreign.discard(tid)
        if fut is None or fut.done():
            return
        ok, value = decode_outcome(tid, fields)
        if fields["state"] == "cancelled" and _mark_cancelled(fut):
            return
        with contextlib.suppress(cf.InvalidStateError):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(redis.RedisError, OSError):
            self.store.delete_notify(self.client_id)
        self.store.close()
        self._events.close()


class JobHandle:
    """A submitted job: progress, results and cancel, by job id."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def info(self) -> JobInfo:
        return self.client.job(self.job_id)

    def progress(self) -> dict[str, int]:
        """Tasks per state, e.g. ``{"queued": 3, "running": 2, "succeeded": 95, ...}``."""
        info = self.info()
        return {"total": info.n_tasks, **info.counts}

    def futures(self) -> list[TaskFuture]:
        return self.client._python().futures_of(self.client.store.task_ids_of_job(self.job_id))

    def results(self, timeout: float | None = None) -> list[Any]:
        """Every task's return value in task order; waits; raises the first failure."""
        return gather(self.futures(), timeout=timeout)

    def cancel(self) -> int:
        return self.client.cancel([self.job_id])


def gather(futures: Iterable[cf.Future[Any]], timeout: float | None = None) -> list[Any]:
    """Results in order; raises the first exception met (in order), like ``map``."""
    end = None if timeout is None else time.monotonic() + timeout
    return [f.result(None if end is None else max(0.0, end - time.monotonic()))
            for f in futures]


class Executor(cf.Executor):
    """A :class:`concurrent.futures.Executor` whose calls run as distcomp python tasks.

    ``Executor()`` uses the embedded server and starts a local worker with every
    core; ``Executor(url=...)`` or ``Executor(client)`` uses a shared queue and, by
    default, no local worker (the cluster's workers run the calls; they need
    ``--allow-pickle``). ``workers=N`` starts a local worker with N cores either way.
    Task options (``mem``, ``cpus``, ``timeout``... see ``OPTION_NAMES``) given here
    apply to every call.
    """

    def __init__(self, client: Client | None = None, *, url: str | None = None,
                 queue: str = "default", state_dir: str | os.PathLike[str] | None = None,
                 workers: int | None = None, **options: Any) -> None:
        from .client import Client

        self._own_client = client is None
        self.client = client if client is not None else Client(url, queue, state_dir)
        unknown = set(options) - set(OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown task options: {', '.join(sorted(unknown))}")
        self.options = options
        if workers is None:
            workers = (os.cpu_count() or 1) if (client is None and url is None) else 0
        self._local = self.client.local_worker(workers) if workers > 0 else None
        self._futures: set[cf.Future[Any]] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def _track(self, futures: list[TaskFuture]) -> None:
        with self._lock:
            self._futures.update(futures)
        for fut in futures:
            fut.add_done_callback(self._untrack)

    def _untrack(self, fut: cf.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(fut)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        futures = self.client._python().submit_calls(fn, [(args, kwargs)], self.options,
                                                     session=True)
        self._track(futures)
        return futures[0]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """Like the stdlib: all calls are submitted now (as one job), results come in
        order, ``timeout`` bounds the whole iteration, and ``chunksize > 1`` runs that
        many calls per task (fewer, larger tasks for small functions)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        end = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables, strict=False))
        api = self.client._python()
        if chunksize > 1:
            chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
            futures = api.submit_calls(run_chunk, [((fn, chunk), {}) for chunk in chunks],
                                       self.options)
        else:
            futures = api.submit_calls(fn, [(item, {}) for item in items], self.options)
        self._track(futures)

        def results() -> Iterator[Any]:
            pending = list(reversed(futures))
            try:
                while pending:
                    fut = pending[-1]
                    wait = None if end is None else end - time.monotonic()
                    try:
                        value = fut.result(wait)
                    except cf.TimeoutError:
                        fut.cancel()
                        raise
                    pending.pop()
                    if chunksize > 1:
                        yield from value
                    else:
                        yield value
            finally:
                if pending:
                    api.cancel_futures(pending)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            outstanding = list(self._futures)
        if cancel_futures:
            self.client._python().cancel_futures(
                [f for f in outstanding if isinstance(f, TaskFuture)])
        if wait:
            cf.wait(outstanding)
            self._close()
        else:
            def close_later() -> None:
                cf.wait(outstanding)
                self._close()

            threading.Thread(target=close_later, daemon=True).start()

    def _close(self) -> None:
        if self._local is not None:
            self._local.stop()
            self._local = None
        if self._own_client:
            self.client.close()
