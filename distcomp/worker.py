"""The node agent: claims what fits, runs it, reports it, keeps its leases alive.

The loop, top to bottom, each turn:

1. collect tasks that ended and queue their reports;
2. enforce timeouts and finish kills that are under way;
3. send queued reports (kept while Redis is unreachable, sent when it is back);
4. heartbeat: renew every lease in one call; stop local copies of lost leases;
5. reap expired leases of dead workers (idempotent, under a short lock);
6. claim as many tasks as fit the free resources and start them;
7. sleep until a task ends, new work is published, or a timer is due.

There is no fixed sleep per task: a finished task wakes the loop through its
pidfd, and new work through a pub/sub message, so a slot is refilled within
milliseconds.

Tasks outlive the worker process (see ``runner`` and ``guardian``): a worker
restarted under the same name re-adopts the tasks that kept running, reports
those that ended meanwhile, and gives back only those truly gone. A guardian
process stops the orphans of a worker that does not come back within its lease.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import redis

from . import history, memory, runner
from .cgroups import TaskCgroups
from .config import HistorySettings
from .heartbeat import HeartbeatFile
from .pool import Pool, PoolConfig, PooledTask, eligible
from .pytask import INLINE_PREFIX
from .resources import detect_cpus, detect_gpus, detect_memory
from .spec import GIB, MIB, TaskSpec, format_size
from .store import Claim, HeldLease, NameTakenError, NotOwnerError, Store

log = logging.getLogger("distcomp.worker")

_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
#: Seconds a claim's "queue drained" is believed without a wake: as long as an idle
#: worker sleeps anyway, in case a wake message was lost.
_DRAINED_TRUST = 2.0
#: Prefetch while the running average of task wall times is below this: for longer
#: tasks a round trip is noise, and a held task would wait a whole task's time.
_PREFETCH_BELOW = 0.1
#: A held task not started after this long goes back to the queue (its slot stayed busy).
_PREFETCHED_MAX_AGE = 2.0
#: Tasks held per running one: each round trip then completes and claims a few.
_PREFETCH_DEPTH = 2


@dataclass
class WorkerConfig:
    name: str | None = None
    cpus: int | None = None
    memory: int | None = None
    gpus: list[int] | None = None
    max_tasks: int | None = None
    max_running: int = 256
    log_dir: Path = Path(".distcomp/logs")
    #: Node-local: the heartbeat file the guardian watches is under ``state_dir/workers``.
    state_dir: Path = Path(".distcomp")
    heartbeat: float = 5.0
    lease: float = 30.0
    kill_grace: float = 5.0
    #: How often task memory is sampled and the memory guard looks at headroom.
    sample_interval: float = 0.5
    #: Memory kept back for the system and the worker itself (default: none when
    #: --memory is given, else 5 % of the node, 256 MiB to 2 GiB).
    reserve: int | None = None
    #: Below ``low_water`` bytes of headroom the guard preempts; tasks are admitted
    #: only while ``high_water`` stays free (defaults: memory.Watermarks.default).
    low_water: int | None = None
    high_water: int | None = None
    victim_policy: str = "youngest"
    #: Seconds ahead the growth-aware admission projects running tasks' memory.
    horizon: float = 30.0
    #: Preemptions after which a task fails instead of going back to the queue.
    max_preempts: int = 5
    #: While the first task of a job not yet profiled is younger than this (and its
    #: growth not yet measured), nothing else starts (0: trust declared memory).
    probation: float = 1.0
    #: Growth-aware admission (projection + job profiles + probation); False admits
    #: on the instantaneous headroom alone.
    growth_aware: bool = True
    #: Give each task its own cores (sched_setaffinity), as many as it asked for.
    pin: bool = False
    #: Custom named resources this worker offers (``--resource license=2``).
    resources: dict[str, int] = field(default_factory=dict)
    tail_bytes: int = runner.DEFAULT_TAIL_BYTES
    drain: bool = False
    #: Stop (and abandon) running tasks once cut off from Redis for longer than the
    #: lease: they are being rerun elsewhere by then.
    self_fence: bool = False
    #: Start the guardian that stops this worker's orphans if it dies for good.
    guardian: bool = True
    #: Stop once this returns True while the worker has nothing running (``run``).
    exit_when: Callable[[], bool] | None = None
    #: Run python tasks that carry a pickled callable. Off by default: anyone who can
    #: write to the queue could run any code here (reference-style tasks always run).
    allow_pickle: bool = False
    #: Prepended to PYTHONPATH for python tasks, so ``pkg.module:function`` imports.
    pythonpath: list[str] = field(default_factory=list)
    #: The interpreter python tasks run in (default: the worker's own).
    python: str = sys.executable
    #: Python results up to this size go into the task record; larger ones stay in a
    #: file (``result_dir``, else beside the logs) whose path is recorded.
    result_max_bytes: int = 1024 * 1024
    result_dir: Path | None = None
    #: Run python tasks in warm interpreters (``distcomp.pool``) where they can.
    python_pool: bool = True
    #: While recent tasks are short (see ``_PREFETCH_BELOW``), hold up to two claimed
    #: tasks per running one, started the moment a slot frees (no round trip between).
    prefetch: bool = True
    #: A warm interpreter is replaced after this many calls, or once its resident
    #: memory exceeds ``pool_max_rss`` after a call.
    pool_max_tasks: int = 1000
    pool_max_rss: int = 512 * MIB
    #: How finished tasks leave Redis (``distcomp.history``); None: they stay. Any
    #: worker may trim, once a minute; a lock makes it one at a time.
    history: HistorySettings | None = None
    history_interval: float = 60.0


@dataclass
class Running:
    claim: Claim
    proc: runner.TaskProcess
    gpus: list[int]
    #: Give the task back instead of reporting it (worker stopping).
    requeue_reason: str = ""
    #: Our lease is gone (cancelled or taken over): stop it and report nothing.
    abandoned: bool = False
    #: The task's own memory cgroup (its cgroup.procs), when its mem_limit is
    #: enforced by the kernel.
    cgroup: Path | None = None
    #: Cores the task is pinned to (--pin), else empty.
    cores: list[int] = field(default_factory=list)
    #: Measured memory (sampled), for the guard and the results.
    usage: memory.Usage = field(default_factory=memory.Usage)
    #: The memory guard is stopping it; ``alone``: it does not fit this node at all.
    preempted: bool = False
    alone: bool = False

    def candidate(self) -> memory.Candidate:
        return memory.Candidate(self.claim.task_id, self.claim.job_id, self.proc.started,
                                self.mem, self.usage, learned=self.mem > self.claim.spec.mem)

    @property
    def mem(self) -> int:
        """The requirement the budget counts: declared, or learned by the guard."""
        return max(self.claim.mem, self.claim.spec.mem)


@dataclass
class Stats:
    succeeded: int = 0
    failed: int = 0
    requeued: int = 0
    stale: int = 0
    started: int = 0
    preempted: int = 0


@dataclass
class _Report:
    kind: str  # complete | fail | requeue | preempt
    task_id: str
    token: str
    result: dict[str, Any]
    reason: str = ""
    status_path: Path | None = None
    spec: TaskSpec | None = None
    # preemptions: observed peak, whether it ran alone, and its requirement then
    peak: int = 0
    alone: bool = False
    mem: int = 0
    #: False: a failure no retry can fix (e.g. a pickled task on a worker refusing them).
    retryable: bool = True
    #: Files of the attempt to delete once the report is in (python call/result files).
    cleanup: list[Path] = field(default_factory=list)


@dataclass
class _Timers:
    heartbeat: float = 0.0
    reap: float = 0.0
    sample: float = 0.0
    offline_until: float = 0.0


class Worker:
    def __init__(self, store: Store, config: WorkerConfig) -> None:
        # Our own connection, with calls bounded well below the lease.
        self.store = Store(store.url, store.queue,
                           socket_timeout=max(1.0, min(5.0, config.heartbeat)))
        self.config = config
        self.host = socket.gethostname()
        self.instance = uuid.uuid4().hex
        self.name = config.name or self.host
        self.cpus = config.cpus if config.cpus is not None else detect_cpus()
        self.memory = detect_memory(config.memory) - self._reserve(config)
        defaults = memory.Watermarks.default(self.memory)
        self.guard = memory.Guard(
            self.memory,
            memory.Watermarks(low=config.low_water if config.low_water is not None
                              else defaults.low,
                              high=config.high_water if config.high_water is not None
                              else defaults.high),
            config.victim_policy, config.horizon, config.probation, config.growth_aware)
        self.oom_kills_seen = memory.oom_kills()
        self.task_cgroups: TaskCgroups | None = None
        self.gpus = list(config.gpus) if config.gpus is not None else detect_gpus()
        self.cores = sorted(os.sched_getaffinity(0))[: self.cpus]
        self.running: dict[str, Running] = {}
        self.outbox: deque[_Report] = deque()
        self.stats = Stats()
        self.timers = _Timers()
        self.stopping = False
        self.hard_stop = False
        self.online = True
        self.last_renewed = time.monotonic()
        self._backoff = 0.1
        self.log_dir = config.log_dir.absolute()
        self.tag = ""
        self.heartbeat = HeartbeatFile(config.state_dir / "workers" / "unregistered")
        self._guardian: subprocess.Popen[bytes] | None = None
        self._cancels: deque[str] = deque()
        #: Wake messages seen (pub/sub thread), and how many there had been when a claim
        #: found the queue drained, trusted until ``_drained_until`` (see claim.lua).
        self._wakes = 0
        self._drained_wakes = -1
        self._drained_until = 0.0
        #: Claimed tasks not started yet (prefetch): claim, payload, when claimed. Their
        #: leases are renewed with the running ones'; they go back on stop.
        self.prefetched: deque[tuple[Claim, bytes | None, float]] = deque()
        #: Running average of task wall times (None: nothing finished yet).
        self._recent_wall: float | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()
        self._next_trim = 0.0
        self.pool = Pool(PoolConfig(python=config.python, pythonpath=list(config.pythonpath),
                                    max_tasks=config.pool_max_tasks,
                                    max_rss=config.pool_max_rss,
                                    inline_result_max=config.result_max_bytes))

    # -- lifecycle -------------------------------------------------------
    def request_stop(self, *, drain: bool | None = None) -> None:
        """First call: stop claiming (and requeue running tasks unless draining).
        Second call: stop at once, requeuing everything."""
        if self.stopping:
            self.hard_stop = True
        self.stopping = True
        if drain is not None:
            self.config.drain = drain
        self._poke()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.warning("received %s: %s", signal.Signals(signum).name,
                        "stopping now" if self.stopping else "stopping")
            self.request_stop()

        def drain(signum: int, frame: FrameType | None) -> None:
            log.warning("received SIGUSR1: finishing running tasks, then stopping")
            self.request_stop(drain=True)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGUSR1, drain)

    def register(self) -> list[HeldLease]:
        """Take our name; a defaulted name moves to ``host-2``, ``host-3``... if held by a
        live worker. A name whose holder was a process on this host that has died is
        taken over at once. Returns the leases a previous holder left."""
        fields = {"host": self.host, "pid": os.getpid(),
                  "pid_start": psutil.Process().create_time(), "cpus": self.cpus,
                  "mem": self.memory, "gpus": ",".join(map(str, self.gpus)),
                  "resources": ";".join(f"{k}={v}" for k, v in sorted(
                      self.config.resources.items()))}
        base = self.name
        for index in range(1, 1000):
            try:
                return self.store.register_worker(
                    self.name, self.instance, lease_ms=self._lease_ms, info=self._info(),
                    fields=fields, takeover=self._dead_local_holder(self.name))
            except NameTakenError:
                if self.config.name is not None:
                    raise
                self.name = f"{base}-{index + 1}"
        raise NameTakenError(f"no free worker name based on {base}")  # pragma: no cover

    @staticmethod
    def _reserve(config: WorkerConfig) -> int:
        if config.reserve is not None:
            return config.reserve
        if config.memory:
            return 0  # the user chose the budget
        total = detect_memory(None)
        return min(max(total // 20, 256 * MIB), 2 * GIB)

    def _identity(self) -> str:
        """Worker names are unique per queue per Redis server; so is this tag, which
        marks our task processes and names our heartbeat directory."""
        server = hashlib.sha1(self.store.url.encode()).hexdigest()[:10]
        return f"{self.store.queue}@{server}:{self.name}"

    def _dead_local_holder(self, name: str) -> str:
        """The instance id of the name's holder if it was a process on this host that is
        gone (a crashed worker being restarted); "" otherwise."""
        record = self.store.worker_record(name)
        if not record or record.get("host") != self.host:
            return ""
        try:
            pid, start = int(record["pid"]), float(record["pid_start"])
        except (KeyError, ValueError):
            return ""
        return "" if runner.is_same_process(pid, start) else record.get("instance", "")

    def run(self) -> Stats:
        held = self.register()
        self.tag = self._identity()
        self.pool.config.tag = self.tag
        self.task_cgroups = TaskCgroups.detect(hashlib.sha1(self.tag.encode()).hexdigest()[:12])
        self.heartbeat = HeartbeatFile(self.config.state_dir / "workers" /
                                       self.tag.replace(":", "/"))
        self.heartbeat.touch()
        self._readopt(held)
        self._start_guardian()
        self._start_listener()
        try:
            self._loop()
        finally:
            self._shutdown()
        return self.stats

    def _readopt(self, held: list[HeldLease]) -> None:
        """Match the leases Redis says this name holds with the task processes that
        carry our tag: adopt the live ones and those that left a status, give back
        the rest, and stop any of ours that Redis no longer gives us."""
        found = runner.find_tasks(self.tag)
        for lease in held:
            claim = lease.claim
            _, _, status = runner.log_paths(self.log_dir, claim.task_id, claim.attempt)
            live = found.pop(status, None)
            proc = runner.adopt(claim.task_id, claim.attempt, self.log_dir, live,
                                lease.claimed_at, claim.spec.timeout)
            if proc is None:
                self.outbox.append(_Report("requeue", claim.task_id, claim.token, {},
                                           reason=f"worker {self.name} restarted; "
                                                  "its task process was gone"))
                continue
            item = Running(claim, proc, _visible_gpus(proc.pid))
            self.running[claim.task_id] = item
            self._selector_watch(item)
            log.info("re-adopted task %s (pid %d)", claim.task_id, proc.pid)
        for orphan in found.values():  # ours, but its lease is gone: it must not run on
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(orphan.pid, signal.SIGKILL)

    def _start_guardian(self) -> None:
        if not self.config.guardian:
            return
        try:
            pid = int(self.heartbeat.guardian_pidfile.read_text())
            if any("distcomp.guardian" in part for part in psutil.Process(pid).cmdline()):
                return  # the previous worker's guardian watches our heartbeat now
        except (OSError, ValueError, psutil.Error):
            pass
        with contextlib.suppress(FileNotFoundError):
            self.heartbeat.guardian_pidfile.unlink()
        self._guardian = subprocess.Popen(
            [sys.executable, "-m", "distcomp.guardian", str(self.heartbeat.directory),
             "--tag", self.tag, "--lease", str(self.config.lease),
             "--grace", str(self.config.kill_grace)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        # No task may start before someone is watching for our death.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._guardian.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                if int(self.heartbeat.guardian_pidfile.read_text()) == self._guardian.pid:
                    return
            time.sleep(0.01)
        log.warning("the guardian did not start; orphans of a crash would not be stopped")

    # -- the loop --------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._collect_finished()
            self._enforce_limits()
            now = time.monotonic()
            if now >= self.timers.heartbeat:
                self._heartbeat()
            self._self_fence(now)
            if now >= self.timers.reap:
                self._reap()
            if self.stopping:
                self._flush_outbox()
                self._stop_running_tasks()
                if not self.running and (not self.outbox or not self.online):
                    return
            elif self._reached_max_tasks():
                self._flush_outbox()
                self.stopping = True
                continue
            else:
                # Completions ride along with the claim (one round trip for both);
                # whatever could not (failures, requeues) goes right after, so no
                # report waits behind a run of full claims.
                full = self._claim_and_start()
                self._flush_outbox()
                if full:
                    continue  # the claim was full: there may be more for us
                if not self.running and not self.prefetched and self._should_exit():
                    return
            self._wait()

    def _collect_finished(self) -> None:
        for tid, item in list(self.running.items()):
            outcome = item.proc.poll()
            if outcome is None:
                continue
            del self.running[tid]
            self._selector_forget(item)
            self._recent_wall = outcome.wall if self._recent_wall is None else \
                0.8 * self._recent_wall + 0.2 * outcome.wall
            item.usage.peak = max(item.usage.peak, outcome.peak_rss)
            if item.cgroup is not None and self.task_cgroups is not None:
                if self.task_cgroups.oom_kills(item.cgroup) and not outcome.reason:
                    limit = format_size(item.claim.spec.mem_limit)
                    outcome.reason = (f"exceeded its memory limit ({limit}; stopped by the "
                                      "kernel in its cgroup)")
                    self.oom_kills_seen = memory.oom_kills()  # that kill is explained
                self.task_cgroups.remove(item.cgroup)
            self.guard.observe(item.claim.job_id, item.usage, item.claim.task_id)
            if item.abandoned:
                self._forget(tid, item.proc.status_path)
                continue
            self.outbox.append(self._report_for(item, outcome))

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        for item in self.running.values():
            proc = item.proc
            if proc.deadline is not None and now >= proc.deadline and not proc.kill_sent_at:
                proc.terminate(f"timed out after {item.claim.spec.timeout:g}s")
            proc.escalate(self.config.kill_grace)
        while self._cancels:
            tid = self._cancels.popleft()
            self._drop_prefetched({tid})  # already cancelled in Redis: nothing to report
            if tid in self.running:
                self.running[tid].abandoned = True
                self.running[tid].proc.terminate("cancelled")
        if now >= self.timers.sample:
            # Sample faster while memory is tight: growth between two samples is
            # what the low-water mark has to absorb.
            tight = self.guard.last_headroom < 2 * self.guard.marks.high
            self.timers.sample = now + (min(0.1, self.config.sample_interval) if tight
                                        else self.config.sample_interval)
            for item in self.running.values():
                item.usage.add(now, item.proc.sample_rss())
                limit = item.claim.spec.mem_limit
                if limit and item.usage.current > limit and not item.proc.kill_sent_at:
                    used = format_size(item.usage.current)
                    item.proc.terminate(f"exceeded its memory limit ({used} > "
                                        f"{format_size(limit)})")
            self._guard_memory()

    def _guard_memory(self) -> None:
        """Below the low-water mark, preempt the policy's victims until what they use
        would lift headroom back above it."""
        for item in self.running.values():
            if len(item.usage.samples) >= 2:
                self.guard.observe(item.claim.job_id, item.usage, item.claim.task_id)
        live = [r for r in self.running.values() if not r.proc.kill_sent_at]
        dying = sum(r.usage.current for r in self.running.values() if r.proc.kill_sent_at)
        for verdict in self.guard.check([r.candidate() for r in live], dying):
            item = self.running[verdict.task_id]
            item.preempted, item.alone = True, verdict.alone
            log.warning("memory low (%s free): preempting task %s (%s)",
                        format_size(verdict.headroom), verdict.task_id,
                        format_size(item.usage.current))
            item.proc.terminate(f"preempted: memory low ({format_size(verdict.headroom)} free)",
                                grace=min(1.0, self.config.kill_grace))

    def _flush_outbox(self) -> None:
        while self.outbox and self._redis_ok():
            report = self.outbox[0]
            try:
                self._send(report)
            except _REDIS_ERRORS as exc:
                self._went_offline(exc)
                return
            self.outbox.popleft()

    def _self_fence(self, now: float) -> None:
        """With --self-fence, stop tasks before their leases (renewed last at
        ``last_renewed``) can expire and the tasks start elsewhere."""
        limit = max(self.config.lease / 2,
                    self.config.lease - self.config.kill_grace - self.config.heartbeat)
        if (self.config.self_fence and not self.online and self.running
                and now - self.last_renewed > limit):
            log.warning("cut off from Redis for longer than the lease: stopping %d tasks "
                        "(they are rerun elsewhere)", len(self.running))
            for item in self.running.values():
                if not item.abandoned:
                    item.abandoned = True
                    item.proc.terminate("self-fenced: cut off from Redis")

    def _heartbeat(self) -> None:
        self.timers.heartbeat = time.monotonic() + self.config.heartbeat
        self.heartbeat.touch()
        self.pool.tend()
        if self._guardian is not None:
            self._guardian.poll()  # reap it if it exited
        if not self._redis_ok():
            return
        leases = [(tid, r.claim.token) for tid, r in self.running.items() if not r.abandoned]
        leases += [(claim.task_id, claim.token) for claim, _, _ in self.prefetched]
        try:
            lost = self.store.renew(self.name, self.instance, leases,
                                    lease_ms=self._lease_ms, info=self._info())
        except NotOwnerError:
            log.error("worker name %s was taken over by another process; stopping", self.name)
            for item in self.running.values():
                item.abandoned = True
            self.request_stop()
            self.hard_stop = True
            return
        except _REDIS_ERRORS as exc:
            self._went_offline(exc)
            return
        self.last_renewed = time.monotonic()
        self._came_online()
        self._drop_prefetched(set(lost))
        for tid in lost:
            held = self.running.get(tid)
            if held is not None and not held.abandoned:
                log.warning("task %s is no longer ours (cancelled or taken over); stopping it", tid)
                held.abandoned = True
                held.proc.terminate("lease lost")

    def _reap(self) -> None:
        self.timers.reap = time.monotonic() + self.config.heartbeat
        if not self._redis_ok():
            return
        try:
            n = self.store.reap(lock_ms=int(self.config.heartbeat * 1000))
        except _REDIS_ERRORS as exc:
            self._went_offline(exc)
            return
        if n > 0:
            log.info("requeued %d tasks whose lease expired", n)
        self._trim_history()

    def _trim_history(self) -> None:
        """Every ``history_interval``, let old finished tasks leave Redis (archived or expired, as
        configured); bounded per pass, and a no-op while another worker does it."""
        settings = self.config.history
        now = time.monotonic()
        if settings is None or settings.mode == "off" or now < self._next_trim:
            return
        self._next_trim = now + self.config.history_interval
        # Passes of a bounded batch, repeated while they come back full, for at most
        # a second: a busy queue finishes far more than one batch a minute.
        budget, removed, batch = now + 1.0, 0, 1000
        try:
            while True:
                report = history.trim(self.store, settings, limit=batch)
                removed += report.total
                full = max(report.removed.values(), default=0) >= batch
                if report.busy or not full or time.monotonic() >= budget:
                    break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._went_offline(exc)
        except OSError as exc:  # the archive cannot be written: nothing was removed
            log.warning("cannot write the history archive %s (%s); finished tasks stay "
                        "in Redis", settings.archive, exc)
        if removed:
            log.info("history: %d finished tasks left Redis (%s)", removed, settings.mode)

    def _claim_and_start(self) -> bool:
        """Start held tasks that fit, then claim what fits and start it; True if the
        claim got all it asked for (so claiming again at once may get more).
        Otherwise the loop waits: a submit or a finished task wakes it."""
        # Not past half a lease either: a lease that lapsed while we were cut off
        # from Redis may have been given to another worker.
        self._release_prefetched(older_than=min(_PREFETCHED_MAX_AGE, self.config.lease / 2))

        self._start_prefetched()
        free_mem, free_cpus, free_gpus = self._free()
        # Declared budget AND measured headroom (less the high-water mark and what
        # running tasks are projected to grow into) must both allow a task.
        measured, fits = self.guard.admission([r.candidate() for r in self.running.values()],
                                              time.monotonic())
        if fits <= 0:
            return False
        free_mem = min(free_mem, measured)
        room = min(self.config.max_running - len(self.running), fits)
        if self.config.max_tasks is not None:
            room = min(room, self.config.max_tasks - self.stats.started)
        room = max(0, room) if not self.prefetched else 0  # held ones go first
        extra = self._prefetch_room()
        if (room + extra) <= 0 or not self._redis_ok():
            return False
        wanted = min(room + extra, 64)
        task_caps = None
        if extra:
            # Ask as if the running tasks were done (twice over): what does not fit
            # now is held and started the moment their slots free up. No one task
            # may need more than this worker has once its running tasks end.
            running_cpus = sum(r.claim.spec.cpus for r in self.running.values())
            running_mem = sum(r.mem for r in self.running.values())
            task_caps = (free_mem + running_mem, free_cpus + running_cpus)
            free_cpus += _PREFETCH_DEPTH * running_cpus
            free_mem += _PREFETCH_DEPTH * running_mem
        completes: list[_Report] = []
        for report in self.outbox:
            if report.kind != "complete" or len(completes) == 64:
                break
            completes.append(report)
        # The last claim left the queue drained and no wake came since: a claim now
        # would find nothing (the completions still go).
        drained = self._drained_wakes == self._wakes and time.monotonic() < self._drained_until
        if drained and not completes:
            return False
        wakes = self._wakes
        try:
            done, got = self.store.complete_then_claim(
                [(r.task_id, r.token, r.result) for r in completes],
                self.name, self.instance, free_mem=free_mem, free_cpus=free_cpus,
                free_gpus=len(free_gpus), max_count=wanted, lease_ms=self._lease_ms,
                free_resources=self._free_resources(), claim=not drained, task_caps=task_caps)
            for report, applied in zip(completes, done, strict=True):
                self.outbox.popleft()
                if isinstance(applied, Exception):  # a script error: not applied
                    log.error("completing task %s failed: %s", report.task_id, applied)
                    applied = False
                self._completed(report, applied)
            if isinstance(got, Exception):
                raise got
            claims = got
            if not drained:
                self._drained_wakes = wakes
                self._drained_until = time.monotonic() + _DRAINED_TRUST if claims.drained \
                    else 0.0
        except NotOwnerError:
            log.error("worker name %s was taken over by another process; stopping", self.name)
            self.request_stop()
            self.hard_stop = True
            return False
        except _REDIS_ERRORS as exc:
            self._went_offline(exc)
            return False
        self._came_online()
        payloads = self._payloads(claims)
        now = time.monotonic()
        for claim in claims:
            self.prefetched.append((claim, payloads.get(claim.spec.payload or ""), now))
        self._start_prefetched()
        return len(claims) == wanted

    def _prefetch_room(self) -> int:
        """How many more tasks to hold: up to ``_PREFETCH_DEPTH`` per running task,
        while recent tasks are short (a round trip is then a real share of each
        task's time)."""
        if not self.config.prefetch or self.config.max_tasks is not None or self.stopping \
                or self._recent_wall is None or self._recent_wall > _PREFETCH_BELOW:
            return 0
        now = time.monotonic()
        if any(now - r.proc.started > _PREFETCHED_MAX_AGE / 2 for r in self.running.values()):
            return 0  # a long one is running after all: what is held goes back soon
        return max(0, _PREFETCH_DEPTH * len(self.running) - len(self.prefetched))

    def _start_prefetched(self) -> None:
        """Start held tasks in claim order while the next one fits (declared budget,
        GPUs, custom resources and the memory guard, as for a fresh claim). What is
        free is worked out once and counted down, as the claim script does."""
        if not self.prefetched or not self.online:
            return
        free_mem, free_cpus, free_gpus = self._free()
        measured, fits = self.guard.admission(
            [r.candidate() for r in self.running.values()], time.monotonic())
        free_mem = min(free_mem, measured)
        free_res = self._free_resources()
        while self.prefetched and fits > 0 and len(self.running) < self.config.max_running:
            claim, payload, _ = self.prefetched[0]
            spec = claim.spec
            mem = max(claim.mem, spec.mem)
            if spec.cpus > free_cpus or spec.gpus > len(free_gpus) or mem > free_mem \
                    or any(n > free_res.get(name, 0) for name, n in spec.resources):
                return
            self.prefetched.popleft()
            self._start(claim, free_gpus, {spec.payload or "": payload})  # takes its GPUs
            fits -= 1
            free_cpus -= spec.cpus
            free_mem -= mem
            for name, n in spec.resources:
                free_res[name] = free_res.get(name, 0) - n

    def _drop_prefetched(self, task_ids: set[str]) -> None:
        """Forget held tasks that are no longer ours (cancelled, lease lost)."""
        if task_ids and self.prefetched:
            self.prefetched = deque(h for h in self.prefetched if h[0].task_id not in task_ids)

    def _release_prefetched(self, older_than: float | None = None) -> None:
        """Give held tasks back to the queue: all of them (stopping), or those held
        longer than ``older_than`` seconds."""
        now = time.monotonic()
        while self.prefetched and (older_than is None or now - self.prefetched[0][2] > older_than):
            claim, _, _ = self.prefetched.popleft()
            reason = (f"worker {self.name} stopped" if older_than is None else
                      f"held by worker {self.name} for over {older_than:g}s")
            self.outbox.append(_Report("requeue", claim.task_id, claim.token, {},
                                       reason=reason, spec=claim.spec))

    def _payloads(self, claims: list[Claim]) -> dict[str, bytes | None]:
        """The pickled payloads of this batch's python tasks, in one round trip."""
        keys = [c.spec.payload for c in claims
                if c.spec.payload is not None and self.config.allow_pickle
                and not c.spec.payload.startswith(INLINE_PREFIX)]
        if not keys:
            return {}
        try:
            return dict(zip(keys, self.store.get_payloads(keys), strict=True))
        except _REDIS_ERRORS as exc:
            log.warning("cannot fetch python payloads: %s", exc)
            return {}

    def _start(self, claim: Claim, free_gpus: list[int],
               payloads: dict[str, bytes | None] | None = None) -> None:
        if claim.spec.payload is not None and not self.config.allow_pickle:
            self.stats.started += 1
            self.outbox.append(_Report(
                "fail", claim.task_id, claim.token, {"host": self.host}, spec=claim.spec,
                retryable=False,
                reason=f"worker {self.name} refuses pickled Python tasks (start it with "
                       "--allow-pickle if everyone who can write to this queue may run "
                       "code on it, or submit a 'pkg.module:function' reference)"))
            return
        gpus = [free_gpus.pop(0) for _ in range(min(claim.spec.gpus, len(free_gpus)))]
        cgroup = None
        if claim.spec.mem_limit and self.task_cgroups is not None:
            cgroup = self.task_cgroups.create(f"{claim.task_id}.{claim.attempt}",
                                              claim.spec.mem_limit)
        cores: list[int] = []
        if self.config.pin:
            taken = {c for r in self.running.values() for c in r.cores}
            cores = [c for c in self.cores if c not in taken][:max(1, claim.spec.cpus)]
        self.stats.started += 1
        payload = (payloads or {}).get(claim.spec.payload or "")
        proc: runner.TaskProcess
        try:
            if self.config.python_pool and eligible(claim.spec, gpus=len(gpus),
                                                    pinned=bool(cores), cgroup=bool(cgroup)):
                env = runner.task_env_changes(claim.spec, claim.task_id, claim.attempt, gpus)
                proc = self.pool.start(claim.spec, claim.task_id, claim.attempt, self.log_dir,
                                       payload=payload, env=env)
            else:
                proc = runner.start(claim.spec, claim.task_id, claim.attempt, self.log_dir,
                                    tag=self.tag, gpus=gpus, cores=cores, payload=payload,
                                    pythonpath=self.config.pythonpath,
                                    python=self.config.python, cgroup_procs=cgroup)
        except runner.LaunchError as exc:
            self.outbox.append(_Report("fail", claim.task_id, claim.token,
                                       {"host": self.host}, reason=str(exc), spec=claim.spec))
            return
        item = Running(claim, proc, gpus, cores=cores, cgroup=cgroup)
        self.running[claim.task_id] = item
        self._selector_watch(item)


    def _wait(self) -> None:
        now = time.monotonic()
        due = [self.timers.heartbeat, self.timers.reap]
        if self.running:
            due.append(self.timers.sample)
            due += [r.proc.deadline for r in self.running.values() if r.proc.deadline]
            due += [r.proc.kill_sent_at + self.config.kill_grace
                    for r in self.running.values() if r.proc.kill_sent_at]
            if not _HAVE_PIDFD:
                due.append(now + 0.02)
        else:
            due.append(now + 2.0)  # belt and braces if a wake message was missed
        if self.outbox:
            due.append(max(self.timers.offline_until, now + 0.05))
        timeout = max(0.0, min(due) - now)
        for key, _ in self._selector.select(timeout):
            if key.fileobj == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass

    # -- stopping --------------------------------------------------------
    def _stop_running_tasks(self) -> None:
        self._release_prefetched()
        if self.config.drain and not self.hard_stop:
            return
        for item in self.running.values():
            if not item.requeue_reason and not item.abandoned:
                item.requeue_reason = f"worker {self.name} stopped"
            if self.hard_stop:
                item.proc.kill_now("worker stopping")
            else:
                item.proc.terminate("worker stopping")

    def _shutdown(self) -> None:
        self._release_prefetched()
        for item in self.running.values():
            item.proc.kill_now("worker stopping")
        self._closed.set()
        self._poke()
        with contextlib.suppress(*_REDIS_ERRORS):
            self._collect_finished()
            self._flush_outbox()
            self.store.deregister_worker(self.name, self.instance)
        self.pool.close()
        if not self.running:
            self.heartbeat.clear()  # the guardian exits; nothing is orphaned
            if self.task_cgroups is not None:
                self.task_cgroups.close()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- reports ---------------------------------------------------------
    def _report_for(self, item: Running, outcome: runner.Outcome) -> _Report:
        out_tail, err_tail = item.proc.tails(self.config.tail_bytes)
        sig = outcome.signal
        result: dict[str, Any] = {
            "exit_code": "" if outcome.exit_code is None else outcome.exit_code,
            "signal": "" if sig is None else
            signal.Signals(sig).name if sig in signal.valid_signals() else sig,
            "wall": f"{outcome.wall:.3f}",
            "peak_rss": max(outcome.peak_rss, item.usage.peak),
            "host": self.host,
            "out_tail": out_tail,
            "err_tail": err_tail,
            "out_path": str(item.proc.out_path),
            "err_path": str(item.proc.err_path),
            "started_wall": f"{item.proc.started_wall:.3f}",
        }
        tid, token = item.claim.task_id, item.claim.token
        # A pooled call leaves no status file to delete.
        status = None if isinstance(item.proc, PooledTask) else item.proc.status_path
        spec = item.claim.spec
        cleanup: list[Path] = []
        py_error = ""
        if spec.kind == "python":
            py_error, cleanup = self._python_result(item, outcome, result)
        if not item.preempted and sig == signal.SIGKILL and not outcome.reason \
                and self._kernel_oom_killed():
            # The kernel acted before the guard could: treat it as the guard's own
            # preemption (requeue with the learned requirement), not as a failure.
            item.preempted = True
            item.alone = len(self.running) == 0
            outcome.reason = "killed by the kernel OOM killer"
        if item.preempted:
            return _Report("preempt", tid, token, result, reason=outcome.reason,
                           peak=int(result["peak_rss"]), alone=item.alone, mem=item.mem,
                           status_path=status, spec=spec)
        if item.proc.adopted and outcome.reason == runner.VANISHED:
            # e.g. the guardian stopped it just as this (restarted) worker adopted it
            return _Report("requeue", tid, token, result, reason=runner.VANISHED,
                           status_path=status, spec=spec)
        if item.requeue_reason:
            return _Report("requeue", tid, token, result, reason=item.requeue_reason,
                           status_path=status, spec=spec)
        if outcome.ok and not py_error:
            return _Report("complete", tid, token, result, status_path=status, spec=spec,
                           cleanup=cleanup)
        if outcome.reason:
            reason = outcome.reason
        elif py_error:
            reason = py_error
        elif sig is not None:
            reason = f"killed by signal {result['signal']}"
        else:
            hint = _EXIT_HINTS.get(outcome.exit_code or 0, "")
            reason = f"exit code {outcome.exit_code}{hint}"
            if spec.kind == "python" and err_tail.strip():
                reason += ": " + err_tail.strip().splitlines()[-1][:300]
        return _Report("fail", tid, token, result, reason=reason, status_path=status, spec=spec,
                       cleanup=cleanup)

    def _python_result(self, item: Running, outcome: runner.Outcome, result: dict[str, Any]
                       ) -> tuple[str, list[Path]]:
        """Put a python task's result (or raised exception) into the report: inline
        (base64) up to ``result_max_bytes``, else as a file path. Returns an error
        reason ("" if none) and the files to delete once the report is in."""
        call_path, result_path = runner.python_paths(item.proc.status_path)
        cleanup = [call_path, result_path]
        if isinstance(item.proc, PooledTask) and not item.proc.wrote_call_file:
            cleanup = [result_path]
        result["result"] = ""
        result["result_path"] = ""
        result["result_size"] = ""
        if isinstance(item.proc, PooledTask) and item.proc.result is not None:
            data = item.proc.result  # came back in the reply: no file
            result["result_size"] = len(data)
            result["result"] = base64.b64encode(data).decode()
            return _python_error_reason(data), cleanup[:-1]
        try:
            size = result_path.stat().st_size
        except OSError:
            return "", cleanup  # died without a result (signal, kill): reported as such
        result["result_size"] = size
        try:
            if size <= self.config.result_max_bytes:
                data = result_path.read_bytes()
                result["result"] = base64.b64encode(data).decode()
                return _python_error_reason(data), cleanup
            kept = result_path
            if self.config.result_dir is not None:
                kept = (self.config.result_dir / self.store.queue /
                        f"{item.claim.task_id}.{item.claim.attempt}.result").absolute()
                kept.parent.mkdir(parents=True, exist_ok=True)
                os.replace(result_path, kept)
            result["result_path"] = str(kept)
            return _python_error_reason_file(kept), [call_path]
        except OSError as exc:
            cap = format_size(self.config.result_max_bytes)
            return (f"the result ({format_size(size)}) is over the {cap} cap for the task "
                    f"record and could not be kept as a file: {exc}"), cleanup

    def _kernel_oom_killed(self) -> bool:
        """A SIGKILL we did not send, while the kernel's OOM-kill counter moved."""
        now = memory.oom_kills()
        moved = now > self.oom_kills_seen
        self.oom_kills_seen = now
        return moved

    def _forget(self, task_id: str, status_path: Path | None) -> None:
        """The report is in (or refused): the status file has served its purpose."""
        if status_path is not None:
            with contextlib.suppress(OSError):
                status_path.unlink()

    def _send(self, report: _Report) -> None:
        if report.kind == "complete":
            self._completed(report, self.store.complete(report.task_id, report.token,
                                                        report.result))
            return
        self._apply(report)
        self._after_report(report)

    def _completed(self, report: _Report, applied: bool) -> None:
        """A completion is in (``applied`` False: the lease had moved on)."""
        if applied:
            self.stats.succeeded += 1
        else:
            self.stats.stale += 1
        self._after_report(report)

    def _after_report(self, report: _Report) -> None:
        self._forget(report.task_id, report.status_path)
        for path in report.cleanup:
            with contextlib.suppress(OSError):
                path.unlink()

    def _apply(self, report: _Report) -> None:
        if report.kind == "fail":
            spec = report.spec
            status = self.store.fail(report.task_id, report.token, report.reason, report.result,
                                     retry_delay=(spec.retry_delay or 0.0) if spec else 0.0,
                                     retryable=report.retryable)
            self._count("requeued" if status == "retry" else status)
        elif report.kind == "preempt":
            self._apply_preemption(report)
        else:
            status = self.store.requeue(report.task_id, report.token, report.reason,
                                        counter="releases")
            self._count(status)

    def _apply_preemption(self, report: _Report) -> None:
        """Requeue with the learned requirement max(current, peak x 1.2), so it is next
        placed where it fits. A task that was alone here needs more than this node has:
        it goes back only if some live worker is big enough, else it fails."""
        spec = report.spec
        assert spec is not None
        learned = max(report.mem, int(report.peak * 1.2))
        if report.alone:
            learned = max(learned, self.memory + 1)
            no_fit = (f"needs more memory than this node has (peak {format_size(report.peak)}"
                      f" of {format_size(self.memory)})")
            if report.reason.startswith("killed by the kernel"):
                no_fit = f"{report.reason}: {no_fit}"
        else:
            no_fit = (f"needs {format_size(learned)} (peak {format_size(report.peak)}), "
                      "more than any live worker has")
        status = self.store.requeue(
            report.task_id, report.token, report.reason, counter="preempts", new_mem=learned,
            cpus=spec.cpus, gpus=spec.gpus, resources=spec.resources,
            max_count=self.config.max_preempts,
            no_fit_reason=no_fit)
        if status == "requeued":
            self.stats.preempted += 1
        self._count(status)

    def _count(self, status: str) -> None:
        if status == "requeued":
            self.stats.requeued += 1
        elif status == "failed":
            self.stats.failed += 1
        else:
            self.stats.stale += 1

    # -- resources -------------------------------------------------------
    def _free(self) -> tuple[int, int, list[int]]:
        used_mem = sum(r.mem for r in self.running.values())
        used_cpus = sum(r.claim.spec.cpus for r in self.running.values())
        used_gpus = {g for r in self.running.values() for g in r.gpus}
        return (self.memory - used_mem, self.cpus - used_cpus,
                [g for g in self.gpus if g not in used_gpus])

    def _free_resources(self) -> dict[str, int]:
        free = dict(self.config.resources)
        for item in self.running.values():
            for name, amount in item.claim.spec.resources:
                free[name] = free.get(name, 0) - amount
        return free

    def _info(self) -> dict[str, Any]:
        free_mem, free_cpus, _free_gpus = self._free()
        rss = sum(r.proc.peak_rss for r in self.running.values())
        return {"host": self.host, "pid": os.getpid(), "cpus": self.cpus, "mem": self.memory,
                "gpus": len(self.gpus), "used_cpus": self.cpus - free_cpus,
                "used_mem": self.memory - free_mem, "rss": rss,
                "running": len(self.running), "done": self.stats.succeeded + self.stats.failed}

    @property
    def _lease_ms(self) -> int:
        return int(self.config.lease * 1000)

    def _reached_max_tasks(self) -> bool:
        limit = self.config.max_tasks
        return limit is not None and self.stats.started >= limit and not self.running

    def _should_exit(self) -> bool:
        check = self.config.exit_when
        if check is None or self.outbox or not self._redis_ok():
            return False
        try:
            return check()
        except _REDIS_ERRORS as exc:
            self._went_offline(exc)
            return False

    # -- Redis availability ----------------------------------------------
    def _redis_ok(self) -> bool:
        return self.online or time.monotonic() >= self.timers.offline_until

    def _went_offline(self, exc: BaseException) -> None:
        if self.online:
            log.warning("lost Redis (%s); tasks keep running, retrying with backoff", exc)
        self.online = False
        self.timers.offline_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)

    def _came_online(self) -> None:
        if not self.online:
            log.warning("Redis is back; renewing leases")
            self.online = True
            self.timers.heartbeat = 0.0  # renew at once
        self._backoff = 0.1

    # -- wake-ups --------------------------------------------------------
    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _selector_watch(self, item: Running) -> None:
        if isinstance(item.proc, PooledTask):  # its reply pipe (the pool owns the fd)
            self._selector.register(item.proc.watch_fd, selectors.EVENT_READ,
                                    item.claim.task_id)
            return
        if _HAVE_PIDFD:
            try:
                fd = os.pidfd_open(item.proc.pid)
            except OSError:
                return
            self._selector.register(fd, selectors.EVENT_READ, item.claim.task_id)
            item.proc.pidfd = fd

    def _selector_forget(self, item: Running) -> None:
        if isinstance(item.proc, PooledTask):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(item.proc.watch_fd)
            return
        fd = item.proc.pidfd
        if fd is not None:
            item.proc.pidfd = None
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)
            os.close(fd)

    def _start_listener(self) -> None:
        self._listener = threading.Thread(target=self._listen, name="distcomp-listen",
                                          daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        """Forward pub/sub wake and cancel messages into the loop's wake pipe."""
        backoff = 0.1
        while not self._closed.is_set():
            pubsub = self.store.redis.pubsub(  # type: ignore[no-untyped-call]
                ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.store.wake_channel, self.store.control_channel)
                self._wakes += 1  # we may have missed messages while (re)connecting
                self._poke()
                backoff = 0.1
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["channel"] == self.store.control_channel:
                        parts = str(message["data"]).split()
                        if len(parts) == 3 and parts[0] == "cancel" and parts[1] == self.name:
                            self._cancels.append(parts[2])
                    self._wakes += 1
                    self._poke()
            except _REDIS_ERRORS:
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()


def _visible_gpus(pid: int) -> list[int]:
    """The GPUs an adopted task was given, from its environment."""
    try:
        value = psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES", "")
    except psutil.Error:
        return []
    return [int(g) for g in value.split(",") if g.strip().isdigit()]


class _NoClassesUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}")


def _python_error_reason(data: bytes) -> str:
    """"raised ValueError: bad input" from a result file's bytes, or "" if it holds a
    value. Reads only the header fields, never unpickles the user's exception here."""
    if b"error" not in data[:64]:
        return ""  # the record's tag comes first: this is a value, not unpickled here
    try:
        record = _load_result_header(data)
    except Exception:  # a corrupt result file is itself the failure
        return "the task's result file could not be read"
    if record[0] == "ok":
        return ""
    name, message = str(record[2]), str(record[3])
    short = name.rsplit(".", 1)[-1] if name.startswith("builtins.") else name
    text = f"raised {short}: {message}" if message else f"raised {short}"
    return text[:500]


def _python_error_reason_file(path: Path) -> str:
    """Like :func:`_python_error_reason`, for a result too large to keep inline. An
    error record is small, so a large file is nearly always a value."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return "the task's result file could not be read"
    return _python_error_reason(path.read_bytes()) if b"error" in head else ""


def _load_result_header(data: bytes) -> tuple[Any, ...]:
    """Unpickle a result record without importing any type: an error record holds only
    str/bytes/None (the exception stays a nested pickle), and the worker must never
    run task code by unpickling it."""
    try:
        record = _NoClassesUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        return ("ok",)  # an error record holds only str/bytes/None: this is a value
    return tuple(record)


#: What the shell means by these statuses, so a reason reads without a manual.
_EXIT_HINTS = {126: " (command not executable)", 127: " (command not found)"}

_HAVE_PIDFD = hasattr(os, "pidfd_open")
if _HAVE_PIDFD:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # pragma: no cover - kernel older than 5.3
        _HAVE_PIDFD = False

