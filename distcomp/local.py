"""A worker for one client, in a process of its own: ``client.local_worker(n)``
and ``Executor(workers=n)``.

Why a process and not a thread: the worker's loop and the client's listener
are both Python, and under one GIL each waits for the other on every call
(measured: a thread-local worker ran no-op calls at about 1,070/s with a p50
round trip of 2.0-2.7 ms on two cores; the same worker as a process, 1,360/s
and 1.6 ms). A process also keeps a crash of either side from taking the
other along.

The child (``python -m distcomp.local``) reads its settings, a pickle of
``(url, queue, WorkerConfig)``, from stdin, so a password in the URL never
appears in ``ps``. It runs in its own session (Ctrl-C in the terminal goes to
the client, which decides) and stops when a pipe from the client reaches end
of file: when ``stop()`` closes it, or when the client dies however it dies.
Either way running tasks are requeued, as for any worker told to stop. Its
final ``Stats`` come back as a pickle on stdout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any, BinaryIO

from .store import HeldLease, Store
from .worker import Stats, Worker, WorkerConfig

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("distcomp.local")


class LocalWorkerError(RuntimeError):
    """The local worker process ended on an error (its message says which)."""


class LocalWorker:
    """A worker on the client's queue in a child process. Its python tasks see this
    process's ``sys.path``, so functions from modules importable here import
    there too; pickled callables are allowed (it is your own queue)."""

    def __init__(self, client: Client, cpus: int, **config: Any) -> None:
        state = client.state_dir
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        config.setdefault("allow_pickle", True)
        config.setdefault("pythonpath", paths)
        config.setdefault("log_dir", state / "logs")
        config.setdefault("state_dir", state)
        config.setdefault("heartbeat", 1.0)
        config.setdefault("lease", 10.0)
        config.setdefault("probation", 0.0)
        self.config = WorkerConfig(cpus=cpus, **config)
        if self.config.exit_when is not None:
            raise ValueError("a local worker cannot take exit_when (it runs in another process)")
        self.stats: Stats | None = None
        self.error: BaseException | None = None
        # The child holds the read end; end of file there (we closed it, or we died)
        # tells it to stop.
        self._lifeline_r, self._lifeline_w = os.pipe()
        os.set_inheritable(self._lifeline_w, False)
        _LIFELINES.add(self._lifeline_w)
        env = os.environ.copy()
        # The child imports the same distcomp as we did, wherever it came from; it
        # puts PYTHONPATH back before running anything, so tasks do not inherit it.
        original_pythonpath = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(
            [*paths, *([original_pythonpath] if original_pythonpath else [])])
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "distcomp.local", str(self._lifeline_r)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                pass_fds=(self._lifeline_r,), start_new_session=True)
        finally:
            os.close(self._lifeline_r)
        self._stopped = threading.Lock()
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            with self.process.stdin as settings:
                pickle.dump((client.store.url, client.store.queue, self.config,
                             original_pythonpath), settings)
            self.process.stdin = None  # closed: communicate() must not flush it
            # One byte once it has registered; end of file if it failed to start (a
            # taken name, an unreachable Redis...), whose message is on our stderr.
            ready, _, _ = select.select([self.process.stdout], [], [], _START_TIMEOUT)
            started = bool(ready) and os.read(self.process.stdout.fileno(), 1) == _READY
        except OSError:
            started = False
        if not started:
            self._close_lifeline()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            raise LocalWorkerError(
                f"the local worker did not start (exit status {self.process.returncode}; "
                "its messages are on this process's stderr)")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """Stop claiming; running tasks are requeued (stopped with SIGTERM). Waits up
        to ``timeout`` seconds, then kills the worker (its guardian stops its tasks)."""
        with self._stopped:
            if self._lifeline_w < 0:
                return
            self._close_lifeline()
        assert self.process.stdout is not None
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("local worker %d did not stop within %gs; killing it",
                      self.process.pid, timeout)
            self.process.kill()
            out, _ = self.process.communicate()
        if self.process.returncode == 0 and out:
            with contextlib.suppress(Exception):
                self.stats = pickle.loads(out)
        else:
            self.error = LocalWorkerError(
                f"local worker exited with status {self.process.returncode} "
                "(its messages are on this process's stderr)")
            log.error("%s", self.error)

    def _close_lifeline(self) -> None:
        _LIFELINES.discard(self._lifeline_w)
        with contextlib.suppress(OSError):
            os.close(self._lifeline_w)
        self._lifeline_w = -1

    def __del__(self) -> None:
        # Closing the lifeline is enough: the child stops on its own.
        if getattr(self, "_lifeline_w", -1) >= 0:
            self._close_lifeline()


#: Write ends of live lifelines. A child forked from the client (multiprocessing's
#: default on Linux) closes them, so that it cannot keep a local worker alive after
#: the client itself is gone.
_LIFELINES: set[int] = set()
_READY = b"R"
#: Seconds a local worker may take to start and register.
_START_TIMEOUT = 60.0


def _close_lifelines_in_child() -> None:
    for fd in _LIFELINES:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LIFELINES.clear()


os.register_at_fork(after_in_child=_close_lifelines_in_child)


class _AnnouncedWorker(Worker):
    """Tells the client (one byte on ``announce``) once it has registered."""

    def __init__(self, store: Store, config: WorkerConfig, announce: BinaryIO) -> None:
        super().__init__(store, config)
        self._announce = announce

    def register(self) -> list[HeldLease]:
        held = super().register()
        self._announce.write(_READY)
        self._announce.flush()
        return held


def _watch_lifeline(fd: int, worker: Worker) -> None:
    """Block until the client closes the lifeline (or dies), then stop the worker."""
    with contextlib.suppress(OSError):
        while os.read(fd, 1):
            pass
    worker.request_stop()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="distcomp local worker: %(message)s")
    lifeline = int(argv[0])
    url, queue, config, pythonpath = pickle.load(sys.stdin.buffer)
    if pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = pythonpath
    # Stats go to the client on stdout; nothing else may write there.
    stats_out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    worker = _AnnouncedWorker(Store(url, queue), config, stats_out)
    worker.install_signal_handlers()
    threading.Thread(target=_watch_lifeline, args=(lifeline, worker), daemon=True,
                     name="distcomp-lifeline").start()
    stats = worker.run()
    # The client may be gone (that may be why we stopped): nobody to tell then.
    with contextlib.suppress(OSError), stats_out:
        pickle.dump(stats, stats_out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
