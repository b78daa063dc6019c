"""Scale model: what one Redis can carry.

Two parts, each against its own private redis-server (see :mod:`benchmarks.common`):

1. **Unit costs.** ``CONFIG RESETSTAT``, then for N tasks: submit (batches of
   500), claim (batches of 8; then again for N new tasks, claims of 1) and
   complete, with one registered worker renewing every 100 tasks; then N
   heartbeats (``renew`` with 8 leases, then 64); N reap attempts that find the
   lock taken; then status queries (what ``distcomp status`` reads: ``counts`` +
   ``jobs`` + ``workers``), with 1 and with 1,000 registered workers. Around
   every phase the benchmark reads ``INFO commandstats``, ``INFO cpu`` (server
   ``used_cpu_sys + used_cpu_user``), ``INFO memory`` (``used_memory``) and
   ``INFO stats`` (net in/out bytes) and reports, per task / heartbeat / query: EVALSHA calls, the
   commands run inside the scripts, server CPU microseconds, EVALSHA usec, bytes
   on the wire and bytes of memory kept.

2. **Simulation.** W simulated workers (default 1,000; ``--quick``: 100), each
   with its own name and instance, a capacity of 4 slots, a heartbeat (renew of
   all its leases, then a reap attempt, as the worker does) every 5 s and a 30 s
   lease, run a claim loop against one
   Redis holding enough 1-second tasks to keep every slot busy. A worker "runs"
   a task by sleeping 1 s, then completes it. No processes are started for
   tasks. The workers live as asyncio coroutines (redis.asyncio, with hiredis
   when installed) in a few client processes; they load the very same Lua text
   the sync Store loads (``_prelude.lua`` + ``<name>.lua``), read-only. Reported
   over a steady window (after a warm-up): completions/s, claim latency p50/p99
   (client side, and EVALSHA usec per claim on the server), Redis CPU
   utilisation (server CPU seconds / wall) and the simulator's own CPU, which
   competes with Redis for the same cores.

``python -m benchmarks.scale [--quick] [--json PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psutil
import redis

from distcomp.spec import GIB, MIB, TaskSpec
from distcomp.store import Claim, Store

from .common import (
    RedisServer,
    environment,
    note,
    percentile,
    print_table,
    redis_server,
    redis_server_binary,
    redis_server_version,
    write_json,
)

QUEUE = "scale"
WORKER = "scale-worker"
INSTANCE = "scale-instance"
LEASE_MS = 30_000
SUBMIT_BATCH = 500
CLAIM_BATCH = 8
#: Claim sizes of the lifecycle runs: 8 tasks per claim, and the worst case of 1.
CLAIM_BATCHES = (8, 1)
RENEW_EVERY = 100
HEARTBEAT_LEASES = (8, 64)
STATUS_QUERIES = 200
STATUS_WORKERS = 1_000

#: Commands that are the client's own (the script call itself, bookkeeping), not
#: work a script does inside Redis. INFO is not among them: the snapshots' own INFO
#: calls are subtracted, and the rest are the scripts' (restart_time runs INFO server).
_CLIENT_COMMANDS = frozenset({"evalsha", "eval", "script", "config", "ping", "client",
                              "hello", "auth", "select"})

#: The result a worker reports for a successful shell task (same fields as the worker's).
RESULT: dict[str, Any] = {
    "exit_code": 0, "signal": "", "wall": "1.000", "peak_rss": 3_145_728,
    "host": "node-001", "out_tail": "", "err_tail": "",
    "out_path": "/tmp/distcomp/out/1.1.out", "err_path": "/tmp/distcomp/out/1.1.err",
    "started_wall": "1790000000.000",
}


def _flatten(mapping: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for key, value in mapping.items():
        out += [key, value]
    return out


def spec_for(index: int) -> TaskSpec:
    return TaskSpec(cmd=f"sleep 1  # task {index}", mem=256 * MIB, cpus=1)


# --------------------------------------------------------------------------- part 1


@dataclass
class Snapshot:
    """What the server says about itself at one instant."""

    commands: dict[str, tuple[int, int]]  # name -> (calls, usec)
    cpu_s: float
    used_memory: int
    net_in: int
    net_out: int

    @classmethod
    def take(cls, client: redis.Redis) -> Snapshot:
        raw: dict[str, Any] = client.info("commandstats")
        commands = {key.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                    for key, v in raw.items()}
        cpu: dict[str, Any] = client.info("cpu")
        mem: dict[str, Any] = client.info("memory")
        stats: dict[str, Any] = client.info("stats")
        return cls(commands=commands,
                   cpu_s=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                   used_memory=int(mem["used_memory"]),
                   net_in=int(stats["total_net_input_bytes"]),
                   net_out=int(stats["total_net_output_bytes"]))


@dataclass
class UnitCost:
    """Cost of one operation (a task's life, a heartbeat, a status query), averaged."""

    name: str
    count: int
    evalsha: float = 0.0
    inside: float = 0.0
    other: float = 0.0
    cpu_us: float = 0.0
    evalsha_us: float = 0.0
    net_in: float = 0.0
    net_out: float = 0.0
    memory: float = 0.0
    breakdown: dict[str, float] = field(default_factory=dict)

    @classmethod
    def between(cls, name: str, count: int, before: Snapshot, after: Snapshot,
                *, own_infos: int = 4) -> UnitCost:
        """``own_infos``: INFO calls the snapshot itself made (taken out of the counts)."""
        delta: dict[str, tuple[int, int]] = {}
        for cmd, (calls, usec) in after.commands.items():
            c0, u0 = before.commands.get(cmd, (0, 0))
            if cmd == "info":
                calls -= own_infos
            if calls != c0:
                delta[cmd] = (calls - c0, usec - u0)
        evalsha_calls, evalsha_usec = delta.get("evalsha", (0, 0))
        inside = {cmd: calls for cmd, (calls, _) in delta.items()
                  if cmd not in _CLIENT_COMMANDS}
        return cls(
            name=name, count=count,
            evalsha=evalsha_calls / count,
            inside=sum(inside.values()) / count if evalsha_calls else 0.0,
            other=0.0 if evalsha_calls else sum(inside.values()) / count,
            cpu_us=(after.cpu_s - before.cpu_s) * 1e6 / count,
            evalsha_us=evalsha_usec / count,
            net_in=(after.net_in - before.net_in) / count,
            net_out=(after.net_out - before.net_out) / count,
            memory=(after.used_memory - before.used_memory) / count,
            breakdown={cmd: calls / count
                       for cmd, calls in sorted(inside.items(), key=lambda kv: -kv[1])},
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _status_query(store: Store) -> None:
    """What ``distcomp status`` reads."""
    store.counts()
    store.jobs()
    store.workers()


def unit_costs(n_tasks: int) -> dict[str, Any]:
    """Part 1: per-operation cost, from server counters around each phase."""
    with redis_server() as server:
        store = Store(server.url, QUEUE)
        admin = server.client()
        try:
            return _unit_costs(server, store, admin, n_tasks)
        finally:
            admin.close()
            store.close()


def _lifecycle(store: Store, admin: redis.Redis, offset: int, n_tasks: int,
               batch: int) -> tuple[UnitCost, list[UnitCost]]:
    """submit -> claim (``batch`` at a time, renew every RENEW_EVERY tasks) -> complete
    of ``n_tasks`` new tasks; the cost of each phase and of the whole life."""
    specs = [spec_for(offset + i) for i in range(n_tasks)]
    s0 = Snapshot.take(admin)
    for i in range(0, n_tasks, SUBMIT_BATCH):
        store.submit(specs[i:i + SUBMIT_BATCH], job_name=f"scale-{offset + i}")
    s1 = Snapshot.take(admin)
    claims: list[Claim] = []
    renews = 0
    while len(claims) < n_tasks:
        got = store.claim(WORKER, INSTANCE, free_mem=64 * GIB, free_cpus=batch,
                          free_gpus=0, max_count=batch, lease_ms=LEASE_MS)
        if not got:
            raise RuntimeError(f"claim returned nothing after {len(claims)} of {n_tasks}")
        claims += got  # completed in the next phase, so each phase is measured alone
        if len(claims) // RENEW_EVERY > renews:
            renews += 1
            store.renew(WORKER, INSTANCE, [], lease_ms=LEASE_MS, info={"load": 1.0})
    s2 = Snapshot.take(admin)
    for c in claims:
        if not store.complete(c.task_id, c.token, RESULT):
            raise RuntimeError(f"complete of {c.task_id} was rejected as stale")
    s3 = Snapshot.take(admin)
    phases = [UnitCost.between(f"submit (batches of {SUBMIT_BATCH})", n_tasks, s0, s1),
              UnitCost.between(f"claim (batches of {batch}) + renew/{RENEW_EVERY}",
                               n_tasks, s1, s2),
              UnitCost.between("complete", n_tasks, s2, s3)]
    life = UnitCost.between(f"= task lifecycle (claims of {batch})", n_tasks, s0, s3,
                            own_infos=12)
    return life, phases


def _unit_costs(server: RedisServer, store: Store, admin: redis.Redis,
                n_tasks: int) -> dict[str, Any]:
    store.register_worker(WORKER, INSTANCE, lease_ms=LEASE_MS, info={}, fields={"capacity": 8})
    # Warm up: every script loaded (NOSCRIPT -> SCRIPT LOAD happens here, untimed).
    warm = store.submit([TaskSpec(cmd=f"warm {i}") for i in range(CLAIM_BATCH)],
                        job_name="warm")
    held = store.claim(WORKER, INSTANCE, free_mem=64 * GIB, free_cpus=CLAIM_BATCH, free_gpus=0,
                       max_count=CLAIM_BATCH, lease_ms=LEASE_MS)
    store.renew(WORKER, INSTANCE, [(c.task_id, c.token) for c in held], lease_ms=LEASE_MS,
                info={})
    for c in held:
        store.complete(c.task_id, c.token, RESULT)
    assert warm.new == CLAIM_BATCH
    admin.config_resetstat()

    costs: list[UnitCost] = []
    offset = 0
    for batch in CLAIM_BATCHES:
        life, phases = _lifecycle(store, admin, offset, n_tasks, batch)
        offset += n_tasks
        costs += [*phases, life]
    events_bytes = int(admin.memory_usage(store.key("events")) or 0)
    events_len = max(1, int(admin.xlen(store.key("events"))))
    counts = store.counts()
    if counts.get("succeeded") != offset + CLAIM_BATCH:
        raise RuntimeError(f"expected {offset + CLAIM_BATCH} succeeded, counts say {counts}")

    # Heartbeats: renew with 8 held leases, then with 64 (a 64-slot node).
    info = {"load": 1.0, "mem_free": 123456789, "slots": 8}
    for n_leases in HEARTBEAT_LEASES:
        submitted = store.submit([spec_for(offset + i) for i in range(n_leases)],
                                 job_name=f"heartbeat-{n_leases}")
        offset += n_leases
        assert submitted.new == n_leases
        held = store.claim(WORKER, INSTANCE, free_mem=64 * GIB, free_cpus=n_leases,
                           free_gpus=0, max_count=n_leases, lease_ms=LEASE_MS)
        assert len(held) == n_leases
        leases = [(c.task_id, c.token) for c in held]
        s4 = Snapshot.take(admin)
        for _ in range(n_tasks):
            lost = store.renew(WORKER, INSTANCE, leases, lease_ms=LEASE_MS, info=info)
            if lost:
                raise RuntimeError(f"renew lost leases {lost}")
        s5 = Snapshot.take(admin)
        costs.append(UnitCost.between(f"heartbeat (renew, {n_leases} leases)",
                                      n_tasks, s4, s5))
        for c in held:
            store.complete(c.task_id, c.token, RESULT)

    # Reap attempts while another reaper holds the lock (what all but one worker per
    # heartbeat period get).
    store.reap(lock_ms=600_000)
    s6 = Snapshot.take(admin)
    for _ in range(n_tasks):
        if store.reap(lock_ms=600_000) != -1:
            raise RuntimeError("reap ran although the lock was held")
    s7 = Snapshot.take(admin)
    costs.append(UnitCost.between("reap (lock held by another)", n_tasks, s6, s7))

    # Status queries, with 1 worker, then with 1,000 registered workers.
    n_jobs = len(store.job_ids())
    s6 = Snapshot.take(admin)
    for _ in range(STATUS_QUERIES):
        _status_query(store)
    s7 = Snapshot.take(admin)
    costs.append(UnitCost.between(f"status query (1 worker, {n_jobs} jobs)",
                                  STATUS_QUERIES, s6, s7))
    for i in range(STATUS_WORKERS - 1):
        store.register_worker(f"w{i:04d}", secrets.token_hex(4), lease_ms=LEASE_MS,
                              info=info, fields={"capacity": 4, "host": f"node-{i:04d}"})
    s8 = Snapshot.take(admin)
    for _ in range(STATUS_QUERIES // 4):
        _status_query(store)
    s9 = Snapshot.take(admin)
    costs.append(UnitCost.between(f"status query ({STATUS_WORKERS:,} workers, {n_jobs} jobs)",
                                  STATUS_QUERIES // 4, s8, s9))

    rows = [[c.name, f"{c.count:,}", f"{c.evalsha:.3f}",
             f"{c.inside:.1f}" if c.evalsha else f"{c.other:.1f} (plain)",
             f"{c.cpu_us:,.1f}", f"{c.evalsha_us:,.1f}",
             f"{c.net_in:,.0f}", f"{c.net_out:,.0f}",
             f"{c.memory:,.0f}" if not c.name.startswith(("heartbeat", "status", "reap")) else "-"]
            for c in costs]
    print_table(
        f"unit costs in Redis (N={n_tasks:,} tasks, redis {server.version()}, unix socket)",
        ["operation", "count", "EVALSHA/op", "cmds inside/op", "server CPU µs/op",
         "EVALSHA µs/op", "net in B/op", "net out B/op", "used_memory B/op"],
        rows,
        caption="server CPU: used_cpu_sys+used_cpu_user delta (all server work: parsing, "
                "scripts, socket I/O). EVALSHA µs: commandstats usec (script time only). "
                "cmds inside: commands the scripts ran (commandstats, EVALSHA excluded; 'info' "
                "is the scripts' own INFO server); "
                "'(plain)' = commands the client sent itself. used_memory: kept per task, "
                f"incl. the events stream (3 events per task, {events_bytes / events_len:,.0f} "
                "B/event, capped at ~10,000 entries: the first lifecycle run grows it, the "
                "second runs against a full, trimmed stream).",
    )
    for cost in costs:
        if cost.name.startswith(("=", "heartbeat")):
            note(f"  commands inside the scripts, {cost.name.lstrip('= ')}: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in cost.breakdown.items()))
    return {"n_tasks": n_tasks, "costs": [c.as_dict() for c in costs],
            "events_stream_bytes": events_bytes, "events_stream_len": events_len}


# --------------------------------------------------------------------------- part 2


def _script_texts() -> dict[str, str]:
    """The Lua text the sync Store registers (store._load_scripts), read-only."""
    lua = resources.files("distcomp") / "lua"
    prelude = (lua / "_prelude.lua").read_text()
    return {name: prelude + "\n" + (lua / f"{name}.lua").read_text()
            for name in ("register", "claim", "renew", "complete", "reap")}


@dataclass(frozen=True)
class SimConfig:
    url: str
    prefix: str
    first: int
    n_workers: int
    capacity: int
    heartbeat_s: float
    lease_ms: int
    task_s: float
    poll_s: float
    start_at: float  # time.time() at which every worker starts claiming
    stop_at: float
    connections: int


async def _sim_main(cfg: SimConfig) -> dict[str, Any]:
    import redis.asyncio as aredis

    pool = aredis.BlockingConnectionPool.from_url(cfg.url, max_connections=cfg.connections,
                                                  decode_responses=True, timeout=60)
    client = aredis.Redis(connection_pool=pool)
    scripts = {name: client.register_script(text) for name, text in _script_texts().items()}
    keys = [cfg.prefix]
    claim_lat: list[tuple[float, float]] = []  # (time.time() at start, seconds)
    completions: list[float] = []
    empty_claims = 0
    stale = 0
    errors: list[str] = []

    async def worker(index: int) -> None:
        nonlocal empty_claims, stale
        name, instance = f"sim-{index:05d}", secrets.token_hex(6)
        await scripts["register"](keys=keys, args=[name, instance, cfg.lease_ms, "{}", "",
                                                   "capacity", cfg.capacity,
                                                   "host", f"node-{index:05d}"])
        leases: dict[str, str] = {}
        slot_free = asyncio.Event()

        async def run_task(tid: str, token: str) -> None:
            nonlocal stale
            await asyncio.sleep(cfg.task_s)
            ok = await scripts["complete"](keys=keys, args=[tid, token, *_flatten(RESULT)])
            if not int(ok):
                stale += 1
            leases.pop(tid, None)
            completions.append(time.time())
            slot_free.set()

        async def heartbeat() -> None:
            # Spread the first beats over one period, as workers started at different times.
            await asyncio.sleep((index * 0.6180339) % 1.0 * cfg.heartbeat_s)
            while time.time() < cfg.stop_at:
                args: list[Any] = [name, instance, cfg.lease_ms, '{"load": 1.0}']
                for tid, token in list(leases.items()):
                    args += [tid, token]
                lost = await scripts["renew"](keys=keys, args=args)
                for tid in lost:
                    leases.pop(tid, None)
                # Like the worker: a reap attempt every heartbeat (the lock makes all
                # but one per period return -1 at once).
                await scripts["reap"](keys=keys, args=[int(cfg.heartbeat_s * 1000), 5, 1000])
                await asyncio.sleep(cfg.heartbeat_s)

        await asyncio.sleep(max(0.0, cfg.start_at - time.time()))
        # Workers do not all start in the same millisecond.
        await asyncio.sleep((index * 0.3819660) % 1.0 * cfg.task_s)
        beat = asyncio.create_task(heartbeat())
        tasks: set[asyncio.Task[None]] = set()
        while time.time() < cfg.stop_at:
            room = cfg.capacity - len(leases)
            if room <= 0:
                slot_free.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(slot_free.wait(), timeout=cfg.poll_s)
                continue
            t0 = time.perf_counter()
            out = await scripts["claim"](keys=keys, args=[
                name, instance, 64 * GIB, room, 0, room, cfg.lease_ms, secrets.token_hex(4), ""])
            claim_lat.append((time.time(), time.perf_counter() - t0))
            out = out[1:]  # the drained flag first, then five fields per task
            if not out:
                empty_claims += 1
                slot_free.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(slot_free.wait(), timeout=cfg.poll_s)
                continue
            for i in range(0, len(out), 5):
                tid, token = out[i], out[i + 1]
                leases[tid] = token
                task = asyncio.create_task(run_task(tid, token))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        beat.cancel()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat

    async def guarded(index: int) -> None:
        try:
            await worker(index)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    lags: list[tuple[float, float]] = []  # (time.time(), seconds a 10 ms timer fired late)

    async def loop_lag() -> None:
        while time.time() < cfg.stop_at:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append((time.time(), time.perf_counter() - t0 - 0.01))

    probe = asyncio.create_task(loop_lag())
    await asyncio.gather(*(guarded(cfg.first + i) for i in range(cfg.n_workers)))
    await probe
    await client.aclose()
    return {"claim_latencies": claim_lat, "loop_lags": lags, "completions": completions,
            "empty_claims": empty_claims, "stale": stale, "errors": errors[:5],
            "n_errors": len(errors)}


def _sim_process(cfg: SimConfig, out: Any) -> None:
    try:
        out.put(asyncio.run(_sim_main(cfg)))
    except BaseException as exc:
        out.put({"fatal": f"{type(exc).__name__}: {exc}"})


def simulate(*, n_workers: int, capacity: int, duration_s: float, warmup_s: float,
             procs: int, task_s: float = 1.0, heartbeat_s: float = 5.0) -> dict[str, Any]:
    """Part 2: many simulated workers against one Redis."""
    slots = n_workers * capacity
    n_tasks = int(slots * (duration_s + 2) / task_s)
    with redis_server() as server:
        store = Store(server.url, QUEUE)
        admin = server.client()
        try:
            t0 = time.perf_counter()
            for i in range(0, n_tasks, 5_000):
                store.submit([spec_for(j) for j in range(i, min(i + 5_000, n_tasks))],
                             job_name=f"sim-{i // 5_000}")
            fill_s = time.perf_counter() - t0
            note(f"  simulation: {n_workers:,} workers x {capacity} slots, {n_tasks:,} tasks "
                 f"of {task_s:g}s submitted in {fill_s:.1f}s; {procs} client processes")
            redis_pid = server.proc.pid
            ctx = mp.get_context("spawn")
            results_q = ctx.Queue()
            per = -(-n_workers // procs)
            start_at = time.time() + 3.0 + 0.5 * procs  # time to spawn and register
            stop_at = start_at + duration_s
            children = []
            for p in range(procs):
                first = p * per
                count = min(per, n_workers - first)
                cfg = SimConfig(url=server.url, prefix=store.prefix, first=first,
                                n_workers=count, capacity=capacity, heartbeat_s=heartbeat_s,
                                lease_ms=LEASE_MS, task_s=task_s, poll_s=1.0,
                                start_at=start_at, stop_at=stop_at,
                                connections=count + 16)
                proc = ctx.Process(target=_sim_process, args=(cfg, results_q), daemon=True)
                proc.start()
                children.append(proc)
            # Steady window: [start + warmup, stop - 1].
            w0, w1 = start_at + warmup_s, stop_at - 1.0
            time.sleep(max(0.0, w0 - time.time()))
            window = _window_sample(admin, store, redis_pid, children)
            time.sleep(max(0.0, w1 - time.time()))
            window_end = _window_sample(admin, store, redis_pid, children)
            results = []
            for _ in children:
                results.append(results_q.get(timeout=duration_s + 120))
            for proc in children:
                proc.join(timeout=30)
        finally:
            admin.close()
            store.close()
    return _sim_report(n_workers, capacity, task_s, heartbeat_s, procs, duration_s, warmup_s,
                       n_tasks, window, window_end, results)


@dataclass
class WindowSample:
    wall: float
    succeeded: int
    server_cpu_s: float
    client_cpu_s: float
    machine_busy_s: float
    commands: dict[str, tuple[int, int]]


def _window_sample(admin: redis.Redis, store: Store, redis_pid: int,
                   children: list[Any]) -> WindowSample:
    client_cpu = 0.0
    for proc in children:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(proc.pid).cpu_times()
            client_cpu += t.user + t.system
    machine = psutil.cpu_times()
    cpu: dict[str, Any] = admin.info("cpu")
    raw: dict[str, Any] = admin.info("commandstats")
    return WindowSample(
        wall=time.time(),
        succeeded=int(store.counts().get("succeeded", 0)),
        server_cpu_s=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        client_cpu_s=client_cpu,
        machine_busy_s=sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
        commands={k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                  for k, v in raw.items()},
    )


def _sim_report(n_workers: int, capacity: int, task_s: float, heartbeat_s: float, procs: int,
                duration_s: float, warmup_s: float, n_tasks: int, a: WindowSample,
                b: WindowSample, results: list[dict[str, Any]]) -> dict[str, Any]:
    fatal = [r["fatal"] for r in results if "fatal" in r]
    if fatal:
        raise RuntimeError(f"simulator process failed: {fatal[0]}")
    n_errors = sum(r["n_errors"] for r in results)
    if n_errors:
        errs = [e for r in results for e in r["errors"]]
        raise RuntimeError(f"{n_errors} simulated workers failed, e.g. {errs[0]}")
    wall = b.wall - a.wall
    done = b.succeeded - a.succeeded
    lat_ms = [lat * 1000 for r in results for t, lat in r["claim_latencies"]
              if a.wall <= t <= b.wall]
    claims_in_window = len(lat_ms)
    lag_ms = [lag * 1000 for r in results for t, lag in r["loop_lags"] if a.wall <= t <= b.wall]
    ev0, ev1 = a.commands.get("evalsha", (0, 0)), b.commands.get("evalsha", (0, 0))
    evalsha_per_s = (ev1[0] - ev0[0]) / wall
    server_cpu = (b.server_cpu_s - a.server_cpu_s) / wall
    client_cpu = (b.client_cpu_s - a.client_cpu_s) / wall
    machine = (b.machine_busy_s - a.machine_busy_s) / wall
    ideal = n_workers * capacity / task_s
    empty = sum(r["empty_claims"] for r in results)
    stale = sum(r["stale"] for r in results)
    server_us_per_task = (b.server_cpu_s - a.server_cpu_s) * 1e6 / done if done else 0.0
    out = {
        "workers": n_workers, "capacity": capacity, "slots": n_workers * capacity,
        "task_s": task_s, "heartbeat_s": heartbeat_s, "lease_ms": LEASE_MS,
        "client_processes": procs, "duration_s": duration_s, "warmup_s": warmup_s,
        "tasks_submitted": n_tasks, "window_s": wall, "completions": done,
        "throughput_per_s": done / wall, "ideal_per_s": ideal,
        "claims_in_window": claims_in_window,
        "claim_p50_ms": percentile(lat_ms, 50) if lat_ms else None,
        "claim_p99_ms": percentile(lat_ms, 99) if lat_ms else None,
        "loop_lag_p50_ms": percentile(lag_ms, 50) if lag_ms else None,
        "loop_lag_p99_ms": percentile(lag_ms, 99) if lag_ms else None,
        "evalsha_per_s": evalsha_per_s,
        "redis_cpu_util": server_cpu, "client_cpu_util": client_cpu,
        "machine_cpu_util": machine, "cores": os.cpu_count(),
        "redis_cpu_us_per_task": server_us_per_task,
        "empty_claims_total": empty, "stale_completions_total": stale,
        "scripts_in_window": {},
    }
    rows = []
    for name in ("evalsha",):
        calls = ev1[0] - ev0[0]
        usec = ev1[1] - ev0[1]
        out["scripts_in_window"][name] = {"calls": calls, "usec_per_call":
                                          usec / calls if calls else 0.0}
    rows.append([f"{n_workers:,} x {capacity}", f"{wall:.1f}",
                 f"{done / wall:,.0f}", f"{ideal:,.0f}", f"{100 * done / wall / ideal:.0f}%",
                 f"{out['claim_p50_ms']:.2f}" if lat_ms else "-",
                 f"{out['claim_p99_ms']:.2f}" if lat_ms else "-",
                 f"{evalsha_per_s:,.0f}",
                 f"{100 * server_cpu:.0f}%", f"{server_us_per_task:.0f}",
                 f"{100 * client_cpu:.0f}%", f"{100 * machine:.0f}% of {os.cpu_count()}00%"])
    print_table(
        f"simulation: {n_workers:,} workers, {task_s:g}s tasks, heartbeat {heartbeat_s:g}s, "
        f"lease {LEASE_MS // 1000}s, {procs} client processes (asyncio)",
        ["workers x slots", "window s", "completions/s", "ideal/s", "of ideal",
         "claim p50 ms", "claim p99 ms", "EVALSHA/s", "Redis CPU", "Redis CPU µs/task",
         "client CPU", "machine CPU"],
        rows,
        caption="Window: after a warm-up, until 1 s before the stop. Claim latency: client "
                "side (includes waiting in the simulator's own event loop and pool). "
                "Redis/client CPU: share of one core. The simulator runs on the same cores "
                "as Redis; machine CPU includes anything else running on the machine.",
    )
    note(f"  claims in window {claims_in_window:,} ({claims_in_window / wall:,.0f}/s), "
         f"empty claims (whole run) {empty:,}, stale completions {stale}, "
         f"EVALSHA server time {out['scripts_in_window']['evalsha']['usec_per_call']:.1f} "
         f"µs/call")
    if lag_ms:
        note(f"  simulator event-loop lag (a 10 ms timer firing late): "
             f"p50 {out['loop_lag_p50_ms']:.2f} ms, p99 {out['loop_lag_p99_ms']:.2f} ms")
    return out


# --------------------------------------------------------------------------- main


def run(*, quick: bool = False, workers: int | None = None, duration: float | None = None,
        procs: int | None = None) -> dict[str, Any]:
    binary = redis_server_binary()
    n_tasks = 500 if quick else 2_000
    note(f"[bold]scale[/]: {binary} {redis_server_version(binary)}; "
         f"{os.cpu_count()} cores")
    costs = unit_costs(n_tasks)
    sim = simulate(n_workers=workers or (100 if quick else 1_000), capacity=4,
                   duration_s=duration or (20.0 if quick else 60.0),
                   warmup_s=5.0 if quick else 10.0,
                   procs=procs or (1 if quick else 2))
    return {"benchmark": "scale", "unit_costs": costs, "simulation": sim}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="500 tasks for the unit costs; 100 workers for 20 s")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--workers", type=int, help="simulated workers (default 1000)")
    parser.add_argument("--duration", type=float, help="simulation seconds (default 60)")
    parser.add_argument("--procs", type=int,
                        help="client processes running the simulated workers (default 2)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(quick=args.quick, workers=args.workers, duration=args.duration,
                 procs=args.procs)
    note(f"scale: done in {time.perf_counter() - started:.0f}s")
    if args.json:
        write_json(args.json, {"environment": environment(), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
