"""The ``distcomp`` command: parses arguments, calls the library, renders.

Exit codes: 0 success; 1 some task failed (``run``) or an action found nothing
to do where something was expected; 2 bad input or usage (nothing changed);
3 the Redis server cannot be reached or started; 4 a named job/task/log does
not exist.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .client import Client, NotFoundError, TaskRow
from .resources import parse_gpu_list
from .server import (
    ServerError,
    embedded_paths,
    embedded_running,
    ensure_embedded,
    state_dir_path,
    stop_embedded,
)
from .spec import FieldError, SpecError, format_size, parse_duration, parse_size
from .store import STATES, NameTakenError
from .taskfile import spec_from_fields
from .worker import Worker, WorkerConfig

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4

# Task commands and names are data: never read them as rich markup or emoji codes.
console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Map library exceptions to a message and a meaningful exit code."""
    try:
        yield
    except SpecError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except (FieldError, ValueError) as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except NotFoundError as exc:
        fail(str(exc.args[0]), EXIT_NOT_FOUND)
    except NameTakenError as exc:
        fail(f"{exc}; choose another --name or stop the other worker", EXIT_BAD_INPUT)
    except ServerError as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail(f"cannot reach Redis: {exc}. Check --redis / DISTCOMP_REDIS, or start the "
             "server (distcomp server start)", EXIT_UNREACHABLE)
    except redis.AuthenticationError as exc:
        fail(f"Redis refused the credentials: {exc}", EXIT_UNREACHABLE)


class Ctx:
    def __init__(self, redis_url: str | None, queue: str, state_dir: str | None) -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.state_dir = state_dir
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.redis_url, self.queue, self.state_dir)
        return self._client


pass_ctx = click.make_pass_decorator(Ctx)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis", "redis_url", envvar="DISTCOMP_REDIS", metavar="URL",
              help="Redis URL (redis://, rediss://, unix://). Default: the embedded server.")
@click.option("--queue", "-q", default="default", envvar="DISTCOMP_QUEUE", show_default=True,
              help="Named queue; several can share one Redis.")
@click.option("--state-dir", envvar="DISTCOMP_STATE_DIR", metavar="DIR",
              help="Where the embedded server and logs live. Default: ./.distcomp")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="distcomp")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, queue: str, state_dir: str | None,
         verbose: int) -> None:
    """Run thousands of independent experiments on one machine or many nodes."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx.obj = Ctx(redis_url, queue, state_dir)


# -- submitting ----------------------------------------------------------------

_TASK_FLAGS: list[Callable[[F], F]] = [
    click.option("--name", help="Task name."),
    click.option("--priority", "-p", type=int, help="Higher runs first (-999..999)."),
    click.option("--mem", help="Memory needed, e.g. 512M, 4G (bare number = GiB)."),
    click.option("--cpus", type=int, help="Cores needed (default 1)."),
    click.option("--gpus", type=int, help="GPUs needed (default 0)."),
    click.option("--timeout", help="Kill after this long, e.g. 90s, 2h."),
    click.option("--retries", type=int, help="Times to retry a failure (default: queue's)."),
    click.option("--retry-delay", help="Wait before a retry, doubling each time (e.g. 30s)."),
    click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable."),
    click.option("--cwd", help="Working directory on the worker."),
    click.option("--tag", "tags", multiple=True, help="Tag (repeatable)."),
]


def task_flags(func: F) -> F:
    for option in reversed(_TASK_FLAGS):
        func = option(func)
    return func


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@task_flags
@click.option("--job-name", help="Name of the job (default: the file name).")
@click.option("--allow-duplicates", is_flag=True,
              help="Submit tasks again even if an identical task was submitted before.")
@json_option
@pass_ctx
def submit(ctx: Ctx, /, file: str | None, command: tuple[str, ...], job_name: str | None,
           allow_duplicates: bool, as_json: bool, **flags: Any) -> None:
    """Submit a task file (line, TOML or JSONL format), or one command after `--`.

    \b
      distcomp submit tasks.txt
      distcomp submit --mem 2G --cpus 2 -- ./cachesim --algo lru trace.bin
    """
    with friendly_errors():
        if command or (file and _is_dash_command()):
            words = ([file] if file else []) + list(command)
            spec = spec_from_fields(_flag_fields(flags, " ".join(_quote(words))),
                                    "command line", 0)
            result = ctx.client.submit_specs([spec], job_name=job_name or spec.display_name,
                                             source="command line",
                                             allow_duplicates=allow_duplicates)
        elif file:
            if any(v not in (None, ()) for v in flags.values()):
                fail("task flags (--mem, --cpus, ...) apply to a command after `--`; "
                     "in a task file, write them on each line", EXIT_BAD_INPUT)
            result = ctx.client.submit_file(file, job_name=job_name,
                                            allow_duplicates=allow_duplicates)
        else:
            fail("give a task file or a command after `--` (see distcomp submit -h)",
                 EXIT_BAD_INPUT)
    if as_json:
        console.print_json(json.dumps({"job": result.job_id, "new": result.new,
                                       "duplicates": result.duplicates,
                                       "tasks": result.task_ids}))
        return
    if result.job_id:
        console.print(f"job [bold]{result.job_id}[/]: {result.new} tasks submitted"
                      + (f", {result.duplicates} already known (not resubmitted)"
                         if result.duplicates else ""))
    else:
        console.print(f"nothing new: all {result.duplicates} tasks were submitted before "
                      "(use --allow-duplicates to run them again, or distcomp retry)")


def _is_dash_command() -> bool:
    return "--" in sys.argv


def _quote(words: Sequence[str]) -> list[str]:
    import shlex

    return [shlex.quote(w) for w in words]


def _flag_fields(flags: dict[str, Any], cmd: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"cmd": cmd}
    for key in ("name", "priority", "mem", "cpus", "gpus", "timeout", "retries", "retry_delay",
                "cwd"):
        if flags.get(key) is not None:
            fields[key] = flags[key]
    if flags.get("env"):
        env: dict[str, str] = {}
        for item in flags["env"]:
            if "=" not in item:
                raise FieldError("env", f"expected K=V, got {item!r}")
            key, _, value = item.partition("=")
            env[key] = value
        fields["env"] = env
    if flags.get("tags"):
        fields["tags"] = list(flags["tags"])
    return fields


# -- running -------------------------------------------------------------------

def _worker_options(func: F) -> F:
    options = [
        click.option("--name", help="Worker name (default: hostname; must be unique)."),
        click.option("--cpus", type=int, help="Cores to use (default: all this process may)."),
        click.option("--memory", help="Memory to use, e.g. 16G (default: physical/cgroup)."),
        click.option("--gpus", help="GPU indices, e.g. 0,1 (default: detected)."),
        click.option("--max-tasks", type=int, help="Exit after starting this many tasks."),
        click.option("--log-dir", type=click.Path(file_okay=False),
                     help="Where task logs go (default: STATE_DIR/logs; may be shared)."),
        click.option("--heartbeat", default="5s", show_default=True,
                     help="Heartbeat / lease renewal interval."),
        click.option("--lease", default="30s", show_default=True,
                     help="Lease length; a silent worker's tasks are requeued after it."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _worker_config(ctx: Ctx, name: str | None, cpus: int | None, memory: str | None,
                   gpus: str | None, max_tasks: int | None, log_dir: str | None,
                   heartbeat: str, lease: str) -> WorkerConfig:
    hb = parse_duration(heartbeat, "heartbeat")
    lease_s = parse_duration(lease, "lease")
    if lease_s < 2 * hb:
        raise ValueError(f"--lease ({lease_s:g}s) must be at least twice --heartbeat ({hb:g}s)")
    return WorkerConfig(
        name=name,
        cpus=cpus,
        memory=parse_size(memory, "memory") if memory else None,
        gpus=parse_gpu_list(gpus) if gpus is not None else None,
        max_tasks=max_tasks,
        log_dir=Path(log_dir) if log_dir else state_dir_path(ctx.state_dir) / "logs",
        state_dir=state_dir_path(ctx.state_dir),
        heartbeat=hb,
        lease=lease_s,
    )


@main.command()
@_worker_options
@click.option("--drain", is_flag=True, help="On SIGTERM, finish running tasks before exiting.")
@click.option("--self-fence", is_flag=True,
              help="Stop running tasks when cut off from Redis for about a lease "
                   "(they are rerun elsewhere); default: keep them running.")
@pass_ctx
def worker(ctx: Ctx, /, drain: bool, self_fence: bool, **options: Any) -> None:
    """Run tasks from the queue until stopped (SIGTERM/Ctrl-C; twice to stop at once)."""
    with friendly_errors():
        config = _worker_config(ctx, **options)
        config.drain = drain
        config.self_fence = self_fence
        node = Worker(ctx.client.store, config)
        node.install_signal_handlers()
        err_console.print(f"worker {node.name}: {node.cpus} cpus, "
                          f"{format_size(node.memory)} memory, gpus {node.gpus or 'none'}; "
                          f"queue {ctx.queue}")
        stats = node.run()
    err_console.print(f"worker {node.name} stopped: {stats.succeeded} succeeded, "
                      f"{stats.failed} failed, {stats.requeued} requeued")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@_worker_options
@click.option("--allow-duplicates", is_flag=True, help="Run tasks again that ran before.")
@click.option("--job-name", help="Name of the job (default: the file name).")
@click.option("--no-progress", is_flag=True, help="No progress bar (plain summary only).")
@json_option
@pass_ctx
def run(ctx: Ctx, /, file: str, allow_duplicates: bool, job_name: str | None, no_progress: bool,
        as_json: bool, **options: Any) -> None:
    """Submit FILE and run it here until every task has finished.

    Finished tasks are not run again when the same file is run again; Ctrl-C
    stops cleanly (running tasks go back to the queue) and a later run continues.
    Exits 1 if any task failed.
    """
    with friendly_errors():
        client = ctx.client
        result = client.submit_file(file, job_name=job_name, allow_duplicates=allow_duplicates)
        job_ids = sorted({tid.split(".", 1)[0] for tid in result.task_ids}, key=int)
        config = _worker_config(ctx, **options)

        def all_done() -> bool:
            return all(job.done for job in client.jobs(job_ids))

        config.exit_when = all_done
        node = Worker(client.store, config)
        if not all_done():
            _run_and_follow(client, job_ids, node, show=not (no_progress or as_json))
        rows = client.task_rows(task_ids=result.task_ids)
    _summarise(rows, result.new, as_json)
    if any(r.state != "succeeded" for r in rows):
        sys.exit(EXIT_FAILED)


def _run_and_follow(client: Client, job_ids: list[str], node: Worker, show: bool) -> None:
    """Run the worker in a thread and show progress until it exits.

    Ctrl-C asks the worker to stop (twice: at once). The main thread only sleeps
    and polls an Event: a ``Thread.join`` interrupted by KeyboardInterrupt can
    leave the thread looking finished while it still runs.
    """
    finished = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            node.run()
        except BaseException as exc:
            errors.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=target, name="distcomp-worker", daemon=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.fields[counts]}"), TimeRemainingColumn(),
                        console=err_console, disable=not show, transient=False)
    thread.start()
    with progress:
        bar = progress.add_task("run", total=None, counts="")
        while not finished.is_set():
            try:
                jobs = client.jobs(job_ids)
                total = sum(j.n_tasks for j in jobs)
                counts = {s: sum(j.counts.get(s, 0) for j in jobs) for s in STATES}
                text = " ".join(f"{s} {counts[s]}" for s in STATES if counts[s])
                progress.update(bar, total=total, completed=sum(j.finished for j in jobs),
                                counts=text)
                time.sleep(0.25)
            except KeyboardInterrupt:
                err_console.print("stopping: running tasks go back to the queue "
                                  "(Ctrl-C again to stop at once)")
                node.request_stop()
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.5)
    thread.join()
    if errors:
        raise errors[0]


def _summarise(rows: list[TaskRow], new: int, as_json: bool) -> None:
    by_state: dict[str, int] = {}
    for row in rows:
        by_state[row.state] = by_state.get(row.state, 0) + 1
    failures = [r for r in rows if r.state == "failed"]
    if as_json:
        console.print_json(json.dumps({"counts": by_state, "new": new,
                                       "failed": [r.as_dict() for r in failures]}))
        return
    summary = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
    console.print(f"{len(rows)} tasks: {summary or 'none'}")
    if failures:
        table = Table("task", "command", "reason", title="failed tasks")
        for row in failures[:50]:
            table.add_row(row.id, _short(row.name or row.cmd, 60), _short(row.reason, 80))
        console.print(table)
        if len(failures) > 50:
            console.print(f"... and {len(failures) - 50} more (distcomp tasks --state failed)")


# -- inspecting ----------------------------------------------------------------

@main.command()
@json_option
@pass_ctx
def status(ctx: Ctx, as_json: bool) -> None:
    """Counts per state, per job and for the queue (O(jobs), never a scan of tasks)."""
    with friendly_errors():
        counts = ctx.client.counts()
        jobs = ctx.client.jobs()
        workers = ctx.client.workers()
    alive = sum(1 for w in workers if w["status"] == "alive")
    if as_json:
        console.print_json(json.dumps({
            "queue": ctx.queue, "counts": counts, "workers_alive": alive,
            "jobs": [{"id": j.id, "name": j.name, "tasks": j.n_tasks, "counts": j.counts}
                     for j in jobs]}))
        return
    table = Table("job", "name", "tasks", *STATES, title=f"queue {ctx.queue}")
    for job in jobs:
        table.add_row(job.id, _short(job.name, 30), str(job.n_tasks),
                      *(str(job.counts.get(s, 0)) for s in STATES))
    table.add_row("all", "", str(sum(j.n_tasks for j in jobs)),
                  *(str(counts[s]) for s in STATES), style="bold")
    console.print(table)
    console.print(f"workers alive: {alive}")


@main.command()
@click.option("--job", "-j", "jobs", multiple=True, help="Only this job (repeatable).")
@click.option("--state", "-s", "states", multiple=True, type=click.Choice(STATES),
              help="Only tasks in this state (repeatable).")
@click.option("--tag", "-t", "tags", multiple=True, help="Only tasks with this tag.")
@click.option("--limit", type=int, default=None, help="At most this many rows.")
@json_option
@pass_ctx
def tasks(ctx: Ctx, jobs: tuple[str, ...], states: tuple[str, ...], tags: tuple[str, ...],
          limit: int | None, as_json: bool) -> None:
    """List tasks with their state, attempts and outcome."""
    with friendly_errors():
        rows = ctx.client.task_rows(job_ids=list(jobs) or None, states=states, tags=tags,
                                    limit=limit)
    if as_json:
        console.print_json(json.dumps([r.as_dict() for r in rows]))
        return
    table = Table("task", "state", "command", "attempt", "exit", "wall", "peak mem", "host",
                  "reason")
    for row in rows:
        table.add_row(row.id, row.state, _short(row.name or row.cmd, 50), str(row.attempt),
                      _exit(row), _secs(row.wall), format_size(row.peak_rss), row.host,
                      _short(row.reason, 40))
    console.print(table)


@main.command()
@click.argument("task_id")
@click.option("--stderr", "stream", flag_value="err", help="Show stderr instead of stdout.")
@click.option("--stdout", "stream", flag_value="out", default=True, help="Show stdout.")
@pass_ctx
def logs(ctx: Ctx, task_id: str, stream: str) -> None:
    """Print a task's output (the whole log when reachable from here, else its tail)."""
    with friendly_errors():
        text, complete = ctx.client.logs(task_id, stream=stream)
    if not complete:
        err_console.print("[yellow]log file not reachable from this machine; "
                          "showing the tail kept in Redis[/]")
    sys.stdout.write(text)
    sys.stdout.flush()


@main.command()
@click.option("--job", "-j", "jobs", multiple=True, help="Only this job (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@pass_ctx
def results(ctx: Ctx, jobs: tuple[str, ...], fmt: str) -> None:
    """Results table: id, name, command, state, exit code, wall time, peak memory, host."""
    with friendly_errors():
        rows = ctx.client.task_rows(job_ids=list(jobs) or None)
    columns = ["id", "name", "cmd", "state", "exit_code", "signal", "wall", "peak_rss", "host",
               "attempt", "reason", "mem", "declared_mem"]
    if fmt == "json":
        console.print_json(json.dumps([r.as_dict() for r in rows]))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for row in rows:
            data = row.as_dict()
            writer.writerow(["" if data[c] is None else data[c] for c in columns])
    else:
        table = Table("task", "name", "command", "state", "exit", "wall", "peak mem", "host",
                      "attempts")
        for row in rows:
            table.add_row(row.id, _short(row.name, 20), _short(row.cmd, 40), row.state,
                          _exit(row), _secs(row.wall), format_size(row.peak_rss), row.host,
                          str(row.attempt))
        console.print(table)


@main.command()
@click.option("--prune", is_flag=True, help="Forget dead and stopped workers.")
@json_option
@pass_ctx
def workers(ctx: Ctx, prune: bool, as_json: bool) -> None:
    """Workers: capacity, usage, running tasks, heartbeat age; dead ones flagged."""
    with friendly_errors():
        rows = ctx.client.workers()
        if prune:
            gone = [w["name"] for w in rows if w["status"] != "alive"]
            for name in gone:
                ctx.client.store.forget_worker(name)
            rows = [w for w in rows if w["status"] == "alive"]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("worker", "status", "host", "cpus used/total", "mem used/total", "tasks",
                  "heartbeat")
    for w in rows:
        info = w["info"]
        style = {"dead": "red", "stopped": "dim"}.get(w["status"], "")
        table.add_row(w.get("name", "?"), w["status"], w.get("host", ""),
                      f"{info.get('used_cpus', 0)}/{info.get('cpus', '?')}",
                      f"{format_size(info.get('used_mem', 0))}/{format_size(info.get('mem'))}",
                      str(w["n_tasks"]), f"{w['heartbeat_age_s']:.1f}s ago", style=style)
    console.print(table)


# -- acting --------------------------------------------------------------------

@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "all_failed", is_flag=True, help="Every failed task in the queue.")
@click.option("--cancelled", is_flag=True, help="Also requeue cancelled tasks.")
@click.option("--reason", metavar="TEXT",
              help="Only tasks whose failure reason contains TEXT (e.g. 'timed out').")
@pass_ctx
def retry(ctx: Ctx, ids: tuple[str, ...], all_failed: bool, cancelled: bool,
          reason: str | None) -> None:
    """Requeue failed tasks of the given jobs or tasks (or --all)."""
    if not ids and not all_failed:
        fail("name jobs or tasks to retry, or pass --all", EXIT_BAD_INPUT)
    with friendly_errors():
        n = ctx.client.retry(ids, include_cancelled=cancelled, reason=reason)
    console.print(f"{n} tasks requeued")


@main.command()
@click.argument("ids", nargs=-1, required=True)
@pass_ctx
def cancel(ctx: Ctx, ids: tuple[str, ...]) -> None:
    """Cancel tasks (JOB.N) or whole jobs (JOB); running ones are killed."""
    with friendly_errors():
        n = ctx.client.cancel(ids)
    console.print(f"{n} tasks cancelled")


# -- the managed server --------------------------------------------------------

@main.group()
def server() -> None:
    """The embedded Redis server in the state directory."""


@server.command("start")
@click.option("--appendfsync", type=click.Choice(["everysec", "always"]), default="everysec",
              show_default=True, help="AOF fsync policy ('always' loses nothing on power loss).")
@pass_ctx
def server_start(ctx: Ctx, appendfsync: str) -> None:
    """Start the embedded server (a no-op if it runs); prints its URL."""
    with friendly_errors():
        url = ensure_embedded(ctx.state_dir, appendfsync=appendfsync)
    console.print(url)


@server.command("stop")
@pass_ctx
def server_stop(ctx: Ctx) -> None:
    """Stop the embedded server (its AOF keeps every acknowledged task)."""
    with friendly_errors():
        stopped = stop_embedded(ctx.state_dir)
    console.print("stopped" if stopped else "not running")


@server.command("status")
@json_option
@pass_ctx
def server_status(ctx: Ctx, as_json: bool) -> None:
    """Is the embedded server running, and where."""
    paths = embedded_paths(ctx.state_dir)
    running = embedded_running(ctx.state_dir)
    if as_json:
        console.print_json(json.dumps({"running": running, "url": paths.url,
                                       "state_dir": str(paths.state_dir)}))
    else:
        console.print(f"{'running' if running else 'not running'}: {paths.url}")
    if not running:
        sys.exit(EXIT_UNREACHABLE)


# -- rendering helpers ---------------------------------------------------------

def _short(text: str, width: int) -> Text:
    text = text.replace("\n", " ")
    return Text(text if len(text) <= width else text[: width - 1] + "…")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _exit(row: TaskRow) -> str:
    if row.signal:
        return row.signal
    return "-" if row.exit_code is None else str(row.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
