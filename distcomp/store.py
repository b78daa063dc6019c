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
``P job:<jid>``                hash: name, source, submitted_at, n_tasks, n_<state> counters
``P task:<tid>``               hash: spec, state, resources, lease, result (tid = ``<jid>.<n>``)
``P ready:<shape>``            zset of queued task ids, score = -priority*1e12 + sequence
``P shapes``                   set of non-empty ready shapes (``m<MiB>:c<cpus>:g<gpus>``)
``P running``                  zset of running task ids by lease deadline (for reap)
``P failed``                   zset of failed task ids by finish time (for retry)
``P delayed``                  zset of queued retries by the time their delay ends
``P counts``                   hash: queue-wide per-state counters, stale_reports
``P dedup``                    hash: spec dedup key -> task id
``P workers``                  zset of worker names by last heartbeat
``P worker:<name>``            hash: instance, host, pid, capacity, heartbeat, info
``P worker:<name>:tasks``      set of task ids the worker holds leases on
``P events``                   capped stream of transitions
``P wake`` / ``P control``     pub/sub channels: new work / cancel requests
``P lock:reap``                short lock so concurrent reapers do not repeat work
``P server``                   run_id of the Redis process last seen, and when (restart grace)
``P config``                   hash: queue settings (default_retries, ...)
=============================  ==========================================================
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

import redis
from redis.commands.core import Script

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
)


class StoreError(RuntimeError):
    """Redis refused a transition for a reason the caller must act on."""


class NameTakenError(StoreError):
    """Another live process holds this worker name."""


class NotOwnerError(StoreError):
    """This process no longer owns its worker name (another instance took it over)."""


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
            text = str(exc)
            if text.startswith("NAMETAKEN"):
                raise NameTakenError(text.split(" ", 1)[1]) from None
            if text.startswith("NOTOWNER"):
                raise NotOwnerError(text.split(" ", 1)[1]) from None
            raise

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
    ) -> SubmitResult:
        """All-or-nothing: one script call creates the job and every new task."""
        args: list[Any] = [job_name, source, "1" if allow_duplicates else "0",
                           self.default_retries()]
        for spec in specs:
            args += [
                spec.dedup_key(),
                spec.priority,
                spec.mem,
                spec.cpus,
                spec.gpus,
                shape_of(spec.mem, spec.cpus, spec.gpus, spec.resources),
                spec.to_json(),
                "" if spec.retries is None else spec.retries,
            ]
        out = self._run("submit", args)
        job_id = out[0] or None
        return SubmitResult(job_id=job_id, new=int(out[1]), task_ids=list(out[2:]))

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
    ) -> list[Claim]:
        if max_count <= 0:
            return []
        out = self._run(
            "claim", [worker, instance, free_mem, free_cpus, free_gpus, max_count, lease_ms,
                      secrets.token_hex(4), format_resources(free_resources or {})]
        )
        return [
            Claim(out[i], out[i + 1], int(out[i + 2]), TaskSpec.from_json(out[i + 3]),
                  int(out[i + 4]))
            for i in range(0, len(out), 5)
        ]

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

    def read_events(self, after: str, *, block_ms: int, count: int = 1000
                    ) -> list[tuple[str, dict[str, str]]]:
        """Events after ``after``, waiting up to ``block_ms`` for the first one."""
        reply = cast(list[Any], self.redis.xread({self.key("events"): after}, count=count,
                                                  block=block_ms))
        if not reply:
            return []
        return cast(list[tuple[str, dict[str, str]]], reply[0][1])

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


def _job_from_hash(raw: dict[str, str]) -> JobInfo:
    return JobInfo(
        id=raw["id"],
        name=raw.get("name", ""),
        source=raw.get("source", ""),
        submitted_at=_as_int(raw.get("submitted_at")),
        n_tasks=_as_int(raw.get("n_tasks")),
        counts={s: _as_int(raw.get(f"n_{s}")) for s in STATES},
    )


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
