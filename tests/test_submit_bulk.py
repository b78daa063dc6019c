"""Bulk submission: the batched submit script keeps every per-task guarantee.

The script handles dedup lookups, ready-set inserts and counters per chunk of
1,000 tasks or per batch; these tests cross chunk boundaries on purpose.
"""

from __future__ import annotations

from test_store import check_counters, claim, register

from distcomp.spec import MIB, TaskSpec
from distcomp.store import Store


def test_duplicates_within_one_batch_get_the_first_id(store: Store) -> None:
    specs = [TaskSpec(cmd=f"t {i % 1500}") for i in range(2500)]
    result = store.submit(specs)
    assert result.new == 1500
    assert result.task_ids[:1500] == [f"1.{i}" for i in range(1, 1501)]
    assert result.task_ids[1500:] == [f"1.{i % 1500 + 1}" for i in range(1500, 2500)]
    check_counters(store)


def test_allow_duplicates_keeps_the_first_dedup_entry(store: Store) -> None:
    first = store.submit([TaskSpec(cmd="a"), TaskSpec(cmd="a")], allow_duplicates=True)
    assert first.new == 2 and first.task_ids == ["1.1", "1.2"]
    again = store.submit([TaskSpec(cmd="a")])
    assert again.new == 0 and again.task_ids == ["1.1"]


def test_many_shapes_across_chunks_claim_in_priority_then_submission_order(
        store: Store) -> None:
    specs = [TaskSpec(cmd=f"t {i}", mem=(i % 3) * 512 * MIB, priority=1 if i == 2222 else 0)
             for i in range(2345)]
    store.submit(specs[:1000])
    store.submit(specs[1000:])
    check_counters(store)
    inst = register(store)
    assert claim(store, "w1", inst, n=4) == ["2.1223", "1.1", "1.2", "1.3"]
    check_counters(store)
