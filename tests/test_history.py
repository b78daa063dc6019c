"""History trimming against a real redis-server: old finished tasks leave Redis (into
an archive file, or not), live tasks never do, counters stay exact, cost is O(batch)."""

from __future__ import annotations

import json
import os
import random
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RedisProcess, run_cli, wait_for

from distcomp.config import ConfigError, HistorySettings, load_history, parse_config
from distcomp.history import find_in_archive, trim
from distcomp.spec import GIB, TaskSpec
from distcomp.store import FINISHED_STATES, STATES, Store

LEASE = 60_000


def register(store: Store, name: str = "w1") -> str:
    instance = uuid.uuid4().hex
    store.register_worker(name, instance, lease_ms=LEASE, info={}, fields={"host": "h"})
    return instance


def run_tasks(store: Store, inst: str, n: int, outcome: str = "succeeded", *,
              name: str = "w1") -> list[str]:
    """Claim n tasks as worker ``name`` and finish them with ``outcome``."""
    claims = store.claim(name, inst, free_mem=64 * GIB, free_cpus=64, free_gpus=0,
                         max_count=n, lease_ms=LEASE)
    for c in claims:
        if outcome == "succeeded":
            assert store.complete(c.task_id, c.token, {"exit_code": 0, "host": "h"})
        else:
            assert store.fail(c.task_id, c.token, "exit code 1", {"exit_code": 1},
                              retryable=False) == "failed"
    return [c.task_id for c in claims]


def check_counters(store: Store) -> None:
    """Counters count every task that reached a state: for each state, a full scan of
    the records still in Redis plus what trimming removed equals the counter."""
    scanned = dict.fromkeys(STATES, 0)
    per_job: dict[str, dict[str, int]] = {}
    for tid in store.iter_task_ids():
        raw = store.task(tid)
        if raw is None:
            continue
        scanned[raw["state"]] += 1
        per_job.setdefault(tid.split(".")[0], dict.fromkeys(STATES, 0))[raw["state"]] += 1
    counts = store.counts()
    for s in STATES:
        assert counts.get(s, 0) == scanned[s] + counts.get(f"trimmed_{s}", 0), s
    for job in store.jobs():
        raw = store.redis.hgetall(store.key("job", job.id))
        live = per_job.get(job.id, dict.fromkeys(STATES, 0))
        for s in STATES:
            assert job.counts[s] == live[s] + int(raw.get(f"trimmed_{s}", 0)), (job.id, s)
    # the finished-state indexes hold exactly the finished records still in Redis
    for s in FINISHED_STATES:
        assert store.redis.zcard(store.key(s)) == scanned[s], s


def aged(store: Store, seconds: float = 0.05) -> None:
    """Let the server clock move past the finish times just recorded."""
    time.sleep(seconds)


# -- the store operation ------------------------------------------------------

def test_only_old_succeeded_tasks_go_and_counters_stay(store: Store) -> None:
    store.submit([TaskSpec(cmd=f"t{i}") for i in range(8)])
    inst = register(store)
    old = run_tasks(store, inst, 3)
    failed = run_tasks(store, inst, 1, "failed")
    aged(store, 0.4)
    young = run_tasks(store, inst, 1)
    running = [c.task_id for c in store.claim("w1", inst, free_mem=GIB, free_cpus=1,
                                              free_gpus=0, max_count=1, lease_ms=LEASE)]
    store.cancel(["1.8"])
    before = store.counts()
    jobs_before = [j.counts for j in store.jobs()]

    assert store.trim_history(0.3, 100) == 3

    assert all(store.task(t) is None for t in old)
    assert all(store.task(t) is not None for t in [*failed, *young, *running, "1.7", "1.8"])
    assert store.task(running[0])["state"] == "running"  # type: ignore[index]
    assert store.task("1.7")["state"] == "queued"  # type: ignore[index]
    assert {k: v for k, v in store.counts().items() if not k.startswith("trimmed_")} == before
    assert [j.counts for j in store.jobs()] == jobs_before
    assert store.counts()["trimmed_succeeded"] == 3
    assert store.history_counts()["succeeded"] == {"kept": 1, "trimmed": 3}
    check_counters(store)
    # nothing old is left: a second pass removes nothing
    assert store.trim_history(0.3, 100) == 0


def test_failed_and_cancelled_go_only_when_named(store: Store) -> None:
    store.submit([TaskSpec(cmd=f"t{i}") for i in range(3)])
    inst = register(store)
    failed = run_tasks(store, inst, 1, "failed")
    store.cancel(["1.2"])
    aged(store)
    assert store.trim_history(0, 100) == 0  # default: succeeded only
    assert store.trim_history(0, 100, states=("failed", "cancelled")) == 2
    assert store.task(failed[0]) is None and store.task("1.2") is None
    assert store.failed_task_ids() == []
    assert store.retry(["1.1", "1.2"]) == 0  # nothing to retry any more
    check_counters(store)


def test_random_transitions_and_trims_keep_counters_and_indexes_exact(store: Store) -> None:
    """After any mix of finishing, cancelling, retrying and trimming, every counter is
    the records in Redis plus the trimmed ones, and each finished-state index holds
    exactly that state's records."""
    rng = random.Random(8)
    store.submit([TaskSpec(cmd=f"t{i}", retries=rng.choice([0, 1])) for i in range(60)])
    inst = register(store)
    for _ in range(150):
        op = rng.random()
        if op < 0.45:
            for c in store.claim("w1", inst, free_mem=64 * GIB, free_cpus=64, free_gpus=0,
                                 max_count=rng.randint(1, 4), lease_ms=LEASE):
                if rng.random() < 0.6:
                    store.complete(c.task_id, c.token, {"exit_code": 0})
                else:
                    store.fail(c.task_id, c.token, "boom", {"exit_code": 1})
        elif op < 0.6:
            store.cancel([f"1.{rng.randint(1, 60)}" for _ in range(3)])
        elif op < 0.75:
            store.retry([f"1.{rng.randint(1, 60)}" for _ in range(5)])
        else:
            states = rng.sample(FINISHED_STATES, rng.randint(1, 3))
            assert store.trim_history(0, rng.randint(1, 5), states=states) >= 0
    check_counters(store)
    counts = store.counts()
    assert all(counts.get(f"trimmed_{s}", 0) > 0 for s in FINISHED_STATES), counts


def test_batch_limit_and_oldest_first(store: Store) -> None:
    store.submit([TaskSpec(cmd=f"t{i}") for i in range(10)])
    inst = register(store)
    for _ in range(10):
        run_tasks(store, inst, 1)
        time.sleep(0.002)  # distinct finish times
    aged(store)
    assert store.trim_history(0, 4) == 4
    assert [store.task(f"1.{i}") is None for i in range(1, 11)] == [True] * 4 + [False] * 6
    assert store.trim_history(0, 100) == 6
    check_counters(store)


class RetryInBetween(Store):
    """Retries (or retries and fails again) the tasks after the trimmer has read them
    and before its delete script runs: the race the script's state check guards."""

    refail = False

    def _history_batch(self, *args: Any) -> tuple[list[str], str]:
        pairs, label = super()._history_batch(*args)
        ids = pairs[0::2]
        assert self.retry(ids) == len(ids)
        if self.refail:
            time.sleep(0.005)  # a new finish time
            inst = register(self, "w2")
            run_tasks(self, inst, len(ids), "failed", name="w2")
        return pairs, label


@pytest.mark.parametrize("refail", [False, True])
def test_task_retried_between_read_and_delete_is_kept(redis_server: RedisProcess,
                                                      queue_name: str, tmp_path: Path,
                                                      refail: bool) -> None:
    racer = RetryInBetween(redis_server.url, queue_name)
    racer.refail = refail
    racer.submit([TaskSpec(cmd="a"), TaskSpec(cmd="b")])
    inst = register(racer)
    run_tasks(racer, inst, 2, "failed")
    aged(racer)
    archive = tmp_path / "history.jsonl"
    assert racer.trim_history(0, 100, states=("failed",), archive=archive) == 0
    for tid in ("1.1", "1.2"):
        raw = racer.task(tid)
        assert raw is not None and raw["state"] == ("failed" if refail else "queued")
    # archived before the delete, so the records are there (a later pass writes the
    # newer record again: readers keep the last line per id)
    assert [r["id"] for r in map(json.loads, archive.read_text().splitlines())] == ["1.1", "1.2"]
    check_counters(racer)
    racer.close()


def test_archive_holds_the_records_before_they_leave(store: Store, tmp_path: Path) -> None:
    store.submit([TaskSpec(cmd="echo hi", name="greet", tags=("x",)), TaskSpec(cmd="false")])
    inst = register(store)
    run_tasks(store, inst, 1)
    run_tasks(store, inst, 1, "failed")
    aged(store)
    archive = tmp_path / "deep" / "history.jsonl"
    assert store.trim_history(0, 100, states=("succeeded", "failed"), archive=archive) == 2
    records = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [(r["id"], r["state"]) for r in records] == [("1.1", "succeeded"), ("1.2", "failed")]
    first = records[0]
    assert first["spec"]["cmd"] == "echo hi" and first["spec"]["name"] == "greet"
    assert first["exit_code"] == "0" and first["host"] == "h" and first["attempt"] == "1"
    assert first["queue"] == store.queue and "token" not in first
    assert records[1]["reason"] == "exit code 1"
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert find_in_archive(archive, "1.2")[-1]["state"] == "failed"
    gone = store.trimmed_task("1.1")
    assert gone is not None and gone.archive.endswith(f":{archive}")
    assert "archive" in gone.describe() and "history show 1.1" in gone.describe()


def test_archive_that_cannot_be_written_removes_nothing(store: Store, tmp_path: Path) -> None:
    store.submit([TaskSpec(cmd="a")])
    run_tasks(store, register(store), 1)
    aged(store)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        store.trim_history(0, 10, archive=blocker / "history.jsonl")
    assert store.task("1.1") is not None
    assert store.redis.get(store.key("lock:history")) is None  # released
    assert store.trim_history(0, 10) == 1


def test_one_trimmer_at_a_time(store: Store) -> None:
    store.submit([TaskSpec(cmd="a")])
    run_tasks(store, register(store), 1)
    aged(store)
    store.redis.set(store.key("lock:history"), "someone-else", px=5000)
    assert store.trim_history(0, 10) == -1
    assert store.task("1.1") is not None
    store.redis.delete(store.key("lock:history"))
    assert store.trim_history(0, 10) == 1


def test_trimmed_task_is_told_apart_from_unknown(store: Store) -> None:
    store.submit([TaskSpec(cmd="a"), TaskSpec(cmd="b")])
    run_tasks(store, register(store), 1)
    aged(store)
    assert store.trim_history(0, 10) == 1
    expired = store.trimmed_task("1.1")
    assert expired is not None and expired.archive == ""
    assert "expired" in expired.describe()
    assert store.trimmed_task("1.2") is None  # still in Redis
    assert store.trimmed_task("1.3") is None  # above the job's high-water mark
    assert store.trimmed_task("9.1") is None and store.trimmed_task("junk") is None


def test_dedup_survives_trimming_and_payloads_go(store: Store) -> None:
    key = store.payload_key("p1")
    store.put_payloads({key: b"pickle"})
    store.submit([TaskSpec(cmd="a"), TaskSpec(cmd="f()", kind="python", payload=key)])
    run_tasks(store, register(store), 2)
    aged(store)
    assert store.trim_history(0, 10) == 2
    assert store.get_payloads([key]) == [None]
    again = store.submit([TaskSpec(cmd="a")])
    assert again.new == 0 and again.task_ids == ["1.1"]  # not run again


def test_policy_pass_follows_the_settings(store: Store, tmp_path: Path) -> None:
    store.submit([TaskSpec(cmd=f"t{i}") for i in range(3)])
    inst = register(store)
    run_tasks(store, inst, 1)
    run_tasks(store, inst, 1, "failed")
    store.cancel(["1.3"])
    aged(store)
    policy = HistorySettings(mode="off", keep_s=0, archive=tmp_path / "a.jsonl")
    assert trim(store, policy).total == 0
    report = trim(store, HistorySettings(mode="expire", keep_s=0, archive=tmp_path / "a.jsonl"))
    assert report.removed == {"succeeded": 1} and not (tmp_path / "a.jsonl").exists()
    report = trim(store, HistorySettings(mode="archive", keep_s=0, keep_failed_s=0,
                                         archive=tmp_path / "a.jsonl"))
    assert report.removed == {"succeeded": 0, "failed": 1, "cancelled": 1}
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2
    check_counters(store)


def _commands(r: redis.Redis) -> int:
    stats: dict[str, Any] = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items()
               if k not in ("cmdstat_info", "cmdstat_config|resetstat"))


@pytest.mark.parametrize("mode", ["expire", "archive"])
def test_cost_is_per_batch_not_per_backlog(redis_server: RedisProcess, tmp_path: Path,
                                           mode: str) -> None:
    """The Redis commands of one trim (those inside the script included) are the same
    with 200 or 6,000 finished tasks waiting: range reads, never a scan."""
    costs = []
    for n in (200, 6000):
        s = Store(redis_server.url, "c" + uuid.uuid4().hex[:8])
        ids = s.submit([TaskSpec(cmd=f"t{i}") for i in range(n)]).task_ids
        s.cancel(ids)  # the quickest way to finish many tasks
        aged(s)
        archive = tmp_path / f"{n}.jsonl" if mode == "archive" else None
        r = redis.Redis(unix_socket_path=str(redis_server.socket))
        r.config_resetstat()
        assert s.trim_history(0, 50, states=("cancelled",), archive=archive) == 50
        costs.append(_commands(r))
        r.close()
        s.close()
    assert costs[0] == costs[1], costs


# -- configuration ------------------------------------------------------------

def test_history_settings_from_distcomp_toml(tmp_path: Path) -> None:
    (tmp_path / "distcomp.toml").write_text(
        'queue = "q"\n[history]\nmode = "expire"\nkeep = "12h"\nkeep_failed = "30d"\n'
        'archive = "arch/h.jsonl"\n')
    policy = load_history(tmp_path / "state", "q", cwd=tmp_path)
    assert (policy.mode, policy.keep_s, policy.keep_failed_s) == ("expire", 43200, 30 * 86400)
    assert policy.archive == tmp_path / "arch" / "h.jsonl"
    defaults = load_history(tmp_path / "state", "q", cwd=tmp_path / "nowhere")
    assert (defaults.mode, defaults.keep_s, defaults.keep_failed_s) == ("archive", 7 * 86400,
                                                                         None)
    assert defaults.archive == (tmp_path / "state" / "history" / "q.jsonl").resolve()


@pytest.mark.parametrize(("body", "line", "words"), [
    ('[history]\nkeep = "7"\n', 2, ["history.keep", "unit", "7d"]),
    ('[history]\nmode = "archive"\nmode2 = "x"\n', 3, ["unknown setting history.mode2",
                                                       "keep_failed"]),
    ('[history]\nmode = "delete"\n', 2, ["history.mode", '"expire"']),
    ('[history]\nkeep = "10s"\n', 2, ["shorter than 60s"]),
    ('history = "7d"\n', 1, ["must be a table", "[history]"]),
    ('redis = "redis://h:1/0"\n\n[history]\nkeep_failed = 30\n', 4, ["keep_failed",
                                                                      "string in quotes"]),
])
def test_bad_history_settings_name_file_line_and_fix(tmp_path: Path, body: str, line: int,
                                                     words: list[str]) -> None:
    path = tmp_path / "distcomp.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        parse_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}:"), message
    for word in words:
        assert word in message, message


# -- the command line ---------------------------------------------------------

def _finished_queue(store: Store) -> None:
    store.submit([TaskSpec(cmd="echo 1"), TaskSpec(cmd="false"), TaskSpec(cmd="sleep 9")])
    inst = register(store)
    run_tasks(store, inst, 1)
    run_tasks(store, inst, 1, "failed")
    aged(store)


def test_cli_trim_archive_and_lookups(store: Store, cli_env: dict[str, str],
                                      tmp_path: Path) -> None:
    _finished_queue(store)
    before = store.counts()
    dry = run_cli(["history", "trim", "--older-than", "0s", "--dry-run"], cli_env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 finished tasks" in dry.stdout and store.task("1.1") is not None

    out = run_cli(["history", "trim", "--older-than", "0s"], cli_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    archive = tmp_path / "state" / "history" / f"{store.queue}.jsonl"
    assert "removed 1 finished tasks" in out.stdout
    assert str(archive) in out.stdout.replace("\n", "")
    assert store.task("1.1") is None and store.task("1.2") is not None
    assert {k: v for k, v in store.counts().items() if not k.startswith("trimmed")} == before

    logs = run_cli(["logs", "1.1"], cli_env, cwd=tmp_path)
    assert logs.returncode == 4 and "archive" in logs.stderr and "history show 1.1" in logs.stderr
    show = run_cli(["history", "show", "1.1"], cli_env, cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["spec"]["cmd"] == "echo 1"
    unknown = run_cli(["logs", "1.9"], cli_env, cwd=tmp_path)
    assert unknown.returncode == 4 and "no task" in unknown.stderr
    listing = run_cli(["tasks"], cli_env, cwd=tmp_path)
    assert "1 finished tasks are not listed" in " ".join(listing.stderr.split())

    status = run_cli(["history", "status", "--json"], cli_env, cwd=tmp_path)
    data = json.loads(status.stdout)
    assert data["counts"]["succeeded"] == {"kept": 0, "trimmed": 1}
    assert data["mode"] == "archive" and data["keep_failed_s"] is None

    failed = run_cli(["history", "trim", "--older-than", "0s", "--failed-older-than", "0s",
                      "--mode", "expire", "--json"], cli_env, cwd=tmp_path)
    assert json.loads(failed.stdout)["removed"] == {"succeeded": 0, "failed": 1,
                                                    "cancelled": 0}
    retry = run_cli(["retry", "1.2"], cli_env, cwd=tmp_path)
    text = " ".join(retry.stderr.split())
    assert retry.returncode == 4 and "can no longer be retried" in text
    assert "or expired without one" in text  # its job has archived and expired tasks
    check_counters(store)


@pytest.mark.parametrize(("args", "toml", "words"), [
    (["--older-than", "7"], None, ["--older-than", "unit", "7d"]),
    (["--failed-older-than", "soon"], None, ["--failed-older-than", "duration"]),
    ([], '[history]\nkeep = "1x"\n', ["distcomp.toml:2", "history.keep"]),
    (["--archive", "{blocker}/h.jsonl", "--older-than", "0s"], None,
     ["cannot write the archive", "nothing was removed", "--archive"]),
])
def test_cli_bad_input_is_refused_and_changes_nothing(
        store: Store, cli_env: dict[str, str], tmp_path: Path, args: list[str],
        toml: str | None, words: list[str]) -> None:
    _finished_queue(store)
    (tmp_path / "blocker").write_text("")
    if toml is not None:
        (tmp_path / "distcomp.toml").write_text(toml)
    args = [a.replace("{blocker}", str(tmp_path / "blocker")) for a in args]
    out = run_cli(["history", "trim", *args], cli_env, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    text = " ".join(out.stderr.split())
    for word in words:
        assert word in text, text
    assert store.task("1.1") is not None and store.counts().get("trimmed_succeeded") is None
    assert store.redis.get(store.key("lock:history")) is None


def test_cli_mode_off_removes_nothing(store: Store, cli_env: dict[str, str],
                                      tmp_path: Path) -> None:
    _finished_queue(store)
    (tmp_path / "distcomp.toml").write_text('[history]\nmode = "off"\n')
    out = run_cli(["history", "trim", "--older-than", "0s"], cli_env, cwd=tmp_path)
    assert out.returncode == 0 and "nothing removed" in out.stderr
    assert store.task("1.1") is not None


def test_dashboard_says_a_task_was_archived(store: Store, tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from distcomp.client import Client
    from distcomp.dashboard.app import create_app

    _finished_queue(store)
    archive = tmp_path / "h.jsonl"
    assert store.trim_history(0, 10, archive=archive) == 1
    client = Client(store.url, store.queue, tmp_path / "state")
    http = TestClient(create_app(client, refresh_s=0.0))
    detail = http.get("/api/tasks/1.1")
    assert detail.status_code == 404 and str(archive) in detail.json()["error"]
    assert http.get("/api/tasks/1.7").json()["error"].startswith("no task")
    listing = http.get("/api/tasks", params={"job": "1"}).json()
    assert listing["trimmed"] == 1 and listing["archives"][0].endswith(str(archive))
    assert [t["id"] for t in listing["tasks"]] == ["1.2", "1.3"]
    client.close()


def test_archive_file_is_fsynced_before_delete(store: Store, tmp_path: Path) -> None:
    """The delete script runs only after the archive write returned (fsync included):
    at the moment of the delete the records are in the file."""
    seen: list[int] = []
    archive = tmp_path / "h.jsonl"

    class Watching(Store):
        def _run(self, name: str, args: Any) -> Any:
            if name == "archive" and len(args) > 4:
                seen.append(len(archive.read_text().splitlines()))
            return super()._run(name, args)

    s = Watching(store.url, store.queue)
    _finished_queue(s)
    assert s.trim_history(0, 10, states=("succeeded", "failed"), archive=archive) == 2
    assert seen == [2]
    s.close()
    assert os.path.getsize(archive) > 0


def test_worker_trims_history_as_configured(store: Store, tmp_path: Path,
                                            start_worker: Any) -> None:
    archive = tmp_path / "history.jsonl"
    store.submit([TaskSpec(cmd="true"), TaskSpec(cmd="exit 3", retries=0)])
    settings = HistorySettings(mode="archive", keep_s=0.0, archive=archive)
    w = start_worker(history=settings, history_interval=0.2, heartbeat=0.2,
                     lease=1.0)
    wait_for(lambda: store.task("1.1") is None)
    w.stop()
    # the success left Redis through the archive; the failure stays (retryable)
    assert [json.loads(line)["id"] for line in archive.read_text().splitlines()] == ["1.1"]
    failed = store.task("1.2")
    assert failed is not None and failed["state"] == "failed"
    job = store.job("1")
    assert job is not None and job.counts["succeeded"] == 1 and job.counts["failed"] == 1
