"""How one task runs: its own process group, environment, log files, limits.

Knows nothing about Redis. The worker asks it to start a task, to tell whether
it ended (``poll``), to sample its memory, and to kill it; it answers with plain
values. Each task runs as ``/bin/sh -c CMD`` in a new session, so killing its
process group takes every child it forked with it.

A task must be able to outlive its worker (a restarted worker re-adopts it), so
its exit status cannot depend on the worker's ``wait``: a one-line shell
wrapper, the group leader, opens the log files, runs the command and writes
its exit status to a status file on exit. The wrapper's ``$0`` carries a tag
naming the queue and worker, and its arguments the status file
(``<log_dir>/<job>/<task>.<attempt>.status``): the process table itself is the
record of what runs, so a restarted worker (or the guardian) finds its tasks
without any file written on the hot path. A re-adopted task is not our child;
it is watched by pid and start time and its status read from the status file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .pytask import INLINE_PREFIX
from .spec import TaskSpec

#: Bytes of stdout/stderr kept in the task record; the full logs stay in files.
DEFAULT_TAIL_BYTES = 8192

TASK_TAG_PREFIX = "distcomp-task:"
#: Why an adopted task ended without leaving a status: it was stopped (by its
#: guardian, or anyone) while no worker watched it — not the task's own failure.
VANISHED = "stopped while its worker was away"

#: $1 = the command, $2 = status file, $3/$4 = stdout/stderr logs. The command runs
#: in the wrapper shell itself (one exec per task, not two); its status is written
#: by the EXIT trap (also on ``exit N``), with a trailing newline so a reader can
#: tell a complete status from a torn write. Positional parameters are cleared so
#: the command sees none, as under ``sh -c``.
_WRAPPER_EVAL = ('exec >"$3" 2>"$4" </dev/null; __dc_s=$2; __dc_c=$1; set --; '
                 "trap 'echo \"$?\" >\"$__dc_s\"' EXIT; eval \"$__dc_c\"")
#: A command that may ``exec`` would replace the wrapper (and its EXIT trap), so it
#: runs in a child shell instead.
_WRAPPER_CHILD = ('exec >"$3" 2>"$4" </dev/null; /bin/sh -c "$1"; rc=$?; '
                  'echo "$rc" >"$2"; exit "$rc"')
_EXEC_RE = re.compile(r"\bexec\b")
_JOIN_CGROUP = 'echo $$ >"$DISTCOMP_CGROUP_PROCS"; unset DISTCOMP_CGROUP_PROCS; '
#: Job log directories already created by this process (one mkdir per job, not per task).
_made_dirs: set[Path] = set()
#: posix_spawn with setsid (glibc >= 2.26); turned off if the platform refuses it.
_spawn_ok = hasattr(os, "posix_spawn") and hasattr(os, "POSIX_SPAWN_DUP2")
#: Python ignores SIGPIPE (and SIGXFSZ); a task must get the defaults back, as
#: Popen's restore_signals gives them.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
_devnull: int | None = None


def _spawn_file_actions() -> list[tuple[int, ...]]:
    """posix_spawn file actions: stdin/stdout/stderr from/to /dev/null (the wrapper
    then points stdout/stderr at the task's logs), and every other descriptor this
    process has that would be inherited closed, as Popen's close_fds does (Python
    makes its own close-on-exec, but a process may have inherited some from
    whoever started it)."""
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    actions: list[tuple[int, ...]] = [
        (os.POSIX_SPAWN_DUP2, _devnull, 0), (os.POSIX_SPAWN_DUP2, _devnull, 1),
        (os.POSIX_SPAWN_DUP2, _devnull, 2)]
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own fd, now closed
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
    return actions


@dataclass
class Outcome:
    """How a task process ended."""

    exit_code: int | None
    signal: int | None
    wall: float
    peak_rss: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.reason


def _outcome_from_status(code: int, wall: float, peak: int, reason: str) -> Outcome:
    """A shell reports a command killed by signal N as status 128+N."""
    if code < 0:
        return Outcome(None, -code, wall, peak, reason)
    if 128 < code <= 128 + 64:
        return Outcome(None, code - 128, wall, peak, reason)
    return Outcome(code, None, wall, peak, reason)


def read_status(path: Path) -> int | None:
    """The exit status the wrapper wrote, or None if it has not (completely)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


@dataclass
class TaskProcess:
    """A started task: its process, where its output goes, and what it used."""

    task_id: str
    pid: int
    pid_start: float
    out_path: Path
    err_path: Path
    status_path: Path
    started: float
    started_wall: float
    deadline: float | None
    #: True for a task we started (our child, reaped with wait4); False for a
    #: re-adopted one (watched by pid and start time).
    child: bool = False
    #: Its exit status once reaped.
    returncode: int | None = None
    #: The Popen, when it was started through one (kept until reaped, so that
    #: subprocess's own bookkeeping never reaps our child behind our back).
    popen: subprocess.Popen[bytes] | None = None
    peak_rss: int = 0
    parent_maxrss_kb: int = 0
    kill_reason: str = ""
    kill_sent_at: float | None = None
    kill_grace: float | None = None
    #: A pidfd the worker's selector waits on, so a task's end wakes the loop at once.
    pidfd: int | None = None
    _psutil: psutil.Process | None = field(default=None, repr=False)

    def poll(self) -> Outcome | None:
        """Reap the process if it ended (non-blocking); also sweeps its group."""
        code = self._poll_child() if self.child else self._poll_adopted()
        if code is None:
            return None
        wall = time.monotonic() - self.started
        return _outcome_from_status(code, wall, self.peak_rss, self.kill_reason)

    def _poll_child(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status, rusage = self.pid, 0, None
            if pid == 0:
                return None
            self.returncode = os.waitstatus_to_exitcode(status)
            if self.popen is not None:
                self.popen.returncode = self.returncode
            # At exec the kernel folds the parent's high-water RSS into the child's
            # ru_maxrss, so it only tells us something when it exceeds ours.
            if rusage is not None and rusage.ru_maxrss > self.parent_maxrss_kb:
                self.peak_rss = max(self.peak_rss, rusage.ru_maxrss * 1024)
            # The shell is gone; anything it left behind in its group goes too.
            _signal_group(self.pid, signal.SIGKILL)
        return self.returncode

    def _poll_adopted(self) -> int | None:
        if is_same_process(self.pid, self.pid_start):
            return None
        _signal_group(self.pid, signal.SIGKILL)
        status = read_status(self.status_path)
        if status is not None:
            return status
        # Gone without a status: the wrapper itself was killed.
        self.kill_reason = self.kill_reason or VANISHED
        return -signal.SIGKILL

    @property
    def adopted(self) -> bool:
        return not self.child

    def sample_rss(self) -> int:
        """Sum of RSS over the process tree now; updates the peak."""
        try:
            if self._psutil is None:
                self._psutil = psutil.Process(self.pid)
            procs = [self._psutil, *self._psutil.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        self.peak_rss = max(self.peak_rss, total)
        return total

    def terminate(self, reason: str, grace: float | None = None) -> None:
        """SIGTERM the whole group now; :meth:`escalate` sends SIGKILL after the grace
        (``grace`` overrides the worker's, e.g. a short one when memory runs out)."""
        if self.kill_sent_at is None:
            self.kill_reason = reason
            self.kill_sent_at = time.monotonic()
            self.kill_grace = grace
            _signal_group(self.pid, signal.SIGTERM)

    def escalate(self, grace: float) -> None:
        if self.kill_grace is not None:
            grace = min(grace, self.kill_grace)
        if self.kill_sent_at is not None and time.monotonic() - self.kill_sent_at >= grace:
            _signal_group(self.pid, signal.SIGKILL)

    def kill_now(self, reason: str) -> None:
        self.kill_reason = self.kill_reason or reason
        self.kill_sent_at = self.kill_sent_at or time.monotonic()
        _signal_group(self.pid, signal.SIGKILL)

    def tails(self, limit: int = DEFAULT_TAIL_BYTES) -> tuple[str, str]:
        return read_tail(self.out_path, limit), read_tail(self.err_path, limit)


def is_same_process(pid: int, start: float) -> bool:
    """True if ``pid`` is alive and started at ``start`` (so a reused pid is not it)."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - start) < 0.05
    except psutil.Error:
        return False


@dataclass(frozen=True)
class FoundTask:
    """A task wrapper found in the process table."""

    pid: int
    pid_start: float
    status_path: Path
    out_path: Path
    err_path: Path


def find_tasks(tag: str) -> dict[Path, FoundTask]:
    """Every live task wrapper started with ``tag``, by status file path.

    Subshells the command forks (``$(...)``) carry the wrapper's command line too;
    only the wrapper leads its process group, so only it is taken."""
    marker = TASK_TAG_PREFIX + tag
    found: dict[Path, FoundTask] = {}
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = proc.info.get("cmdline") or []
        if len(cmd) >= 8 and cmd[0] == "/bin/sh" and cmd[3] == marker and _leads_group(proc.pid):
            status = Path(cmd[5])
            found[status] = FoundTask(proc.pid, proc.info["create_time"], status,
                                      Path(cmd[6]), Path(cmd[7]))
    return found


def find_interpreters(tag: str) -> list[tuple[int, float]]:
    """(pid, start time) of every warm python interpreter (``distcomp.pool``) started
    with ``tag``: the guardian stops them with the task wrappers."""
    marker = TASK_TAG_PREFIX + tag
    found: list[tuple[int, float]] = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = proc.info.get("cmdline") or []
        if len(cmd) >= 8 and cmd[-1] == marker and cmd[-6:-4] == ["distcomp.pytask", "--serve"]:
            found.append((proc.pid, proc.info["create_time"]))
    return found


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def log_paths(log_dir: Path, task_id: str, attempt: int) -> tuple[Path, Path, Path]:
    """(stdout, stderr, status) of one attempt: derived, so nothing needs recording."""
    base = log_dir / task_id.split(".", 1)[0] / f"{task_id}.{attempt}"
    return base.with_suffix(".out"), base.with_suffix(".err"), base.with_suffix(".status")


def adopt(task_id: str, attempt: int, log_dir: Path, found: FoundTask | None,
          started_wall: float, timeout: float | None) -> TaskProcess | None:
    """Take over a task started by a previous worker process, if it is still running
    or left its exit status; None if it is truly gone."""
    out_path, err_path, status_path = log_paths(log_dir, task_id, attempt)
    if found is None and read_status(status_path) is None:
        return None
    elapsed = max(0.0, time.time() - started_wall)
    now = time.monotonic()
    return TaskProcess(task_id=task_id, pid=found.pid if found else 0,
                       pid_start=found.pid_start if found else 0.0, out_path=out_path,
                       err_path=err_path, status_path=status_path, started=now - elapsed,
                       started_wall=started_wall,
                       deadline=now - elapsed + timeout if timeout else None)


def _signal_group(pgid: int, sig: int) -> None:
    if pgid <= 0:
        return  # an adopted task that had already ended: nothing to signal
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def read_tail(path: Path, limit: int = DEFAULT_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a log, decoded with replacement (never raises)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            data = handle.read(limit)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text = f"[... {size - limit} earlier bytes in {path}]\n" + text
    return text


def python_paths(status_path: Path) -> tuple[Path, Path]:
    """(call file, result file) of a python task attempt, beside its status file."""
    return status_path.with_suffix(".call"), status_path.with_suffix(".result")


def python_call_data(spec: TaskSpec, payload: bytes | None) -> bytes:
    """What the interpreter runs: the pickled payload, or a JSON reference."""
    if spec.payload is not None:
        if spec.payload.startswith(INLINE_PREFIX):
            try:
                return base64.b64decode(spec.payload[len(INLINE_PREFIX):], validate=True)
            except ValueError as exc:
                raise LaunchError(f"the task's inline payload is corrupt: {exc}") from exc
        if payload is None:
            raise LaunchError(f"the task's pickled payload ({spec.payload}) is missing")
        return payload
    return json.dumps({"func": spec.func, "args": list(spec.args),
                       "kwargs": dict(spec.kwargs)}).encode()


def _python_command(spec: TaskSpec, status_path: Path, payload: bytes | None,
                    python: str) -> str:
    """Write the call file and return the shell command that runs it. The child is a
    fresh interpreter, so a crash, a leak or a stuck C extension dies with its own
    process group and cannot harm the worker."""
    call_path, result_path = python_paths(status_path)
    data = python_call_data(spec, payload)
    try:
        with contextlib.suppress(FileNotFoundError):
            result_path.unlink()
        call_path.write_bytes(data)
    except OSError as exc:
        raise LaunchError(f"cannot write {call_path}: {exc.strerror}") from exc
    return " ".join(shlex.quote(part) for part in
                    (python, "-m", "distcomp.pytask", str(call_path), str(result_path)))


class LaunchError(RuntimeError):
    """The task could not be started at all (missing cwd, unwritable log dir...)."""


def task_env_changes(spec: TaskSpec, task_id: str, attempt: int, gpus: list[int]
                     ) -> dict[str, str]:
    """What a task's environment adds to the worker's: its own ``env``, who it is,
    and thread counts matching its cpus (unless set already)."""
    changes = dict(spec.env)
    threads = str(max(1, spec.cpus))
    changes.update({
        "DISTCOMP_TASK_ID": task_id,
        "DISTCOMP_JOB_ID": task_id.split(".", 1)[0],
        "DISTCOMP_ATTEMPT": str(attempt),
        "DISTCOMP_CPUS": threads,
    })
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if name not in changes and name not in os.environ:
            changes[name] = threads
    if gpus or spec.gpus:
        changes["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return changes


def task_environment(spec: TaskSpec, task_id: str, attempt: int, gpus: list[int]
                     ) -> dict[str, str]:
    env = os.environ.copy()
    env.update(task_env_changes(spec, task_id, attempt, gpus))
    return env


def prepare(spec: TaskSpec, task_id: str, attempt: int, log_dir: Path
            ) -> tuple[Path, Path, Path, str | None]:
    """(stdout, stderr, status, cwd) of an attempt about to start, once its log
    directory exists and its working directory is known to be one."""
    out_path, err_path, status_path = log_paths(log_dir, task_id, attempt)
    task_dir = out_path.parent
    if task_dir not in _made_dirs:
        try:
            task_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LaunchError(f"cannot create log directory {task_dir}: {exc.strerror}") from exc
        if not os.access(task_dir, os.W_OK | os.X_OK):
            raise LaunchError(f"cannot write logs under {task_dir}: permission denied")
        _made_dirs.add(task_dir)
    cwd = os.path.expanduser(spec.cwd) if spec.cwd else None
    if cwd is not None and not os.path.isdir(cwd):
        what = "is not a directory" if os.path.exists(cwd) else "does not exist"
        raise LaunchError(f"working directory {cwd!r} {what}")
    return out_path, err_path, status_path, cwd


def start(spec: TaskSpec, task_id: str, attempt: int, log_dir: Path, *, tag: str,
          gpus: list[int] | None = None, cores: list[int] | None = None,
          payload: bytes | None = None, pythonpath: Sequence[str] = (),
          python: str = sys.executable, cgroup_procs: Path | None = None) -> TaskProcess:
    """Start the task in its own session; the wrapper opens its log files, so the
    worker's loop does no per-task file I/O (a python task's call file excepted).
    ``log_dir`` must be absolute. A python task runs ``python -m distcomp.pytask``
    under the same wrapper, with ``pythonpath`` prepended to ``PYTHONPATH``."""
    global _spawn_ok
    out_path, err_path, status_path, cwd = prepare(spec, task_id, attempt, log_dir)
    command = spec.cmd
    env = task_environment(spec, task_id, attempt, gpus or [])
    if spec.kind == "python":
        command = _python_command(spec, status_path, payload, python)
        paths = [*pythonpath, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
    wrapper = _WRAPPER_CHILD if _EXEC_RE.search(command) else _WRAPPER_EVAL
    if cgroup_procs is not None:
        # The wrapper moves itself into the task's cgroup before running anything.
        env["DISTCOMP_CGROUP_PROCS"] = str(cgroup_procs)
        wrapper = _JOIN_CGROUP + wrapper
    argv = ["/bin/sh", "-c", wrapper, TASK_TAG_PREFIX + tag, command, str(status_path),
            str(out_path), str(err_path)]
    popen: subprocess.Popen[bytes] | None = None
    try:
        pid = 0
        if cwd is None and not cores and _spawn_ok:
            # The common case, by posix_spawn: cheaper for the worker's loop than
            # Popen (no error pipe, no Python-level bookkeeping); the file actions
            # give the task only stdin/stdout/stderr, as close_fds would.
            try:
                pid = os.posix_spawn("/bin/sh", argv, env, setsid=True,
                                     setsigdef=_DEFAULT_SIGNALS,
                                     file_actions=_spawn_file_actions())
            except NotImplementedError:
                _spawn_ok = False
            except OSError:
                pid = 0  # e.g. an fd closed under us by another thread: use Popen
        if not pid:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True,
                close_fds=True,
                # Only when pinning: a preexec function costs the fast vfork path.
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
            pid = popen.pid
    except OSError as exc:
        raise LaunchError(f"cannot start the task: {exc}") from exc
    now = time.monotonic()
    return TaskProcess(
        task_id=task_id,
        pid=pid,
        pid_start=0.0,  # only adopted tasks are told apart by start time
        child=True,
        popen=popen,
        out_path=out_path,
        err_path=err_path,
        status_path=status_path,
        started=now,
        started_wall=time.time(),
        deadline=now + spec.timeout if spec.timeout else None,
        parent_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
