"""Warm interpreters for python tasks: the worker's side of ``pytask --serve``.

Starting an interpreter and importing cloudpickle (and the user's modules) costs
tens of milliseconds, far more than a small function call. So a worker keeps up
to one warm interpreter per slot and hands it call after call over a pipe; the
call's stdout/stderr still go to the attempt's own log files.

A pool process is its own process group, exactly like a shell task's wrapper, so
everything the worker does to a task (sample its memory, SIGTERM it on a timeout,
a cancel or a preemption, SIGKILL it after the grace) works unchanged: a
:class:`PooledTask` *is* a :class:`runner.TaskProcess` whose pid is the pool
process. A call that is killed takes its interpreter with it; the pool starts a
fresh one for the next call. A crash (segfault, ``os._exit``) likewise ends only
that interpreter. An interpreter is retired after ``max_tasks`` calls or once
its resident memory passes ``max_rss`` (a leak, or memory the allocator keeps),
and after ``idle_timeout`` without work.

What a warm interpreter cannot do, the worker leaves to a fresh one per task
(:func:`eligible`): GPU tasks (CUDA reads ``CUDA_VISIBLE_DEVICES`` once per
process), pinned tasks and tasks with a kernel-enforced memory cgroup (both
apply to a whole process from its start), tasks with a ``mem_limit`` (what an
earlier call left in the interpreter must not count against it), and tasks
whose environment sets variables the interpreter reads only at start-up
(``PYTHON*``, ``LD_*``).

Pooled tasks are not re-adopted by a restarted worker: the pool dies with its
worker (``PR_SET_PDEATHSIG``; the worker's tag is on each interpreter's command
line, so the guardian stops a hung worker's interpreters with its task
wrappers), and those tasks go back to the queue to run again, as for any task
whose process is gone. Modules stay
imported between calls: code changed on disk is picked up by the next fresh
interpreter (after ``max_tasks``) or a worker restart.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import runner
from .pytask import FRAME_HEADER, frame, frame_size
from .spec import TaskSpec

#: Calls larger than this travel through the call file, not the request pipe, so
#: a write to the pipe never blocks the worker's loop.
INLINE_CALL_BYTES = 32 * 1024


@dataclass
class PoolConfig:
    python: str = sys.executable
    pythonpath: list[str] = field(default_factory=list)
    #: Retire an interpreter after this many calls...
    max_tasks: int = 1000
    #: ...or once its resident memory exceeds this after a call.
    max_rss: int = 512 * 1024 * 1024
    #: Retire an idle interpreter after this many seconds without work.
    idle_timeout: float = 60.0
    #: The worker's tag, in each interpreter's command line, so the guardian finds
    #: them as it finds the worker's task wrappers.
    tag: str = ""
    #: A retired interpreter still running after this long is killed.
    retire_grace: float = 5.0
    #: Outcomes up to this many bytes come back in the reply; larger ones go through
    #: the result file (the worker's ``result_max_bytes``: what fits in the record).
    inline_result_max: int = 1024 * 1024


def eligible(spec: TaskSpec, *, gpus: int, pinned: bool, cgroup: bool) -> bool:
    """Can this python task run in a warm interpreter (see the module docstring)? Not
    with a ``mem_limit`` either: an interpreter's memory includes what earlier calls
    left, which must not count against this call's limit."""
    if spec.kind != "python" or gpus or spec.gpus or pinned or cgroup or spec.mem_limit:
        return False
    return not any(name.startswith(("PYTHON", "LD_")) for name, _ in spec.env)


@dataclass
class PoolProcess:
    """One warm interpreter: its process, the request pipe we write and the reply
    pipe we read (non-blocking; the worker's selector waits on it)."""

    popen: subprocess.Popen[bytes]
    requests: int
    replies: int
    calls: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    buffer: bytearray = field(default_factory=bytearray)
    retired_at: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, message: object) -> None:
        data = frame(message)
        view = memoryview(data)
        while view:  # small by construction (INLINE_CALL_BYTES): fits the pipe buffer
            written = os.write(self.requests, view)
            view = view[written:]

    def read_reply(self) -> tuple[dict[str, Any] | None, bool]:
        """(reply, alive): a complete reply if one arrived; alive False at end of
        stream (the interpreter died, or we closed the pipe)."""
        if self.replies < 0:
            return None, False
        try:
            chunk = os.read(self.replies, 65536)
        except BlockingIOError:
            return self._take(), True
        if not chunk:
            return self._take(), False
        self.buffer += chunk
        return self._take(), True

    def _take(self) -> dict[str, Any] | None:
        size = frame_size(self.buffer)
        if size is None:
            return None
        message: dict[str, Any] = pickle.loads(self.buffer[FRAME_HEADER:size])
        del self.buffer[:size]
        return message

    def close(self, *, kill: bool = False) -> None:
        """Retire: closing the request pipe makes it exit; ``kill`` does not wait."""
        for fd in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.requests = self.replies = -1
        if kill:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def reap(self) -> int | None:
        """The interpreter's exit status once it is gone (non-blocking)."""
        return self.popen.poll()


@dataclass
class PooledTask(runner.TaskProcess):
    """A call running in a warm interpreter; polls the reply pipe instead of waiting
    for the process to exit."""

    pool: Pool | None = field(default=None, repr=False)
    member: PoolProcess | None = field(default=None, repr=False)
    #: The fd whose readability means "look at me": a reply, or the pipe's end. Kept
    #: here because the pool closes it when the interpreter retires.
    watch_fd: int = -1
    #: The call went through the call file (too large for the pipe): delete it after.
    wrote_call_file: bool = False
    #: The pickled outcome, when it came back in the reply (else: the result file).
    result: bytes | None = field(default=None, repr=False)
    #: The logs' sizes when the call returned (None: unknown, e.g. it crashed).
    log_sizes: tuple[int, int] | None = None
    _outcome: runner.Outcome | None = field(default=None, repr=False)

    def tails(self, limit: int = runner.DEFAULT_TAIL_BYTES) -> tuple[str, str]:
        """As for any task, but without opening a log the call left empty."""
        if self.log_sizes is None:
            return super().tails(limit)
        out_size, err_size = self.log_sizes
        return (runner.read_tail(self.out_path, limit) if out_size else "",
                runner.read_tail(self.err_path, limit) if err_size else "")

    def poll(self) -> runner.Outcome | None:
        if self._outcome is not None:
            return self._outcome
        assert self.member is not None and self.pool is not None
        reply, alive = self.member.read_reply()
        wall = time.monotonic() - self.started
        if reply is not None and not self.kill_sent_at:
            # The interpreter's high-water mark if this call raised it, else at
            # least what it holds now (baseline included, as for any process).
            self.peak_rss = max(self.peak_rss, int(reply["peak"]), int(reply["rss"]))
            self.result = reply.get("result")
            self.log_sizes = int(reply.get("out_size", 1)), int(reply.get("err_size", 1))
            self._outcome = runner.Outcome(int(reply["code"]), None, wall, self.peak_rss,
                                           self.kill_reason)
            self.pool.release(self.member, rss=int(reply["rss"]))
            return self._outcome
        if alive and not self.kill_sent_at and self.member.reap() is None:
            # (Checked directly too: a child the call forked may hold the reply pipe
            # open after the interpreter itself died.)
            return None
        # Killed (by us or by a crash): wait for the interpreter to be gone (the
        # worker's loop escalates SIGTERM to SIGKILL), then report how it ended, as
        # for a shell task.
        status = self.member.reap()
        if status is None:
            return None
        self.pool.discard(self.member)
        code = status if status >= 0 else None
        sig = -status if status < 0 else None
        self._outcome = runner.Outcome(code, sig, wall, self.peak_rss, self.kill_reason)
        return self._outcome


class Pool:
    """The worker's warm interpreters. Not thread-safe: the worker's loop owns it."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.idle: list[PoolProcess] = []
        self.busy: set[int] = set()
        self.members: dict[int, PoolProcess] = {}
        #: Retired interpreters not yet reaped (they exit on their own).
        self._retired: list[PoolProcess] = []
        #: Interpreters started so far (tests and stats).
        self.started = 0

    def _spawn(self) -> PoolProcess:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        env = os.environ.copy()
        paths = [*self.config.pythonpath, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        try:
            popen = subprocess.Popen(
                [self.config.python, "-m", "distcomp.pytask", "--serve", str(req_r), str(rep_w),
                 str(os.getpid()), runner.TASK_TAG_PREFIX + self.config.tag],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(req_r, rep_w), env=env, start_new_session=True)
        except OSError as exc:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise runner.LaunchError(f"cannot start a python interpreter: {exc}") from exc
        os.close(req_r)
        os.close(rep_w)
        os.set_blocking(rep_r, False)
        self.started += 1
        member = PoolProcess(popen, req_w, rep_r)
        self.members[member.pid] = member
        return member

    def _take(self) -> PoolProcess:
        while self.idle:
            member = self.idle.pop()
            if member.reap() is None:
                return member
            self.discard(member)  # died while idle
        return self._spawn()

    def start(self, spec: TaskSpec, task_id: str, attempt: int, log_dir: Path, *,
              payload: bytes | None, env: dict[str, str]) -> PooledTask:
        """Hand one call to a warm interpreter (starting one if none is idle); ``env``
        holds what the call's environment changes (``runner.task_env_changes``)."""
        out_path, err_path, status_path, cwd = runner.prepare(spec, task_id, attempt, log_dir)
        data = runner.python_call_data(spec, payload)
        call_path, result_path = runner.python_paths(status_path)
        inline: bytes | None = data
        try:
            if len(data) > INLINE_CALL_BYTES:
                inline = None
                call_path.write_bytes(data)
            member = self._take()
        except OSError as exc:  # unwritable log dir, out of fds or processes...
            raise runner.LaunchError(f"cannot start the call: {exc}") from exc
        try:
            member.send({"call": inline, "call_path": str(call_path), "result": str(result_path),
                         "out": str(out_path), "err": str(err_path), "env": env,
                         "cwd": cwd, "inline_max": self.config.inline_result_max})
        except OSError as exc:  # it died between calls
            self.discard(member, kill=True)
            raise runner.LaunchError(f"the python interpreter went away: {exc}") from exc
        member.calls += 1
        self.busy.add(member.pid)
        now = time.monotonic()
        return PooledTask(
            task_id=task_id, pid=member.pid, pid_start=0.0, child=True,
            out_path=out_path, err_path=err_path, status_path=status_path, started=now,
            started_wall=time.time(), deadline=now + spec.timeout if spec.timeout else None,
            pool=self, member=member, watch_fd=member.replies,
            wrote_call_file=inline is None)

    def release(self, member: PoolProcess, *, rss: int) -> None:
        """A call ended normally: keep the interpreter warm unless it is due to retire."""
        self.busy.discard(member.pid)
        if member.calls >= self.config.max_tasks or rss > self.config.max_rss:
            self.discard(member)
            return
        member.idle_since = time.monotonic()
        self.idle.append(member)

    def discard(self, member: PoolProcess, *, kill: bool = False) -> None:
        self.busy.discard(member.pid)
        with contextlib.suppress(ValueError):
            self.idle.remove(member)
        self.members.pop(member.pid, None)
        member.close(kill=kill)
        member.retired_at = time.monotonic()
        self._retired.append(member)

    def tend(self, now: float | None = None) -> None:
        """Retire interpreters idle too long; reap retired ones that have exited."""
        now = time.monotonic() if now is None else now
        for member in [m for m in self.idle if now - m.idle_since > self.config.idle_timeout]:
            self.discard(member)
        still: list[PoolProcess] = []
        for member in self._retired:
            if member.reap() is None and now - (member.retired_at or now) < \
                    self.config.retire_grace:
                still.append(member)
                continue
            # Exited (or overdue: a thread a call left behind keeps it alive): whatever
            # is left of its process group goes, as after a one-shot task.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(member.pid, signal.SIGKILL)
            if member.reap() is None:
                still.append(member)  # reaped next time
        self._retired = still

    def close(self) -> None:
        """Stop every interpreter (the worker is exiting)."""
        for member in list(self.members.values()):
            self.discard(member, kill=member.pid in self.busy)
        deadline = time.monotonic() + 2.0
        while self._retired and time.monotonic() < deadline:
            self._retired = [m for m in self._retired if m.reap() is None]
            if self._retired:
                time.sleep(0.01)
        for member in self._retired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(member.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                member.popen.wait(1.0)
        self._retired = []
