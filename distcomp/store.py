"""The only module that talks to Redis: key layout, Lua transitions, read models.

Every state change is one Lua script from ``distcomp/lua`` (one file per
transition, each prefixed with ``_prelude.lua``), so a crash between two calls
can never leave a task half-moved. Reads are plain commands and are allowed to
be slightly stale; writes never read-modify-write across round trips.

Key layout (``P`` = ``dc:{<queue>}:``; the braces are a Redis Cluster hash tag,
so every key of one queue lives in one slot and queues spread over a cluster):

=============================  ==========================================================
``P seq:job|seq:task|seq:lease``  counters for job ids, submission order, lease tokens
``P jobs``                     zset of job ids
``P job:<jid>``                hash: name, source, submitted_at, n_tasks, n_<state> counters,
                               trimmed_<state>, archive, expired (history trimming)
``P task:<tid>``               hash: spec, state, resources, lease, result (tid = ``<jid>.<n>``)
``P ready:<shape>``            zset of queued task ids, score = -priority*1e12 + sequence
``P shapes``                   set of non-empty ready shapes (``m<MiB>:c<cpus>:g<gpus>``)
``P running``                  zset of running task ids by lease deadline (for reap)
``P failed``                   zset of failed task ids by finish time (for retry)
``P succeeded|cancelled``      zsets of those task ids by finish time (history trimming)
``P delayed``                  zset of queued retries by the time their delay ends
``P counts``                   hash: queue-wide per-state counters, trimmed_<state>,
                               stale_reports
``P dedup``                    hash: spec dedup key -> task id (files and commands; API
                               calls are unique and not recorded)
``P payload:<id>``             string: a python task's pickled call over 8 KiB (smaller
                               ones travel in the spec as ``inline:<base64>``)
``P workers``                  zset of worker names by last heartbeat
``P worker:<name>``            hash: instance, host, pid, capacity, heartbeat, info
``P worker:<name>:tasks``      set of task ids the worker holds leases on
``P events``                   capped stream of transitions
``P notify:<client>``          capped stream of the final outcomes of the tasks a client
                               submitted with ``notify`` (its futures' listener reads it)
``P wake`` / ``P control``     pub/sub channels: new work / cancel requests
``P lock:reap``                short lock so concurrent reapers do not repeat work
``P lock:history``             one history trimmer at a time (archive file appends)
``P server``                   run_id of the Redis process last seen, and when (restart grace)
``P config``                   hash: queue settings (default_retries, ...)
=============================  ==========================================================
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

import redis
from redis.commands.core import Script

from .history import TrimmedTask, append_archive, archive_record
from .spec import MIB, TaskSpec

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATES = ("succeeded", "failed", "cancelled")

_QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SCRIPT_NAMES = (
    "submit",
    "claim",
    "renew",
    "complete",
    "fail",
    "requeue",
    "reap",
    "register",
    "deregister",
    "cancel",
    "retry",
    "archive",
)


class StoreError(RuntimeError):
    """Redis refused a transition for a reason the caller must act on."""


class NameTakenError(StoreError):
    """Another live process holds this worker name."""


class NotOwnerError(StoreError):
    """This process no longer owns its worker name (another instance took it over)."""


class NoJobError(StoreError):
    """Tasks were to be added to a job that does not exist (any more)."""


def mem_bucket_mib(mem_bytes: int) -> int:
    """Floor of the memory bucket a requirement falls in, in MiB.

    Buckets grow by a quarter power of two, so any range of requirements gives
    few shapes (tens, not thousands) and the claim walks only those. The claim
    checks the head task's exact memory, so the bucket only bounds the walk.
    """
    mib = mem_bytes / MIB
    if mib < 64:
        return 0
    step = math.floor(math.log2(mib) * 4) / 4
    return int(2**step)


def shape_of(mem: int, cpus: int, gpus: int,
             resources: Iterable[tuple[str, int]] = ()) -> str:
    """``m<MiB floor>:c<cpus>:g<gpus>``, plus ``:r<name>=<n>;...`` for custom resources."""
    base = f"m{mem_bucket_mib(mem)}:c{cpus}:g{gpus}"
    extra = ";".join(f"{name}={n}" for name, n in sorted(resources))
    return f"{base}:r{extra}" if extra else base


def format_resources(resources: dict[str, int]) -> str:
    return ";".join(f"{name}={n}" for name, n in sorted(resources.items()))


@dataclass(frozen=True)
class SubmitResult:
    job_id: str | None
    new: int
    task_ids: list[str]

    @property
    def duplicates(self) -> int:
        return len(self.task_ids) - self.new


@dataclass(frozen=True)
class Claim:
    task_id: str
    token: str
    attempt: int
    spec: TaskSpec
    #: The current memory requirement: the declared one, or what the memory guard
    #: learned the task needs after preempting it.
    mem: int = 0

    @property
    def job_id(self) -> str:
        return self.task_id.split(".", 1)[0]


@dataclass(frozen=True)
class HeldLease:
    """A lease a worker name still holds when a new process takes the name."""

    claim: Claim
    claimed_at: float  # server clock, seconds since the epoch


@dataclass
class JobInfo:
    id: str
    name: str
    source: str
    submitted_at: int
    n_tasks: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINISHED_STATES)

    @property
    def done(self) -> bool:
        return self.counts.get("queued", 0) == 0 and self.counts.get("running", 0) == 0


def _connect(url: str, socket_timeout: float) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def _load_scripts(client: redis.Redis) -> dict[str, Script]:
    lua = resources.files("distcomp") / "lua"
    prelude = (lua / "_prelude.lua").read_text()
    return {
        name: client.register_script(prelude + "\n" + (lua / f"{name}.lua").read_text())
        for name in _SCRIPT_NAMES
    }


def _as_int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class Store:
    """One queue on one Redis server."""

    def __init__(self, url: str, queue: str = "default", *, socket_timeout: float = 30.0
                 ) -> None:
        """``socket_timeout`` bounds every call: a worker uses a short one so that a
        network black hole cannot stall its loop (and its heartbeat file)."""
        if not _QUEUE_NAME_RE.match(queue):
            raise ValueError(
                f"invalid queue name {queue!r}: use 1-64 letters, digits, '.', '_' or '-'"
            )
        self.url = url
        self.queue = queue
        self.prefix = f"dc:{{{queue}}}:"
        self.redis = _connect(url, socket_timeout)
        self._scripts = _load_scripts(self.redis)
        self._server_started: int | None = None
        #: The connection ``_send_all`` writes pipelines on (see there).
        self._direct: Any = None  # a redis.connection.Connection (untyped in redis-py)
        self._direct_lock = threading.Lock()

    # -- keys ------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def wake_channel(self) -> str:
        return self.key("wake")

    @property
    def control_channel(self) -> str:
        return self.key("control")

    def _run(self, name: str, args: Sequence[Any]) -> Any:
        try:
            return self._scripts[name](keys=[self.prefix], args=list(args))
        except redis.ResponseError as exc:
            raise _script_error(exc) from None

    def _send_all(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write and read every reply, an error reply in its
        place. On a connection of our own, without redis-py's Pipeline object: on a
        worker's hot path (a completion and a claim per task) the Pipeline's
        bookkeeping cost about as much CPU as the two scripts themselves. Nothing
        is retried: a connection error leaves the connection closed (reopened on
        the next call) and propagates, like any command's."""
        with self._direct_lock:
            if self._direct is None:
                self._direct = self.redis.connection_pool.make_connection()
            conn = self._direct
            try:
                # A connection the server closed (a restart, an idle timeout) reads as
                # end of file: reconnect before sending rather than fail after.
                if conn.can_read():
                    conn.disconnect()  # unexpected data: start clean
            except redis.ConnectionError:
                conn.disconnect()
            try:
                conn.send_packed_command(conn.pack_commands(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(conn.read_response())
                    except redis.ResponseError as exc:
                        replies.append(exc)
                return replies
            except BaseException:
                conn.disconnect()
                raise

    def _pipelined(self, calls: Sequence[tuple[str, Sequence[Any]]],
                   before: Sequence[tuple[Any, ...]] = ()) -> list[Any]:
        """Run ``before`` (plain commands), then several scripts, in one round trip;
        each script's reply or error, in order. By EVALSHA directly: redis-py's own
        script-in-pipeline support asks SCRIPT EXISTS first, a second round trip.
        A script the server does not know (after a restart) did not run, so it is
        simply run again on its own (which loads it)."""
        replies = self._send_all(
            [*before, *(("EVALSHA", self._scripts[name].sha, 1, self.prefix, *args)
                        for name, args in calls)])
        for reply in replies[:len(before)]:
            if isinstance(reply, Exception):  # e.g. out of memory: the scripts failed too
                raise reply
        replies = replies[len(before):]
        for i, reply in enumerate(replies):
            if isinstance(reply, redis.exceptions.NoScriptError):
                name, args = calls[i]
                try:
                    replies[i] = self._scripts[name](keys=[self.prefix], args=list(args))
                except redis.ResponseError as exc:
                    replies[i] = exc
        return replies

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # -- transitions -----------------------------------------------------
    def submit(
        self,
        specs: Sequence[TaskSpec],
        *,
        job_name: str = "",
        source: str = "",
        allow_duplicates: bool = False,
        dedup: bool = True,
        job_id: str | None = None,
        payloads: dict[str, bytes] | None = None,
        notify: str = "",
    ) -> SubmitResult:
        """All-or-nothing: one script call creates the job and every new task.

        ``dedup=False`` neither looks up nor records dedup keys (API calls, each
        unique by construction); ``job_id`` adds the tasks to that existing job
        (:class:`NoJobError` if it is gone) instead of making a new one.
        ``payloads`` (python tasks' pickles, by key) are written in the same round
        trip, just before the script, so no worker can claim a task before its
        payload is there; if the submit fails they are deleted again. ``notify``:
        a client id whose stream (``notify_key``) hears each task's final outcome.

        Built for bulk (a 100,000-line file is one call): shapes are computed once
        per distinct requirement and every argument goes out as a string, which
        spares redis-py a per-argument conversion.
        """
        mode = "2" if not dedup else "1" if allow_duplicates else "0"
        args: list[Any] = [job_name, source, mode, "", job_id or "", notify]
        shapes: dict[tuple[int, int, int, tuple[tuple[str, int], ...]], str] = {}
        append = args.extend
        for spec in specs:
            need = (spec.mem, spec.cpus, spec.gpus, spec.resources)
            shape = shapes.get(need)
            if shape is None:
                shape = shapes[need] = shape_of(*need)
            if dedup:
                wire, dedup_key = spec.wire_and_dedup_key()
            else:
                wire, dedup_key = spec.to_json(), ""
            append((dedup_key, str(spec.priority), str(spec.mem), str(spec.cpus),
                    str(spec.gpus), shape, wire,
                    "" if spec.retries is None else str(spec.retries)))
        # Never retried on a connection error: the script may have run.
        out = self._pipelined([("submit", args)], before=[
            ("SET", key, blob) for key, blob in (payloads or {}).items()])[0]
        if isinstance(out, Exception):
            if payloads:
                with contextlib.suppress(redis.RedisError):
                    self.delete_payloads(list(payloads))
            raise (_script_error(out) if isinstance(out, redis.ResponseError) else out)
        return SubmitResult(job_id=out[0] or None, new=int(out[1]), task_ids=list(out[2:]))

    def claim(
        self,
        worker: str,
        instance: str,
        *,
        free_mem: int,
        free_cpus: int,
        free_gpus: int,
        max_count: int,
        lease_ms: int,
        free_resources: dict[str, int] | None = None,
    ) -> Claims:
        if max_count <= 0:
            return Claims()
        out = self._run("claim", _claim_args(worker, instance, free_mem, free_cpus, free_gpus,
                                             max_count, lease_ms, free_resources))
        return _claims(out)

    def complete_then_claim(
        self,
        completes: Sequence[tuple[str, str, dict[str, Any]]],
        worker: str,
        instance: str,
        *,
        free_mem: int,
        free_cpus: int,
        free_gpus: int,
        max_count: int,
        lease_ms: int,
        free_resources: dict[str, int] | None = None,
        claim: bool = True,
        task_caps: tuple[int, int] | None = None,
    ) -> tuple[list[bool | Exception], Claims | Exception]:
        """Any ``complete`` transitions (none is fine) and then a ``claim``, in one round trip
        (a pipeline: each script stays atomic on its own). A worker whose task just
        ended both reports it and asks for the next one, so this halves the round
        trips per task. Returns whether each completion applied (False: stale), and
        the claims, or the claim's error (e.g. :class:`NotOwnerError`) — the
        completions count either way (a completion's script error comes back in
        its place: the claim still stands and its tasks must be started).
        ``claim=False``: the completions alone (the queue is known to be drained);
        the claims are then an empty, drained list. ``task_caps``: (memory, cpus) no
        single claimed task may exceed, whatever the free amounts say (prefetch)."""
        calls: list[tuple[str, Sequence[Any]]] = [
            ("complete", [task_id, token, *_flatten(result)])
            for task_id, token, result in completes]
        if claim:
            calls.append(("claim", _claim_args(worker, instance, free_mem, free_cpus, free_gpus,
                                               max_count, lease_ms, free_resources, task_caps)))
        replies = self._pipelined(calls)
        done: list[bool | Exception] = [
            reply if isinstance(reply, Exception) else bool(reply)
            for reply in replies[:len(completes)]]
        if not claim:
            nothing = Claims()
            nothing.drained = True
            return done, nothing
        last = replies[-1]
        if isinstance(last, redis.ResponseError):
            return done, _script_error(last)
        if isinstance(last, Exception):
            return done, last
        return done, _claims(last)

    def renew(
        self, worker: str, instance: str, leases: Iterable[tuple[str, str]], *, lease_ms: int,
        info: dict[str, Any],
    ) -> list[str]:
        """Heartbeat + renew every lease; returns the task ids this worker no longer owns."""
        args: list[Any] = [worker, instance, lease_ms, json.dumps(info)]
        for tid, token in leases:
            args += [tid, token]
        return list(self._run("renew", args))

    def complete(self, task_id: str, token: str, result: dict[str, Any]) -> bool:
        return bool(self._run("complete", [task_id, token, *_flatten(result)]))

    def fail(
        self, task_id: str, token: str, reason: str, result: dict[str, Any], *,
        retryable: bool = True, retry_delay: float = 0.0,
    ) -> str:
        """Returns "retry", "failed" or "stale". A retry waits ``retry_delay`` seconds,
        doubled for every earlier failure of the task."""
        code = int(self._run(
            "fail", [task_id, token, reason, "1" if retryable else "0",
                     int(retry_delay * 1000), *_flatten(result)]
        ))
        return {2: "retry", 1: "failed", 0: "stale"}[code]

    def requeue(
        self, task_id: str, token: str, reason: str, *, counter: str = "",
        new_mem: int | None = None, cpus: int = 1, gpus: int = 0,
        resources: Iterable[tuple[str, int]] = (),
        max_count: int | None = None, no_fit_reason: str = "",
    ) -> str:
        """Give a running task back. Returns "requeued", "failed" (the counter passed
        ``max_count``, or no live worker has ``new_mem`` and ``no_fit_reason`` was
        given) or "stale"."""
        new_shape = "" if new_mem is None else shape_of(new_mem, cpus, gpus, resources)
        code = int(self._run(
            "requeue",
            [task_id, token, reason, counter, "" if new_mem is None else new_mem, new_shape,
             "" if max_count is None else max_count, no_fit_reason],
        ))
        return {1: "requeued", 2: "failed", 0: "stale"}[code]

    def reap(self, *, lock_ms: int = 1000, max_lost: int = 5, batch: int = 1000) -> int:
        """Requeue tasks whose lease expired; -1 if another reaper is at it."""
        return int(self._run("reap", [lock_ms, max_lost, batch]))

    def register_worker(
        self, worker: str, instance: str, *, lease_ms: int, info: dict[str, Any],
        fields: dict[str, Any], takeover: str = "",
    ) -> list[HeldLease]:
        """Take the name; returns the leases a previous owner of the name still holds,
        for the new owner to re-adopt or give back."""
        out = self._run("register", [worker, instance, lease_ms, json.dumps(info), takeover,
                                     *_flatten(fields)])
        return [HeldLease(Claim(out[i], out[i + 1], int(out[i + 2]),
                                TaskSpec.from_json(out[i + 3]), int(out[i + 4])),
                          int(out[i + 5]) / 1000)
                for i in range(1, len(out), 6)]

    def deregister_worker(self, worker: str, instance: str) -> int:
        return int(self._run("deregister", [worker, instance]))

    def cancel(self, task_ids: Sequence[str], reason: str = "cancelled by user") -> int:
        return sum(
            int(self._run("cancel", [reason, *chunk])) for chunk in _chunks(task_ids, 1000)
        )

    def retry(self, task_ids: Sequence[str]) -> int:
        return sum(int(self._run("retry", list(chunk))) for chunk in _chunks(task_ids, 1000))

    # -- configuration ---------------------------------------------------
    def default_retries(self) -> int:
        return _as_int(self.redis.hget(self.key("config"), "default_retries"), 0)

    def set_config(self, **values: Any) -> None:
        self.redis.hset(self.key("config"), mapping={k: str(v) for k, v in values.items()})

    # -- reads -----------------------------------------------------------
    def counts(self) -> dict[str, int]:
        raw = cast(dict[str, str], self.redis.hgetall(self.key("counts")))
        return {k: int(v) for k, v in raw.items()}

    def job_ids(self) -> list[str]:
        return cast(list[str], self.redis.zrange(self.key("jobs"), 0, -1))

    def job(self, job_id: str) -> JobInfo | None:
        raw = cast(dict[str, str], self.redis.hgetall(self.key("job", job_id)))
        return _job_from_hash(raw) if raw else None

    def jobs(self, job_ids: Sequence[str] | None = None) -> list[JobInfo]:
        ids = self.job_ids() if job_ids is None else list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for jid in ids:
            pipe.hgetall(self.key("job", jid))
        return [_job_from_hash(raw) for raw in pipe.execute() if raw]

    def task(self, task_id: str) -> dict[str, str] | None:
        raw = cast(dict[str, str], self.redis.hgetall(self.key("task", task_id)))
        return raw or None

    def task_ids_of_job(self, job_id: str) -> list[str]:
        """Ids are dense (J.1 .. J.n), so a job's tasks are known without a scan."""
        job = self.job(job_id)
        return [] if job is None else [f"{job_id}.{i}" for i in range(1, job.n_tasks + 1)]

    def tasks(self, task_ids: Sequence[str], fields: Sequence[str] | None = None,
              ) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for chunk in _chunks(task_ids, 2000):
            pipe = self.redis.pipeline(transaction=False)
            for tid in chunk:
                if fields is None:
                    pipe.hgetall(self.key("task", tid))
                else:
                    pipe.hmget(self.key("task", tid), list(fields))
            for tid, raw in zip(chunk, pipe.execute(), strict=False):
                if fields is None:
                    if raw:
                        out.append(raw)
                elif any(v is not None for v in raw):
                    row = dict(zip(fields, raw, strict=False))
                    row.setdefault("id", tid)
                    out.append({k: v for k, v in row.items() if v is not None})
        return out

    def iter_task_ids(self, job_ids: Sequence[str] | None = None) -> Iterator[str]:
        for job in self.jobs(job_ids):
            for i in range(1, job.n_tasks + 1):
                yield f"{job.id}.{i}"

    def failed_task_ids(self) -> list[str]:
        return cast(list[str], self.redis.zrange(self.key("failed"), 0, -1))

    def running_task_ids(self) -> list[str]:
        return cast(list[str], self.redis.zrange(self.key("running"), 0, -1))

    def queued_count(self) -> int:
        return _as_int(self.redis.hget(self.key("counts"), "queued"))

    def workers(self) -> list[dict[str, Any]]:
        names = cast(list[str], self.redis.zrange(self.key("workers"), 0, -1))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.key("worker", name))
            pipe.scard(self.key("worker", name, "tasks"))
        pipe.time()
        replies = pipe.execute()
        sec, usec = replies[-1]
        now_ms = int(sec) * 1000 + int(usec) // 1000
        out: list[dict[str, Any]] = []
        for i in range(len(names)):
            raw = replies[2 * i]
            if not raw:
                continue
            row: dict[str, Any] = dict(raw)
            row["info"] = json.loads(raw.get("info") or "{}")
            row["n_tasks"] = int(replies[2 * i + 1])
            row["heartbeat_age_s"] = (now_ms - _as_int(raw.get("heartbeat"))) / 1000
            out.append(row)
        return out

    def worker_record(self, name: str) -> dict[str, str]:
        return cast(dict[str, str], self.redis.hgetall(self.key("worker", name)))

    def forget_worker(self, name: str) -> None:
        self.redis.zrem(self.key("workers"), name)
        self.redis.delete(self.key("worker", name))

    def events(self, count: int = 100) -> list[dict[str, str]]:
        entries = cast(list[tuple[str, dict[str, str]]],
                       self.redis.xrevrange(self.key("events"), count=count))
        return [{"id": eid, **fields} for eid, fields in reversed(entries)]

    def server_time_ms(self) -> int:
        sec, usec = self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    def close(self) -> None:
        with self._direct_lock:
            if self._direct is not None:
                self._direct.disconnect()
                self._direct = None
        self.redis.close()

    # -- paged read models (watch, dashboard, metrics) ----------------------
    # Each costs a bounded number of commands whatever the number of tasks:
    # they read counters, the capped event stream, ranges of the dense task
    # ids ``J.1 .. J.n`` and ranges of the ``failed``/``running`` sorted sets.
    def task_page(self, job_id: str, first: int, count: int,
                  fields: Sequence[str]) -> list[dict[str, str]]:
        """Tasks ``job_id.first`` .. ``job_id.(first+count-1)``: one pipelined HMGET each."""
        ids = [f"{job_id}.{i}" for i in range(max(first, 1), max(first, 1) + count)]
        return self.tasks(ids, fields=fields)

    def state_set_page(self, state: str, start: int, count: int) -> tuple[list[str], int]:
        """Ids of the ``failed`` (by finish time) or ``running`` (by lease deadline) set,
        ranks ``start`` .. ``start+count-1``, and the size of the set."""
        if state not in ("failed", "running"):
            raise ValueError(f"no index for state {state!r}")
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(self.key(state), start, start + count - 1)
        pipe.zcard(self.key(state))
        ids, total = pipe.execute()
        return list(ids), int(total)

    def worker_task_ids(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Task ids each worker holds leases on (one pipelined SMEMBERS per worker)."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.smembers(self.key("worker", name, "tasks"))
        return {name: sorted(ids) for name, ids in zip(names, pipe.execute(), strict=True)}

    # -- python tasks: payloads and results (binary, so on their own connection) ----
    def _binary(self) -> redis.Redis:
        """A connection that returns bytes: pickles are not text."""
        raw = getattr(self, "_raw", None)
        if raw is None:
            raw = redis.Redis.from_url(self.url, decode_responses=False,
                                       socket_timeout=self.redis.connection_pool
                                       .connection_kwargs.get("socket_timeout"),
                                       socket_connect_timeout=5)
            self._raw = raw
        return raw

    def payload_key(self, ident: str) -> str:
        """``P payload:<id>``: a cloudpickled ``(fn, args, kwargs)`` of a python task."""
        return self.key("payload", ident)

    def put_payloads(self, blobs: dict[str, bytes]) -> None:
        """Store payloads (by full key) before the tasks naming them are submitted."""
        pipe = self._binary().pipeline(transaction=False)
        for key, blob in blobs.items():
            pipe.set(key, blob)
        pipe.execute()

    def get_payloads(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return cast(list[bytes | None], self._binary().mget(list(keys)))

    def delete_payloads(self, keys: Sequence[str]) -> None:
        for chunk in _chunks(keys, 1000):
            self._binary().delete(*chunk)

    def events_key(self) -> str:
        return self.key("events")

    def last_event_id(self) -> str:
        """Id of the newest event (``0-0`` if none): where a new listener starts."""
        entries = self.redis.xrevrange(self.key("events"), count=1)
        return str(entries[0][0]) if entries else "0-0"

    def notify_key(self, client: str) -> str:
        return self.key("notify", client)

    def delete_notify(self, client: str) -> None:
        self.redis.delete(self.notify_key(client))

    def read_streams(self, after: dict[str, str], *, block_ms: int, count: int = 1000
                     ) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
        """Entries after each stream's id (``{key: id}``), waiting up to ``block_ms``
        for the first; ``[(key, [(id, fields)...])...]`` for the streams that had any."""
        reply = self._send_all([("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS",
                                 *after.keys(), *after.values())])[0]
        if isinstance(reply, Exception):
            raise reply
        streams = reply.items() if isinstance(reply, dict) else reply or []  # RESP3 or 2
        return [(key, [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                       for entry_id, flat in entries])
                for key, entries in streams]

    def task_fields(self, task_ids: Sequence[str], fields: Sequence[str]
                    ) -> list[list[str | None]]:
        """The given fields of each task, in order, in one round trip per 2000 tasks."""
        out: list[list[str | None]] = []
        for chunk in _chunks(task_ids, 2000):
            pipe = self.redis.pipeline(transaction=False)
            for tid in chunk:
                pipe.hmget(self.key("task", tid), list(fields))
            out += pipe.execute()
        return out

    # -- history: finished tasks leave Redis (lua/archive.lua, distcomp/history.py) --
    # Finished tasks sit in one sorted set per state by finish time, so the oldest
    # are a range read away: trimming costs O(batch · log N), never a scan. The
    # per-state counters never move; trimmed_<state> counts what left.
    def trim_history(self, older_than_s: float, limit: int = 1000, *,
                     states: Sequence[str] = ("succeeded",), archive: Path | None = None,
                     lock_ms: int = 60_000) -> int:
        """Remove up to ``limit`` tasks in ``states`` that finished ``older_than_s``
        ago or earlier; returns how many, or -1 if another trimmer holds the lock.

        With ``archive``, their records are appended to that file and fsynced
        before the delete script runs. A task retried meanwhile is left alone (the
        script checks its state and finish time), so none is lost; a crash between
        the two steps leaves records that the next pass archives again.
        """
        bad = set(states) - set(FINISHED_STATES)
        if bad or not states or limit <= 0 or older_than_s < 0:
            raise ValueError(f"trim_history: states must be among {FINISHED_STATES}, "
                             f"limit > 0 and older_than_s >= 0 (got {states}, {limit}, "
                             f"{older_than_s})")
        token = secrets.token_hex(8)
        if not self.redis.set(self.key("lock:history"), token, nx=True, px=lock_ms):
            return -1
        try:
            pairs, label = self._history_batch(states, older_than_s, limit, archive)
        except BaseException:
            # No pairs: only releases the lock (which expires anyway if Redis is gone).
            with contextlib.suppress(redis.RedisError):
                self._run("archive", [token, 0, "", ""])
            raise
        return int(self._run("archive", [token, int(older_than_s * 1000), ",".join(states),
                                          label, *pairs]))

    def _history_batch(self, states: Sequence[str], older_than_s: float, limit: int,
                       archive: Path | None) -> tuple[list[str], str]:
        """The (task id, finished_at) pairs to remove and the archive label; in archive
        mode the records are on disk when this returns."""
        found = self.finished_before(states, older_than_s, limit)
        if archive is None:
            return [x for tid, at in found for x in (tid, str(at))], ""
        raws = [raw for raw in self.tasks([tid for tid, _ in found])
                if raw.get("state") in states and raw.get("finished_at")]
        append_archive(archive, [archive_record(raw, self.queue) for raw in raws])
        label = f"{socket.gethostname()}:{archive.absolute()}"
        return [x for raw in raws for x in (raw["id"], raw["finished_at"])], label

    def finished_before(self, states: Sequence[str], older_than_s: float, limit: int
                        ) -> list[tuple[str, int]]:
        """(task id, finished_at ms) of up to ``limit`` tasks in ``states`` that finished
        ``older_than_s`` ago or earlier (server clock), oldest first."""
        cutoff = self.server_time_ms() - int(older_than_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for state in states:
            pipe.zrangebyscore(self.key(state), "-inf", cutoff, start=0, num=limit,
                               withscores=True)
        found = [(str(tid), int(at)) for rows in pipe.execute() for tid, at in rows]
        return sorted(found, key=lambda pair: pair[1])[:limit]

    def history_due(self, states: Sequence[str], older_than_s: float) -> dict[str, int]:
        """How many tasks of each state a trim with this age would remove (ZCOUNT)."""
        cutoff = self.server_time_ms() - int(older_than_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for state in states:
            pipe.zcount(self.key(state), "-inf", cutoff)
        return {state: int(n) for state, n in zip(states, pipe.execute(), strict=True)}

    def history_counts(self) -> dict[str, dict[str, int]]:
        """Per finished state: tasks still in Redis (``kept``: the state's index) and
        removed by trimming (``trimmed``). ``kept + trimmed`` is the state's counter."""
        pipe = self.redis.pipeline(transaction=False)
        for state in FINISHED_STATES:
            pipe.zcard(self.key(state))
        pipe.hmget(self.key("counts"), [f"trimmed_{s}" for s in FINISHED_STATES])
        *cards, trimmed = pipe.execute()
        return {s: {"kept": int(n), "trimmed": _as_int(t)}
                for s, n, t in zip(FINISHED_STATES, cards, trimmed, strict=True)}

    def job_trimmed(self, job_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """Per job: how many of its tasks trimming removed, and its latest archive label
        ("" if none was archived)."""
        return {jid: (n, label) for jid, (n, label, _) in self._job_trimmed(job_ids).items()}

    def _job_trimmed(self, job_ids: Sequence[str]) -> dict[str, tuple[int, str, int]]:
        """Per job: (tasks trimmed, latest archive label, tasks expired without archive)."""
        fields = [*(f"trimmed_{s}" for s in FINISHED_STATES), "archive", "expired"]
        pipe = self.redis.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hmget(self.key("job", jid), fields)
        return {jid: (sum(_as_int(v) for v in row[:-2]), row[-2] or "", _as_int(row[-1]))
                for jid, row in zip(job_ids, pipe.execute(), strict=True)}

    def trimmed_task(self, task_id: str) -> TrimmedTask | None:
        """The task if history trimming removed it, else None (it exists, or never did).

        Two reads: a missing record with an id up to its job's high-water mark
        (``n_tasks``: ids are dense) in a job that has trimmed tasks was trimmed.
        """
        jid, _, n = task_id.partition(".")
        if not n.isdigit():
            return None
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.key("task", task_id))
        pipe.hget(self.key("job", jid), "n_tasks")
        exists, n_tasks = pipe.execute()
        if exists or not 1 <= int(n) <= _as_int(n_tasks):
            return None
        trimmed, label, expired = self._job_trimmed([jid])[jid]
        if not trimmed:
            return None
        return TrimmedTask(task_id, label, maybe_expired=bool(label) and expired > 0)


def _job_from_hash(raw: dict[str, str]) -> JobInfo:
    return JobInfo(
        id=raw["id"],
        name=raw.get("name", ""),
        source=raw.get("source", ""),
        submitted_at=_as_int(raw.get("submitted_at")),
        n_tasks=_as_int(raw.get("n_tasks")),
        counts={s: _as_int(raw.get(f"n_{s}")) for s in STATES},
    )


def _script_error(exc: redis.ResponseError) -> Exception:
    """Our scripts' refusals, as our own exception types."""
    text = str(exc)
    for prefix, kind in (("NAMETAKEN", NameTakenError), ("NOTOWNER", NotOwnerError),
                         ("NOJOB", NoJobError)):
        if text.startswith(prefix):
            return kind(text.split(" ", 1)[1])
    return exc


def _claim_args(worker: str, instance: str, free_mem: int, free_cpus: int, free_gpus: int,
                max_count: int, lease_ms: int, free_resources: dict[str, int] | None,
                task_caps: tuple[int, int] | None = None) -> list[Any]:
    args: list[Any] = [worker, instance, free_mem, free_cpus, free_gpus, max_count, lease_ms,
                       secrets.token_hex(4), format_resources(free_resources or {})]
    if task_caps is not None:
        args += [task_caps[0], task_caps[1]]
    return args


class Claims(list[Claim]):
    """A claim's tasks, and ``drained``: nothing at all was left ready in the queue
    after it (see ``claim.lua``), so claiming again before a wake is pointless."""

    drained: bool = False


def _claims(out: list[Any]) -> Claims:
    """``claim``'s reply: the drained flag, then five fields per claimed task."""
    claims = Claims(Claim(out[i], out[i + 1], int(out[i + 2]), TaskSpec.from_stored(out[i + 3]),
                          int(out[i + 4]))
                    for i in range(1, len(out), 5))
    claims.drained = bool(out[0])
    return claims


def _flatten(mapping: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for key, value in mapping.items():
        if value is None:
            continue
        out += [key, value]
    return out


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
