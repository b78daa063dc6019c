"""The Lua transitions against a real redis-server: order, fit, leases, fencing, counters."""

from __future__ import annotations

import random
import time
import uuid

import pytest

from distcomp.spec import GIB, MIB, TaskSpec
from distcomp.store import STATES, NameTakenError, NoJobError, NotOwnerError, Store, shape_of

LEASE = 60_000


def spec(cmd: str, **kw: object) -> TaskSpec:
    return TaskSpec(cmd=cmd, **kw)  # type: ignore[arg-type]


def register(store: Store, name: str = "w1", lease_ms: int = LEASE) -> str:
    instance = uuid.uuid4().hex
    store.register_worker(name, instance, lease_ms=lease_ms, info={}, fields={"host": "h"})
    return instance


def claim(store: Store, name: str, inst: str, n: int = 1, mem: int = 64 * GIB, cpus: int = 64,
          gpus: int = 0, lease_ms: int = LEASE) -> list[str]:
    return [c.task_id for c in store.claim(name, inst, free_mem=mem, free_cpus=cpus,
                                           free_gpus=gpus, max_count=n, lease_ms=lease_ms)]


def check_counters(store: Store) -> None:
    """The O(1) counters must equal what a full scan of the task records finds."""
    actual = dict.fromkeys(STATES, 0)
    per_job: dict[str, dict[str, int]] = {}
    for tid in store.iter_task_ids():
        state = store.task(tid)["state"]  # type: ignore[index]
        actual[state] += 1
        per_job.setdefault(tid.split(".")[0], dict.fromkeys(STATES, 0))[state] += 1
    counts = store.counts()
    assert {s: counts.get(s, 0) for s in STATES} == actual
    for job in store.jobs():
        assert job.counts == per_job.get(job.id, dict.fromkeys(STATES, 0))
    assert len(store.running_task_ids()) == actual["running"]
    queued_in_sets = sum(store.redis.zcard(store.key("ready", s))
                         for s in store.redis.smembers(store.key("shapes")))
    assert queued_in_sets == actual["queued"]


def test_submit_creates_job_and_counts(store: Store) -> None:
    result = store.submit([spec("echo 1"), spec("echo 2")], job_name="j")
    assert result.job_id == "1" and result.new == 2 and result.task_ids == ["1.1", "1.2"]
    assert store.counts()["queued"] == 2
    job = store.job("1")
    assert job is not None and job.n_tasks == 2 and job.counts["queued"] == 2
    check_counters(store)


def test_resubmitting_same_tasks_is_deduplicated(store: Store) -> None:
    first = store.submit([spec("a"), spec("b")])
    again = store.submit([spec("a"), spec("b"), spec("c")])
    assert again.new == 1 and again.task_ids == ["1.1", "1.2", "2.1"]
    nothing = store.submit([spec("a")])
    assert nothing.job_id is None and nothing.new == 0 and nothing.task_ids == ["1.1"]
    dup = store.submit([spec("a")], allow_duplicates=True)
    assert dup.new == 1 and dup.task_ids == ["3.1"]
    assert store.job_ids() == ["1", "2", "3"] and first.new == 2
    # identical lines within one file collapse too, as the predecessor did
    same = store.submit([spec("z"), spec("z")])
    assert same.new == 1 and same.task_ids == ["4.1", "4.1"]
    check_counters(store)


def test_claim_takes_priority_then_submission_order(store: Store) -> None:
    store.submit([spec("low", priority=1), spec("high", priority=5), spec("mid", priority=3),
                  spec("high2", priority=5)])
    inst = register(store)
    assert claim(store, "w1", inst, n=4) == ["1.2", "1.4", "1.3", "1.1"]
    check_counters(store)


def test_priority_order_holds_across_shapes(store: Store) -> None:
    store.submit([spec("a", mem=1 * GIB, priority=1), spec("b", cpus=2, priority=9),
                  spec("c", gpus=1, priority=5), spec("d", mem=100 * MIB, priority=7)])
    inst = register(store)
    assert claim(store, "w1", inst, n=4, gpus=1) == ["1.2", "1.4", "1.3", "1.1"]


def test_claim_only_takes_what_fits(store: Store) -> None:
    store.submit([spec("big", mem=8 * GIB, priority=9), spec("small", mem=1 * GIB),
                  spec("wide", cpus=4, priority=8), spec("gpu", gpus=1, priority=7)])
    inst = register(store)
    # 2 GiB, 2 cpus, no GPU: only "small" fits, although it has the lowest priority
    assert claim(store, "w1", inst, n=10, mem=2 * GIB, cpus=2) == ["1.2"]
    # several per call, and the free budget shrinks as tasks are taken
    # "big" takes 8 GiB and a core; "wide" (4 cpus) no longer fits, "gpu" still does
    assert claim(store, "w1", inst, n=10, mem=8 * GIB, cpus=4, gpus=1) == ["1.1", "1.4"]
    assert claim(store, "w1", inst, n=10, mem=0, cpus=3, gpus=1) == []
    assert claim(store, "w1", inst, n=10, mem=0, cpus=4, gpus=0) == ["1.3"]
    check_counters(store)


def test_cpus_are_enforced_within_one_claim(store: Store) -> None:
    store.submit([spec(f"t{i}", cpus=2) for i in range(5)])
    inst = register(store)
    assert len(claim(store, "w1", inst, n=10, cpus=5)) == 2


def test_claim_cost_does_not_grow_with_backlog(store: Store) -> None:
    """A claim inspects the heads of the shapes only: its Redis command count is
    bounded by claims x shapes, with 500 as with 20,000 tasks waiting (no scan).
    (The exact count varies a little with the order SMEMBERS lists the shapes in:
    a head that cannot beat the best one found so far is not read.)"""

    def commands_per_claim(n_tasks: int, queue: str) -> int:
        s = Store(store.url, queue)
        for start in range(0, n_tasks, 5000):
            s.submit([spec(f"true {i}", mem=(i % 5) * 512 * MIB, cpus=1 + i % 2)
                      for i in range(start, min(n_tasks, start + 5000))])
        inst = register(s)
        s.redis.config_resetstat()
        claim(s, "w1", inst, n=5)
        stats = s.redis.info("commandstats")
        return sum(v["calls"] for k, v in stats.items()
                   if k not in ("cmdstat_evalsha", "cmdstat_info", "cmdstat_config|resetstat"))

    shapes, n = 10, 5  # mem in 5 sizes x cpus in 2; claims of 5 tasks
    bound = n * (2 * shapes + 16)  # per task: a ZRANGE and an HGET per shape, + fixed
    small = commands_per_claim(500, store.queue + "s")
    large = commands_per_claim(20_000, store.queue + "l")
    assert small <= bound and large <= bound, (small, large, bound)


def test_stale_completion_is_rejected_and_recorded(store: Store) -> None:
    store.submit([spec("x")])
    inst = register(store, lease_ms=100)
    [c] = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                      lease_ms=100)
    time.sleep(0.15)
    assert store.reap() == 1  # lease expired: back to the queue
    inst2 = register(store, "w2")
    [c2] = store.claim("w2", inst2, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                       lease_ms=LEASE)
    assert c2.task_id == c.task_id and c2.token != c.token and c2.attempt == 2
    assert store.complete(c.task_id, c.token, {"exit_code": 0, "host": "old"}) is False
    assert store.fail(c.task_id, c.token, "late", {}) == "stale"
    assert store.complete(c2.task_id, c2.token, {"exit_code": 0, "host": "new"}) is True
    assert store.complete(c2.task_id, c2.token, {"exit_code": 0, "host": "again"}) is False
    task = store.task(c.task_id)
    assert task is not None and task["state"] == "succeeded" and task["host"] == "new"
    assert store.counts()["succeeded"] == 1
    assert store.counts()["stale_reports"] == 3
    assert [e["type"] for e in store.events()].count("stale") == 3
    check_counters(store)


def test_renew_extends_leases_and_reports_lost_ones(store: Store) -> None:
    store.submit([spec("a"), spec("b")])
    inst = register(store)
    claims = store.claim("w1", inst, free_mem=GIB, free_cpus=2, free_gpus=0, max_count=2,
                         lease_ms=200)
    store.cancel([claims[1].task_id])
    time.sleep(0.1)
    lost = store.renew("w1", inst, [(c.task_id, c.token) for c in claims], lease_ms=5000,
                       info={"x": 1})
    assert lost == [claims[1].task_id]
    time.sleep(0.2)
    assert store.reap() == 0  # the renewed lease did not expire
    assert store.task(claims[0].task_id)["state"] == "running"  # type: ignore[index]
    check_counters(store)


def test_only_the_registered_instance_may_act(store: Store) -> None:
    inst = register(store, lease_ms=LEASE)
    with pytest.raises(NameTakenError):
        register(store)  # a second live process with the same name
    with pytest.raises(NotOwnerError):
        store.renew("w1", "someone-else", [], lease_ms=LEASE, info={})
    with pytest.raises(NotOwnerError):
        store.claim("w1", "someone-else", free_mem=1, free_cpus=1, free_gpus=0, max_count=1,
                    lease_ms=LEASE)
    store.deregister_worker("w1", inst)
    register(store)  # a stopped name can be taken


def test_restarted_worker_gets_back_its_leases(store: Store) -> None:
    store.submit([spec("a"), spec("b")])
    inst = register(store, lease_ms=100)
    claims = store.claim("w1", inst, free_mem=GIB, free_cpus=2, free_gpus=0, max_count=2,
                         lease_ms=100)
    time.sleep(0.15)  # the old owner is dead (no heartbeat within its lease)
    inst2 = uuid.uuid4().hex
    leases = store.register_worker("w1", inst2, lease_ms=LEASE, info={}, fields={})
    assert sorted((lease.claim for lease in leases), key=str) == sorted(claims, key=str)
    held = {lease.claim.task_id: lease.claim.token for lease in leases}
    # the new owner renews what it re-adopts under the same tokens ...
    assert store.renew("w1", inst2, [("1.1", held["1.1"])], lease_ms=LEASE, info={}) == []
    # ... and gives back, fenced, what is gone
    assert store.requeue("1.2", held["1.2"], "task process gone") == "requeued"
    assert claim(store, "w1", inst2) == ["1.2"]
    check_counters(store)


def test_renew_retakes_a_task_reaped_while_nobody_claimed_it(store: Store) -> None:
    """A partitioned worker whose lease was reaped keeps its running copy if the task
    is still queued when it reconnects: it is taken back, not run twice."""
    store.submit([spec("long")])
    inst = register(store, lease_ms=100)
    [c] = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                      lease_ms=100)
    time.sleep(0.15)
    assert store.reap(lock_ms=1) == 1 and store.counts()["queued"] == 1
    assert store.renew("w1", inst, [(c.task_id, c.token)], lease_ms=LEASE, info={}) == []
    task = store.task(c.task_id)
    assert task is not None and task["state"] == "running" and task["token"] == c.token
    assert store.complete(c.task_id, c.token, {}) is True
    check_counters(store)


def test_retry_delay_backs_off(store: Store) -> None:
    store.submit([spec("flaky", retries=2, retry_delay=0.3)])
    inst = register(store)
    [c] = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                      lease_ms=LEASE)
    assert store.fail(c.task_id, c.token, "boom", {}, retry_delay=0.3) == "retry"
    assert store.counts()["queued"] == 1
    assert claim(store, "w1", inst) == []  # still waiting out its delay
    time.sleep(0.35)
    [c2] = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                       lease_ms=LEASE)
    assert store.fail(c2.task_id, c2.token, "boom", {}, retry_delay=0.3) == "retry"
    time.sleep(0.35)
    assert claim(store, "w1", inst) == []  # the second delay is twice as long
    time.sleep(0.35)
    assert claim(store, "w1", inst) == ["1.1"]
    store.submit([spec("waits")], allow_duplicates=True)
    check_counters(store)


def test_cancel_a_delayed_retry(store: Store) -> None:
    store.submit([spec("flaky", retries=1)])
    inst = register(store)
    [c] = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                      lease_ms=LEASE)
    store.fail(c.task_id, c.token, "boom", {}, retry_delay=0.1)
    assert store.cancel(["1.1"]) == 1
    time.sleep(0.15)
    assert claim(store, "w1", inst) == []
    check_counters(store)


def test_failure_is_retried_elsewhere_first(store: Store) -> None:
    store.submit([spec("flaky", retries=2), spec("other")])
    a, b = register(store, "wa"), register(store, "wb")
    [c] = store.claim("wa", a, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                      lease_ms=LEASE)
    assert store.fail(c.task_id, c.token, "exit code 1", {"exit_code": 1}) == "retry"
    # wa failed it and wb is alive, so wa is given the other task
    assert claim(store, "wa", a) == ["1.2"]
    [c2] = store.claim("wb", b, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                       lease_ms=LEASE)
    assert c2.task_id == "1.1"
    assert store.fail(c2.task_id, c2.token, "exit code 1", {}) == "retry"
    # it failed on both: either may run it now rather than leaving it stranded
    [c3] = store.claim("wa", a, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                       lease_ms=LEASE)
    assert store.fail(c3.task_id, c3.token, "exit code 1", {}) == "failed"
    task = store.task("1.1")
    assert task is not None and task["state"] == "failed" and task["fails"] == "3"
    assert store.failed_task_ids() == ["1.1"]
    assert store.retry(["1.1"]) == 1
    assert store.counts()["queued"] == 1 and store.failed_task_ids() == []
    check_counters(store)


def test_reap_gives_up_on_a_task_that_keeps_losing_its_worker(store: Store) -> None:
    store.submit([spec("killer")])
    for i in range(3):
        inst = register(store, f"w{i}", lease_ms=50)
        assert claim(store, f"w{i}", inst, lease_ms=50) == ["1.1"]
        time.sleep(0.08)
        assert store.reap(max_lost=2, lock_ms=1) == 1
    task = store.task("1.1")
    assert task is not None and task["state"] == "failed"
    assert "lost its worker 3 times" in task["reason"]
    check_counters(store)


def test_reap_lock_lets_one_reaper_through(store: Store) -> None:
    assert store.reap(lock_ms=5000) == 0
    assert store.reap(lock_ms=5000) == -1


def test_cancel_queued_and_running(store: Store) -> None:
    store.submit([spec("a"), spec("b"), spec("c")])
    inst = register(store)
    [c] = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                      lease_ms=LEASE)
    assert store.cancel(["1.1", "1.2"]) == 2
    assert store.cancel(["1.1"]) == 0  # already finished: left as it is
    assert store.complete(c.task_id, c.token, {}) is False
    assert claim(store, "w1", inst, n=5) == ["1.3"]
    assert store.retry(["1.2"]) == 1
    check_counters(store)


def test_requeue_with_learned_memory_moves_shape(store: Store) -> None:
    store.submit([spec("grows", mem=100 * MIB)])
    inst = register(store)
    [c] = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                      lease_ms=LEASE)
    assert store.requeue(c.task_id, c.token, "preempted", counter="preempts",
                         new_mem=3 * GIB)
    task = store.task(c.task_id)
    assert task is not None and task["mem"] == str(3 * GIB)
    assert task["declared_mem"] == str(100 * MIB) and task["preempts"] == "1"
    assert task["shape"] == shape_of(3 * GIB, 1, 0)
    assert claim(store, "w1", inst, mem=2 * GIB) == []
    assert claim(store, "w1", inst, mem=4 * GIB) == ["1.1"]
    check_counters(store)


def test_random_transitions_keep_counters_exact(store: Store) -> None:
    rng = random.Random(7)
    store.submit([spec(f"t{i}", priority=rng.randint(-3, 3), mem=rng.choice([0, GIB]),
                       retries=rng.randint(0, 2)) for i in range(60)])
    inst = register(store)
    held: dict[str, str] = {}
    for _ in range(300):
        op = rng.random()
        if op < 0.35:
            for c in store.claim("w1", inst, free_mem=4 * GIB, free_cpus=4, free_gpus=0,
                                 max_count=rng.randint(1, 3), lease_ms=LEASE):
                held[c.task_id] = c.token
        elif held and op < 0.6:
            tid = rng.choice(sorted(held))
            store.complete(tid, held.pop(tid), {"exit_code": 0})
        elif held and op < 0.75:
            tid = rng.choice(sorted(held))
            store.fail(tid, held.pop(tid), "boom", {})
        elif held and op < 0.85:
            tid = rng.choice(sorted(held))
            store.requeue(tid, held.pop(tid), "give back")
        elif op < 0.92:
            store.cancel([f"1.{rng.randint(1, 60)}"])
        else:
            store.retry(store.failed_task_ids()[:3])
    check_counters(store)


def test_custom_resources_are_enforced_by_claim(store: Store) -> None:
    store.submit([spec("a", resources=(("license", 1),), priority=5),
                  spec("b", resources=(("license", 1),), priority=5),
                  spec("plain")])
    inst = register(store)
    got = [c.task_id for c in store.claim("w1", inst, free_mem=GIB, free_cpus=8, free_gpus=0,
                                          max_count=10, lease_ms=LEASE,
                                          free_resources={"license": 1})]
    assert got == ["1.1", "1.3"]  # one license: one licensed task, and the plain one
    assert claim(store, "w1", inst) == []  # a worker without the resource gets none
    got = [c.task_id for c in store.claim("w1", inst, free_mem=GIB, free_cpus=8, free_gpus=0,
                                          max_count=10, lease_ms=LEASE,
                                          free_resources={"license": 3})]
    assert got == ["1.2"]
    check_counters(store)


def test_api_submissions_skip_dedup_and_can_join_a_job(store: Store) -> None:
    first = store.submit([spec("same"), spec("same")], dedup=False)
    assert first.new == 2 and first.task_ids == ["1.1", "1.2"]
    assert store.redis.hlen(store.key("dedup")) == 0  # nothing recorded: no unbounded growth
    more = store.submit([spec("same"), spec("other", priority=3)], dedup=False, job_id="1")
    assert more.job_id == "1" and more.task_ids == ["1.3", "1.4"]
    job = store.job("1")
    assert job is not None and job.n_tasks == 4 and job.counts["queued"] == 4
    inst = register(store)
    assert claim(store, "w1", inst, n=4) == ["1.4", "1.1", "1.2", "1.3"]  # priority, then age
    with pytest.raises(NoJobError):
        store.submit([spec("x")], dedup=False, job_id="7")
    assert store.job_ids() == ["1"] and store.counts()["running"] == 4
    check_counters(store)


def test_payloads_travel_with_the_submission(store: Store) -> None:
    key = store.payload_key("p1")
    result = store.submit([TaskSpec(cmd="f", kind="python", payload=key)], dedup=False,
                          payloads={key: b"\x80pickle"})
    assert result.new == 1 and store.get_payloads([key]) == [b"\x80pickle"]
    other = store.payload_key("p2")
    with pytest.raises(NoJobError):  # a refused submission leaves no payload behind
        store.submit([TaskSpec(cmd="f", kind="python", payload=other)], dedup=False,
                     job_id="99", payloads={other: b"x"})
    assert store.get_payloads([other]) == [None]


def test_queue_default_retries_apply_to_tasks_without_their_own(store: Store) -> None:
    store.set_config(default_retries=2)
    store.submit([spec("inherits"), spec("own", retries=0)])
    assert [store.redis.hget(store.key("task", t), "retries") for t in ("1.1", "1.2")] \
        == ["2", "0"]


def test_claim_says_when_the_queue_is_drained(store: Store) -> None:
    """A claim's ``drained`` flag: nothing ready of any shape and no retry waiting
    out its delay, so a worker need not claim again until a wake."""
    inst = register(store)
    store.submit([spec("a", retries=1), spec("b", mem=128 * GIB)], job_name="j")
    first = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                        lease_ms=LEASE)
    assert [c.task_id for c in first] == ["1.1"]
    assert not first.drained  # 1.2 is still there, even if it fits nowhere here
    store.cancel(["1.2"])
    assert store.fail("1.1", first[0].token, "boom", {}, retry_delay=60) == "retry"
    waiting = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                          lease_ms=LEASE)
    assert list(waiting) == [] and not waiting.drained  # a retry is waiting out its delay
    store.cancel(["1.1"])
    empty = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                        lease_ms=LEASE)
    assert list(empty) == [] and empty.drained
    store.submit([spec("c")], job_name="k")
    again = store.claim("w1", inst, free_mem=GIB, free_cpus=1, free_gpus=0, max_count=1,
                        lease_ms=LEASE)
    assert [c.task_id for c in again] == ["2.1"] and again.drained
