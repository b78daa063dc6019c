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
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
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
from .config import HistorySettings, load_history
from .memory import VICTIM_POLICIES
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
    # Before ConnectionError: redis-py's AuthenticationError is a subclass of it.
    except redis.AuthenticationError as exc:
        fail(f"Redis refused the credentials ({exc}). Check the password in --redis / "
             "DISTCOMP_REDIS / distcomp.toml; on the head node, `distcomp server url "
             "--show-password` prints the URL to use", EXIT_UNREACHABLE)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail(f"cannot reach Redis: {exc}. Check --redis / DISTCOMP_REDIS, or start the "
             "server (distcomp server start)", EXIT_UNREACHABLE)


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
              help="Redis URL (redis://, rediss://, unix://). Default: distcomp.toml, "
                   "else the embedded server.")
@click.option("--queue", "-q", default="default", envvar="DISTCOMP_QUEUE", show_default=True,
              help="Named queue; several can share one Redis.")
@click.option("--state-dir", envvar="DISTCOMP_STATE_DIR", metavar="DIR",
              help="Where the embedded server and logs live. Default: ./.distcomp")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="distcomp")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, queue: str, state_dir: str | None,
         verbose: int) -> None:
    """Run thousands of independent experiments on one machine or many nodes.

    Connection settings: flag > environment (DISTCOMP_REDIS, DISTCOMP_QUEUE,
    DISTCOMP_STATE_DIR) > distcomp.toml (here, else ~/.config/distcomp/) > default.
    """
    from .config import resolve  # here, not at the top: keeps this edit to main()

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not ctx.resilient_parsing:
        # None = "not given": only then may distcomp.toml fill it in.
        given_queue = (None if ctx.get_parameter_source("queue")
                       == click.core.ParameterSource.DEFAULT else queue)
        with friendly_errors():
            resolved = resolve(redis_url, given_queue, state_dir)
        redis_url, queue, state_dir = resolved.redis, resolved.queue, resolved.state_dir
    ctx.obj = Ctx(redis_url, queue, state_dir)


# -- submitting ----------------------------------------------------------------

_TASK_FLAGS: list[Callable[[F], F]] = [
    click.option("--name", help="Task name."),
    click.option("--priority", "-p", type=int, help="Higher runs first (-999..999)."),
    click.option("--mem", help="Memory needed, e.g. 512M, 4G (bare number = GiB)."),
    click.option("--mem-limit", help="Kill the task if it uses more memory than this."),
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
    for key in ("name", "priority", "mem", "mem_limit", "cpus", "gpus", "timeout", "retries",
                "retry_delay", "cwd"):
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
        click.option("--reserve", help="Memory kept back for the system (default: none "
                                        "with --memory, else 5% of the node)."),
        click.option("--low-water", help="Preempt tasks when free memory falls below this "
                                          "(default: 10% of capacity, at most 2G)."),
        click.option("--high-water", help="Start tasks only while this stays free "
                                           "(default: 20% of capacity, at most 4G)."),
        click.option("--victim-policy", type=click.Choice(sorted(VICTIM_POLICIES)),
                     default="youngest", show_default=True,
                     help="Which task the memory guard preempts first."),
        click.option("--max-preempts", type=int, default=5, show_default=True,
                     help="Preemptions after which a task fails instead."),
        click.option("--admission", type=click.Choice(["growth", "instant"]),
                     default="growth", show_default=True,
                     help="growth: project running tasks' memory (slope, job profiles) "
                          "before starting more; instant: only the headroom now."),
        click.option("--horizon", default="30s", show_default=True,
                     help="How far ahead growth-aware admission projects memory."),
        click.option("--resource", "resources", multiple=True, metavar="NAME=N",
                     help="A custom resource this worker offers (repeatable), e.g. "
                          "license=2; tasks ask for it with resources = {license = 1}."),
        click.option("--pin", is_flag=True,
                     help="Give each task its own cores (as many as its cpus)."),
        click.option("--probation", default="1s", show_default=True,
                     help="Watch the first task of a new job this long before starting "
                          "more of it (0 to trust declared memory)."),
        click.option("--allow-pickle/--no-allow-pickle", default=None,
                     help="Run python tasks that carry a pickled callable: anyone who can "
                          "write to the queue can then run code here. Default: on for a "
                          "unix-socket (local) server, off otherwise."),
        click.option("--pythonpath", multiple=True, metavar="DIR",
                     help="Prepend DIR to PYTHONPATH for python tasks (repeatable), so "
                          "'pkg.module:function' references import."),
        click.option("--result-max-bytes", default="1M", show_default=True,
                     help="Python results up to this size go into the task record; "
                          "larger ones stay in a file (see --result-dir)."),
        click.option("--result-dir", type=click.Path(file_okay=False),
                     help="Where results over --result-max-bytes go (share it with the "
                          "clients; default: beside the task logs)."),
        click.option("--python-pool/--no-python-pool", default=True, show_default=True,
                     help="Run python tasks in warm interpreters (one per slot, reused "
                          "call after call) instead of a fresh interpreter per task."),
        click.option("--prefetch/--no-prefetch", default=True, show_default=True,
                     help="While tasks are short (under 0.1s on average), hold up to two "
                          "claimed tasks per running one, to start them the moment a slot "
                          "frees (held ones go back to the queue after 2s)."),
        click.option("--pool-max-tasks", type=click.IntRange(min=1), default=1000,
                     show_default=True,
                     help="Replace a warm interpreter after this many calls."),
        click.option("--pool-max-rss", default="512M", show_default=True,
                     help="Replace a warm interpreter whose memory exceeds this after a "
                          "call (a leak, or memory its allocator keeps)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _worker_config(ctx: Ctx, name: str | None, cpus: int | None, memory: str | None,
                   gpus: str | None, max_tasks: int | None, log_dir: str | None,
                   heartbeat: str, lease: str, reserve: str | None, low_water: str | None,
                   high_water: str | None, victim_policy: str,
                   max_preempts: int, admission: str, horizon: str,
                   resources: tuple[str, ...], pin: bool, probation: str,
                   allow_pickle: bool | None = None, pythonpath: tuple[str, ...] = (),
                   result_max_bytes: str = "1M", result_dir: str | None = None,
                   python_pool: bool = True, pool_max_tasks: int = 1000,
                   pool_max_rss: str = "512M", prefetch: bool = True) -> WorkerConfig:
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
        reserve=parse_size(reserve, "reserve") if reserve else None,
        low_water=parse_size(low_water, "low-water") if low_water else None,
        high_water=parse_size(high_water, "high-water") if high_water else None,
        victim_policy=victim_policy,
        max_preempts=max_preempts,
        probation=parse_duration(probation, "probation"),
        horizon=parse_duration(horizon, "horizon"),
        growth_aware=admission == "growth",
        pin=pin,
        resources=_parse_resources(resources),
        allow_pickle=(allow_pickle if allow_pickle is not None
                      else ctx.client.url.startswith("unix://")),
        pythonpath=[str(Path(p).absolute()) for p in pythonpath],
        result_max_bytes=parse_size(result_max_bytes, "result-max-bytes"),
        result_dir=Path(result_dir).absolute() if result_dir else None,
        python_pool=python_pool,
        prefetch=prefetch,
        pool_max_tasks=pool_max_tasks,
        pool_max_rss=parse_size(pool_max_rss, "pool-max-rss"),
        history=load_history(ctx.state_dir, ctx.queue),
    )


def _parse_resources(items: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, count = item.partition("=")
        if not sep or not name or not count.isdigit():
            raise ValueError(f"--resource {item!r}: write NAME=COUNT, e.g. license=2")
        out[name] = int(count)
    return out


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
        # A line repeated in the file names the same task: count it once.
        rows = client.task_rows(task_ids=list(dict.fromkeys(result.task_ids)))
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

    from rich.console import RenderableType

    from .watch import Sampler, render

    sampler = Sampler(client, job_ids)
    compact: list[RenderableType] = []  # the compact `watch` view: per-job rate and ETA
    last_view = 0.0

    class _WithJobs(Progress):
        def get_renderables(self) -> Iterator[RenderableType]:
            yield self.make_tasks_table(self.tasks)
            yield from compact

    thread = threading.Thread(target=target, name="distcomp-worker", daemon=True)
    progress = _WithJobs(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                         TextColumn("{task.fields[counts]}"), TimeRemainingColumn(),
                         console=err_console, disable=not show, transient=False)
    thread.start()
    with progress:
        bar = progress.add_task("run", total=None, counts="")
        while not finished.is_set():
            try:
                if show and time.monotonic() - last_view >= 1.0:
                    compact[:] = [render(sampler.snapshot(), compact=True)]
                    last_view = time.monotonic()
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
        if limit is None or len(rows) < limit:
            _note_trimmed(ctx, jobs)
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
    with friendly_errors(), _explain_trimmed(ctx, [task_id]):
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
        _note_trimmed(ctx, jobs)
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
    with friendly_errors(), _explain_trimmed(ctx, ids, "it can no longer be retried; "
                                             "submit it again with --allow-duplicates"):
        n = ctx.client.retry(ids, include_cancelled=cancelled, reason=reason)
    console.print(f"{n} tasks requeued")


@main.command()
@click.argument("ids", nargs=-1, required=True)
@pass_ctx
def cancel(ctx: Ctx, ids: tuple[str, ...]) -> None:
    """Cancel tasks (JOB.N) or whole jobs (JOB); running ones are killed."""
    with friendly_errors(), _explain_trimmed(ctx, ids):
        n = ctx.client.cancel(ids)
    console.print(f"{n} tasks cancelled")


# -- the managed server --------------------------------------------------------

@main.group()
def server() -> None:
    """The Redis server distcomp manages in the state directory.

    Without --bind/--port: the embedded server (unix socket only, for this
    machine). With them: a head-node server other machines can reach, with a
    password (generated if not given), optional TLS and an ACL user.
    """


@server.command("start")
@click.option("--bind", metavar="ADDR",
              help="Head-node server: listen on these addresses (e.g. 0.0.0.0, or "
                   "'10.0.0.1 127.0.0.1'). Beyond loopback a password is required.")
@click.option("--port", type=click.IntRange(1, 65535),
              help="Head-node server: TCP (or TLS) port. Default 6379.")
@click.option("--password", envvar="DISTCOMP_SERVER_PASSWORD", metavar="PW",
              help="Password of the default user (env DISTCOMP_SERVER_PASSWORD). Default: "
                   "the stored one, else a generated one, kept 0600 in STATE_DIR/head.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the password from this file (keeps it off the command line).")
@click.option("--no-password", is_flag=True,
              help="No password at all; refused unless every --bind address is loopback.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the AOF lives. Default: STATE_DIR/head/data.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="Serve TLS only (rediss://) with this certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="Private key of --tls-cert (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
              help="CA that signed --tls-cert; put into the URL so clients verify the server.")
@click.option("--user", "acl_user", metavar="NAME",
              help="Also create an ACL user limited to distcomp's keys and channels (its "
                   "password is generated); `server url` then gives workers this user.")
@click.option("--advertise", metavar="HOST",
              help="Host name workers use to reach this server (default: from --bind, "
                   "else this machine's hostname).")
@click.option("--foreground", is_flag=True,
              help="Head-node server: run in the foreground (systemd, Slurm, containers).")
@click.option("--appendfsync", type=click.Choice(["everysec", "always"]), default="everysec",
              show_default=True, help="AOF fsync policy ('always' loses nothing on power loss).")
@pass_ctx
def server_start(ctx: Ctx, bind: str | None, port: int | None, password: str | None,
                 password_file: str | None, no_password: bool, data_dir: str | None,
                 tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
                 acl_user: str | None, advertise: str | None, foreground: bool,
                 appendfsync: str) -> None:
    """Start the server (a no-op if it runs); prints its URL (password masked).

    \b
      distcomp server start                          # embedded, this machine only
      distcomp server start --bind 0.0.0.0           # head node, password generated
      distcomp server url --show-password            # the URL for workers
    """
    # Imported here so this section stays self-contained within cli.py.
    from .server import HeadServer, HeadSettings, exec_head, start_head, stored_or_new_password

    head_mode = any(v is not None for v in (bind, port, tls_cert, tls_key, tls_ca))
    head_only = [flag for flag, value in (
        ("--password", password), ("--password-file", password_file),
        ("--no-password", no_password), ("--data-dir", data_dir), ("--user", acl_user),
        ("--advertise", advertise), ("--foreground", foreground)) if value]
    if not head_mode:
        if head_only:
            fail(f"{', '.join(head_only)} configure the head-node server: add --bind ADDR "
                 "(and --port); the embedded server listens on a unix socket only",
                 EXIT_BAD_INPUT)
        with friendly_errors():
            url = ensure_embedded(ctx.state_dir, appendfsync=appendfsync)
        console.print(url)
        return
    if no_password and (password or password_file):
        fail("--no-password contradicts --password/--password-file", EXIT_BAD_INPUT)
    with friendly_errors():
        if password_file:
            password = Path(password_file).read_text().strip()
        if not password and not no_password:
            password = stored_or_new_password(ctx.state_dir)
        settings = HeadSettings(
            bind=bind or "127.0.0.1", port=port or 6379, password=password or None,
            data_dir=Path(data_dir) if data_dir else None,
            tls_cert=Path(tls_cert) if tls_cert else None,
            tls_key=Path(tls_key) if tls_key else None,
            tls_ca=Path(tls_ca) if tls_ca else None, user=acl_user, advertise=advertise,
            appendfsync=appendfsync)

        def announce(head: HeadServer) -> None:
            err_console.print(f"head-node server in the foreground: {head.url()}; "
                              "`distcomp server url --show-password` prints the full URL")

        if foreground:
            exec_head(ctx.state_dir, settings, announce)
        head, started = start_head(ctx.state_dir, settings)
    console.print(head.url(), soft_wrap=True)
    err_console.print(
        f"{'started' if started else 'already running'}: head-node server on "
        f"{head.bind} port {head.port}{' (TLS)' if head.tls else ''}, Redis {head.version}. "
        "Workers and submitters need the full URL: `distcomp server url --show-password`"
        + ("" if head.password else "; no password: loopback only"))


@server.command("stop")
@pass_ctx
def server_stop(ctx: Ctx) -> None:
    """Stop the head-node server and the embedded one (their AOF keeps every task)."""
    from .server import load_head, stop_head

    with friendly_errors():
        head = load_head(ctx.state_dir)
        head_stopped = stop_head(ctx.state_dir) if head is not None else False
        stopped = stop_embedded(ctx.state_dir)
    if head is None:
        console.print("stopped" if stopped else "not running")
        return
    console.print(f"{'stopped' if head_stopped else 'not running'}: head-node server "
                  f"{head.url()}", soft_wrap=True)
    if stopped:
        console.print("stopped: embedded server")


@server.command("status")
@json_option
@pass_ctx
def server_status(ctx: Ctx, as_json: bool) -> None:
    """Is the server running, and where (passwords masked). Exit 3 if not running."""
    from .server import load_head

    paths = embedded_paths(ctx.state_dir)
    running = embedded_running(ctx.state_dir)
    with friendly_errors():
        head = load_head(ctx.state_dir)
    if head is None:
        if as_json:
            console.print_json(json.dumps({"running": running, "url": paths.url,
                                           "state_dir": str(paths.state_dir)}))
        else:
            console.print(f"{'running' if running else 'not running'}: {paths.url}")
        if not running:
            sys.exit(EXIT_UNREACHABLE)
        return
    head_running = head.running()
    info = head.describe()
    if as_json:
        console.print_json(json.dumps({
            "running": head_running, "url": info["url"], "state_dir": str(paths.state_dir),
            "head": {**info, "running": head_running},
            "embedded": {"running": running, "url": paths.url}}))
    else:
        console.print(f"{'running' if head_running else 'not running'}: head-node server "
                      f"{info['url']}", soft_wrap=True)
        console.print(f"  bind {head.bind}, port {head.port}, TLS {'on' if head.tls else 'off'}"
                      f", ACL user {head.user or '-'}, Redis {head.version or '?'}"
                      f"{', pid ' + str(info['pid']) if head_running and info['pid'] else ''}")
        console.print(f"  data {head.data_dir}; log {info['log']}", soft_wrap=True)
        if running:
            console.print(f"running: embedded server {paths.url}", soft_wrap=True)
    if not head_running:
        sys.exit(EXIT_UNREACHABLE)


@server.command("url")
@click.option("--show-password", is_flag=True, help="Print the password instead of ****.")
@click.option("--admin", is_flag=True,
              help="The default (admin) user's URL even when an ACL user exists.")
@click.option("--host", metavar="HOST", help="Host name to put in the URL.")
@pass_ctx
def server_url(ctx: Ctx, show_password: bool, admin: bool, host: str | None) -> None:
    """The URL workers and submitters should use (password masked unless asked).

    \b
      export DISTCOMP_REDIS=$(distcomp server url --show-password)
    """
    from .config import mask_url
    from .server import load_head

    with friendly_errors():
        head = load_head(ctx.state_dir)
    if head is not None:
        console.print(head.url(host=host, show_password=show_password, admin=admin),
                      soft_wrap=True)
    elif ctx.redis_url:
        console.print(ctx.redis_url if show_password else mask_url(ctx.redis_url),
                      soft_wrap=True)
    else:
        console.print(embedded_paths(ctx.state_dir).url, soft_wrap=True)
        err_console.print("this is the embedded server: reachable from this machine only. "
                          "For other machines: distcomp server start --bind ADDR")


# -- many hosts: up / down -------------------------------------------------------

_SSH_FLAGS: list[Callable[[F], F]] = [
    click.option("--ssh-option", "ssh_options", multiple=True, metavar="OPT",
                 help="Extra `ssh -o` option (repeatable), e.g. IdentityFile=~/.ssh/lab."),
    click.option("--connect-timeout", type=click.IntRange(1, 600), default=10,
                 show_default=True, help="Seconds to wait for each host's SSH connection."),
    click.option("--remote-dir", metavar="DIR",
                 help="On each host: pidfiles and logs (DIR/up/NAME.log) and task logs. "
                      "Default ~/.distcomp (relative paths: from the remote home)."),
    json_option,
]


def ssh_flags(func: F) -> F:
    for option in reversed(_SSH_FLAGS):
        func = option(func)
    return func


def _cluster_url(ctx: Ctx) -> str:
    """The URL remote workers get: --redis / env / distcomp.toml, else this state
    directory's head-node server (with its password)."""
    from .server import load_head

    url = ctx.redis_url
    if not url:
        head = load_head(ctx.state_dir)
        if head is not None:
            url = head.url(show_password=True)
    if not url:
        fail("distcomp up needs a Redis server the hosts can reach: start one here with "
             "`distcomp server start --bind 0.0.0.0`, or pass --redis URL (or set "
             "DISTCOMP_REDIS / distcomp.toml)", EXIT_BAD_INPUT)
    if url.startswith("unix:"):
        fail(f"{url} is a unix socket, which other hosts cannot reach: start a head-node "
             "server (distcomp server start --bind ADDR) and use its URL", EXIT_BAD_INPUT)
    return url


def _host_results(results: Sequence[Any], as_json: bool, title: str) -> None:
    if as_json:
        console.print_json(json.dumps([
            {"host": r.host.label, "ok": r.ok, "status": r.status, "workers": r.workers,
             "detail": r.detail, "version": r.version} for r in results]))
    else:
        table = Table("host", "workers", "status", "detail", title=title)
        for r in results:
            table.add_row(Text(r.host.label), Text(", ".join(r.workers) or "-"),
                          Text(r.status, style="green" if r.ok else "bold red"),
                          Text(r.detail))
        console.print(table)
    failed = [r for r in results if not r.ok]
    if failed:
        err_console.print(f"{len(failed)} of {len(results)} hosts failed")
        sys.exit(EXIT_FAILED)


@main.command()
@click.option("--hosts", "hosts_file", required=True, type=click.Path(dir_okay=False),
              help="Host file: one [user@]host[:port] per line, then optional workers=N "
                   "memory=16G cpus=8 gpus=0,1 python=PATH name=NAME; # comments.")
@click.option("--python", default="python3", show_default=True,
              help="Python with distcomp installed on the hosts (e.g. a venv on a shared "
                   "file system); python= in the host file wins.")
@click.option("--workers-per-host", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Workers per host (named HOST-1, HOST-2...); give each --cpus/--memory.")
@click.option("--memory", help="--memory for each worker, e.g. 16G (default: the host's).")
@click.option("--cpus", type=click.IntRange(1), help="--cpus for each worker.")
@click.option("--gpus", help="--gpus for each worker, e.g. 0,1.")
@click.option("--cwd", "work_dir", metavar="DIR",
              help="Working directory of the workers and their tasks (default: the remote "
                   "home; on a shared file system, e.g. --cwd \"$PWD\").")
@click.option("--worker-arg", "worker_args", multiple=True, metavar="ARG",
              help="Extra argument for `distcomp worker` (repeatable), e.g. "
                   "--worker-arg=--heartbeat=2s.")
@click.option("--wait", "register_wait", default="30s", show_default=True,
              help="How long to wait for started workers to register with Redis.")
@ssh_flags
@pass_ctx
def up(ctx: Ctx, /, hosts_file: str, python: str, workers_per_host: int, memory: str | None,
       cpus: int | None, gpus: str | None, work_dir: str | None, worker_args: tuple[str, ...],
       register_wait: str, ssh_options: tuple[str, ...], connect_timeout: int,
       remote_dir: str | None, as_json: bool) -> None:
    """Start workers on every host of a host file over SSH, in parallel.

    Idempotent: a worker already running on a host is left alone, so run it
    again after adding hosts. Workers are detached (they survive the SSH
    session) and log to REMOTE_DIR/up/NAME.log on their host. Exits 1 if
    any host failed; the table says why.
    """
    from .cluster import DEFAULT_REMOTE_DIR, UpOptions, remember_up
    from .cluster import up as cluster_up
    from .hostfile import read_hosts

    with friendly_errors():
        hosts = read_hosts(hosts_file)
        if memory:
            parse_size(memory, "memory")
        if gpus:
            parse_gpu_list(gpus)
        url = _cluster_url(ctx)
        client = Client(url, ctx.queue, ctx.state_dir)
        client.store.ping()  # no point starting workers that cannot reach Redis
        options = UpOptions(
            redis_url=url, queue=ctx.queue, python=python, workers_per_host=workers_per_host,
            memory=memory, cpus=cpus, gpus=gpus, remote_dir=remote_dir or DEFAULT_REMOTE_DIR,
            cwd=work_dir, ssh_options=list(ssh_options), connect_timeout=connect_timeout,
            worker_args=list(worker_args),
            register_timeout=parse_duration(register_wait, "wait"))
        results = cluster_up(hosts, options, workers=client.workers)
        remember_up(state_dir_path(ctx.state_dir), results, options)
    _host_results(results, as_json, f"distcomp up: queue {ctx.queue}")


@main.command()
@click.option("--hosts", "hosts_file", type=click.Path(dir_okay=False),
              help="Host file (default: the hosts `distcomp up` started from this state dir).")
@click.option("--drain", is_flag=True,
              help="Let running tasks finish first (SIGUSR1) instead of requeuing them "
                   "(SIGTERM).")
@click.option("--wait", "wait_for", default=None,
              help="How long to wait for workers to exit (default 30s; 0 with --drain).")
@click.option("--workers-per-host", type=click.IntRange(1, 64), default=1, show_default=True,
              help="As given to `up` (host file workers= wins).")
@ssh_flags
@pass_ctx
def down(ctx: Ctx, /, hosts_file: str | None, drain: bool, wait_for: str | None,
         workers_per_host: int, ssh_options: tuple[str, ...], connect_timeout: int,
         remote_dir: str | None, as_json: bool) -> None:
    """Stop the workers `distcomp up` started.

    SIGTERM: each worker stops its running tasks and puts them back in the
    queue. --drain: each worker finishes its running tasks, then exits.
    """
    from .cluster import DEFAULT_REMOTE_DIR, forget_down, load_record
    from .cluster import down as cluster_down
    from .hostfile import Host, read_hosts

    state = state_dir_path(ctx.state_dir)
    with friendly_errors():
        record = load_record(state)
        if hosts_file:
            hosts = read_hosts(hosts_file)
        else:
            hosts = [Host.from_dict(h) for h in record.get("hosts", [])]
            if not hosts:
                fail(f"no hosts recorded in {state} by `distcomp up`: pass --hosts FILE",
                     EXIT_BAD_INPUT)
        wait = parse_duration(wait_for, "wait") if wait_for else (0.0 if drain else 30.0)
        results = cluster_down(
            hosts, remote_dir=remote_dir or record.get("remote_dir") or DEFAULT_REMOTE_DIR,
            workers_per_host=workers_per_host,
            ssh_options=list(ssh_options) or list(record.get("ssh_options", [])),
            connect_timeout=connect_timeout, drain=drain, wait=wait)
        forget_down(state, results)
    _host_results(results, as_json, "distcomp down" + (" --drain" if drain else ""))


# -- history -------------------------------------------------------------------

@contextmanager
def _explain_trimmed(ctx: Ctx, ids: Sequence[str], hint: str = "") -> Iterator[None]:
    """Turn "no task X" into "task X was archived (or expired), see ..." when history
    trimming removed it (two reads, only on the error path)."""
    try:
        yield
    except NotFoundError:
        for tid in ids:
            gone = ctx.client.store.trimmed_task(tid) if "." in tid else None
            if gone is not None:
                raise NotFoundError(gone.describe(hint)) from None
        raise


def _note_trimmed(ctx: Ctx, job_ids: Sequence[str] | None) -> None:
    """Say on stderr how many tasks of these jobs are no longer in Redis, and where
    they went (O(jobs) reads), so a short listing is not mistaken for lost tasks."""
    store = ctx.client.store
    per_job = store.job_trimmed(list(job_ids) if job_ids else store.job_ids())
    n = sum(count for count, _ in per_job.values())
    if n:
        labels = sorted({label for count, label in per_job.values() if count and label})
        where = f"archived to {', '.join(labels)}" if labels else "expired"
        err_console.print(f"[dim]{n} finished tasks are not listed: history trimming removed "
                          f"them from Redis ({where}); `distcomp history show TASK` prints an "
                          "archived one[/]")


@main.group()
def history() -> None:
    """Finished tasks' records: how long they stay in Redis, and the archive.

    Policy: a [history] table in distcomp.toml: mode = "archive" (default; records
    are appended to the archive file, then leave Redis), "expire" (they just leave)
    or "off"; keep = "7d" (succeeded tasks); keep_failed = "never" (failed and
    cancelled tasks: once removed they cannot be retried); archive = PATH (default
    STATE_DIR/history/QUEUE.jsonl). Counters in `status` always count every task.
    """


def _history_policy(ctx: Ctx, mode: str | None = None, archive: str | None = None,
                    older_than: str | None = None, failed_older_than: str | None = None,
                    ) -> HistorySettings:
    """The policy from distcomp.toml, with this command's options over it."""
    from .config import history_duration, load_history

    with friendly_errors():
        policy = load_history(ctx.state_dir, ctx.queue)
        changes: dict[str, Any] = {}
        if mode:
            changes["mode"] = mode
        if archive:
            changes["archive"] = Path(archive).expanduser().absolute()
        if older_than:
            changes["keep_s"] = history_duration(older_than, "--older-than")
        if failed_older_than:
            changes["keep_failed_s"] = (None if failed_older_than == "never" else
                                        history_duration(failed_older_than,
                                                         "--failed-older-than"))
    return replace(policy, **changes)


def _policy_states(policy: HistorySettings) -> list[tuple[str, float]]:
    out = [("succeeded", policy.keep_s)]
    if policy.keep_failed_s is not None:
        out += [("failed", policy.keep_failed_s), ("cancelled", policy.keep_failed_s)]
    return out


def _policy_text(policy: HistorySettings) -> str:
    failed = ("kept until retried" if policy.keep_failed_s is None
              else f"after {_duration(policy.keep_failed_s)}")
    where = {"archive": f"archived to {policy.archive}", "expire": "expire (no archive)",
             "off": "stay in Redis (history.mode = \"off\")"}[policy.mode]
    return (f"succeeded tasks leave Redis {_duration(policy.keep_s)} after finishing, "
            f"failed/cancelled ones {failed}; records {where} [from {policy.source}]")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@history.command("trim")
@click.option("--older-than", metavar="DURATION",
              help="Remove succeeded tasks that finished at least this long ago, e.g. 7d "
                   "(default: history.keep, else 7d).")
@click.option("--failed-older-than", metavar="DURATION",
              help="Also failed and cancelled tasks this old, or 'never' (default: "
                   "history.keep_failed, else never). Removed tasks cannot be retried.")
@click.option("--mode", type=click.Choice(["archive", "expire"]),
              help="archive: append records to the archive file first; expire: just remove "
                   "(default: history.mode, else archive).")
@click.option("--archive", "archive_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Archive file (default: history.archive, else STATE_DIR/history/QUEUE.jsonl).")
@click.option("--batch", type=click.IntRange(1, 10000), default=1000, show_default=True,
              help="Tasks per step (one lock, one file append, one script call).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@json_option
@pass_ctx
def history_trim(ctx: Ctx, older_than: str | None, failed_older_than: str | None,
                 mode: str | None, archive_path: str | None, batch: int, dry_run: bool,
                 as_json: bool) -> None:
    """Remove old finished tasks from Redis now (what workers do every minute)."""
    policy = _history_policy(ctx, mode, archive_path, older_than, failed_older_than)
    if policy.mode == "off":
        err_console.print(f"history.mode is \"off\" in {policy.source}: nothing removed; "
                          "pass --mode archive or --mode expire to trim anyway")
        return
    with friendly_errors():
        if dry_run:
            due = {s: ctx.client.store.history_due([s], age)[s]
                   for s, age in _policy_states(policy)}
            _trim_output(policy, due, as_json, dry_run=True)
            return
        removed = _trim_all(ctx, policy, batch)
    _trim_output(policy, removed, as_json, dry_run=False)


def _trim_all(ctx: Ctx, policy: HistorySettings, batch: int) -> dict[str, int]:
    """Policy passes until nothing old is left; waits (up to ~10 s) while another
    process holds the trimming lock."""
    from .history import trim

    removed: dict[str, int] = {}
    busy_waits = 0
    while True:
        try:
            report = trim(ctx.client.store, policy, limit=batch)
        except OSError as exc:
            fail(f"cannot write the archive {policy.archive}: {exc.strerror or exc}; nothing "
                 "was removed. Choose a writable file with --archive (or history.archive in "
                 "distcomp.toml)", EXIT_BAD_INPUT)
        for state, n in report.removed.items():
            removed[state] = removed.get(state, 0) + n
        if report.busy:
            busy_waits += 1
            if busy_waits > 20:
                fail("another process is trimming this queue's history (lock:history is "
                     "held); try again in a minute", EXIT_FAILED)
            time.sleep(0.5)
        elif not any(n >= batch for n in report.removed.values()):
            return removed


def _trim_output(policy: HistorySettings, counts: dict[str, int], as_json: bool, *,
                 dry_run: bool) -> None:
    archive = str(policy.archive) if policy.mode == "archive" else None
    if as_json:
        console.print_json(json.dumps({"dry_run": dry_run, "mode": policy.mode,
                                       "archive": archive, "removed": counts}))
        return
    total = sum(counts.values())
    parts = ", ".join(f"{n} {s}" for s, n in counts.items())
    verb = "would remove" if dry_run else "removed"
    if archive:
        where = f"records {'go' if dry_run else 'appended'} to {archive}"
    else:
        where = "expired, no archive kept"
    console.print(f"{verb} {total} finished tasks from Redis ({parts}); {where}")
    if not dry_run:
        console.print("counters are unchanged: `distcomp status` still counts every task")


@history.command("status")
@json_option
@pass_ctx
def history_status(ctx: Ctx, as_json: bool) -> None:
    """The policy in effect, finished tasks still in Redis and trimmed, and what is due."""
    policy = _history_policy(ctx)
    with friendly_errors():
        counts = ctx.client.store.history_counts()
        due = {s: ctx.client.store.history_due([s], age)[s] for s, age in _policy_states(policy)}
    size = policy.archive.stat().st_size if policy.archive.is_file() else None
    if as_json:
        console.print_json(json.dumps({
            "mode": policy.mode, "keep_s": policy.keep_s, "keep_failed_s": policy.keep_failed_s,
            "archive": str(policy.archive), "archive_bytes": size, "source": policy.source,
            "counts": counts, "due": due}))
        return
    console.print(_policy_text(policy))
    table = Table("state", "in Redis", "trimmed", "due now", title=f"queue {ctx.queue} history")
    for state, row in counts.items():
        table.add_row(state, str(row["kept"]), str(row["trimmed"]),
                      str(due[state]) if state in due else "-")
    console.print(table)
    if policy.mode == "archive":
        console.print(f"archive {policy.archive}: "
                      + ("not written yet" if size is None else format_size(size)))


@history.command("show")
@click.argument("task_id")
@click.option("--archive", "archive_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Archive file to read (default: where the task's job was archived, "
                   "else history.archive).")
@pass_ctx
def history_show(ctx: Ctx, task_id: str, archive_path: str | None) -> None:
    """Print the archived record of a task (JSON; reads the whole archive file)."""
    from .history import find_in_archive

    with friendly_errors():
        gone = ctx.client.store.trimmed_task(task_id)
        path = _archive_for(ctx, gone.archive if gone else "", archive_path)
        if not path.is_file():
            raise NotFoundError(f"archive file {path} does not exist on this machine"
                                + (f" (the task went to {gone.archive})" if gone else "")
                                + "; name the file with --archive")
        records = find_in_archive(path, task_id, ctx.queue)
        if not records:
            raise NotFoundError(f"no record of task {task_id} (queue {ctx.queue!r}) in {path}")
    console.print_json(json.dumps(records[-1]))


def _archive_for(ctx: Ctx, label: str, given: str | None) -> Path:
    """The file to read: the option, else the path in the job's archive label (when it
    was written on this host or is visible here), else the policy's archive."""
    if given:
        return Path(given).expanduser()
    if label:
        host, _, path = label.partition(":")
        if host == socket.gethostname() or Path(path).is_file():
            return Path(path)
    return _history_policy(ctx).archive


# -- watching ------------------------------------------------------------------

@main.command()
@click.argument("jobs", nargs=-1)
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print the view once and exit.")
@pass_ctx
def watch(ctx: Ctx, jobs: tuple[str, ...], interval: float, once: bool) -> None:
    """Live view: progress and ETA per job, workers, latest failures (O(1) per refresh)."""
    from .watch import watch as run_watch

    with friendly_errors():
        for jid in jobs:
            ctx.client.job(jid)
        run_watch(ctx.client, list(jobs) or None, interval=interval, once=once,
                  console=console)


@main.command()
@pass_ctx
def metrics(ctx: Ctx) -> None:
    """Print the queue's metrics once, in Prometheus text format."""
    from .metrics import render_metrics
    from .watch import Sampler

    with friendly_errors():
        text = render_metrics(Sampler(ctx.client).snapshot(), ctx.queue)
    sys.stdout.write(text)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Keep loopback; reach it through an SSH tunnel.")
@click.option("--port", type=click.IntRange(0, 65535), default=8265, show_default=True)
@pass_ctx
def dashboard(ctx: Ctx, host: str, port: int) -> None:
    """Web dashboard and /metrics (needs the extra: pip install 'distcomp[dashboard]').

    Anyone who can reach it can retry and cancel tasks: it acts with the queue's own
    Redis credentials. From your laptop: ssh -L 8265:127.0.0.1:8265 HEAD, then open
    http://127.0.0.1:8265/.
    """
    try:
        from .dashboard import serve
    except ImportError as exc:
        fail(f"the dashboard needs extra packages ({exc}): pip install 'distcomp[dashboard]'",
             EXIT_BAD_INPUT)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/] binding {host}: anyone who reaches this port "
                          "can retry and cancel tasks. Prefer 127.0.0.1 and an SSH tunnel.")
    with friendly_errors():
        ctx.client.store.ping()
        err_console.print(f"dashboard on http://{host}:{port}/  (from another machine: "
                          f"ssh -L {port}:127.0.0.1:{port} THIS_HOST)")
        serve(ctx.client, host=host, port=port)


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
