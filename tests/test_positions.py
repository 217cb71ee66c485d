"""Partition positions: redeliveries recognised by offset, gaps that Redis lost found.

The store here keeps what Redis would (positions, applied event ids) in memory; the
integration of the same rules with a real Redis and a real broker is in
``tests/test_redis_durability_integration.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from loopwise.config import load_settings
from loopwise.streams.catalog import Catalog
from loopwise.streams.checkpoint import Checkpoint
from loopwise.streams.errors import PartitionGap
from loopwise.streams.pipeline import Message, Pipeline
from loopwise.streams.plan import BatchPlan, Inputs, Reads
from loopwise.streams.redis_store import event_digest


class MemoryStore:
    """Positions and idempotency marks as Redis holds them; ``forget_ids`` plays an expired
    dedupe window."""

    def __init__(self) -> None:
        self.stored_positions: dict[int, int] = {}
        self.applied: set[str] = set()
        self.plans: list[BatchPlan] = []

    async def positions(self, partitions: Any) -> dict[int, int]:
        return {p: self.stored_positions[p] for p in partitions if p in self.stored_positions}

    async def read(self, reads: Reads) -> Inputs:
        return Inputs(
            applied={e for e in reads.event_ids if e in self.applied},
            positions={p: o for p, o in self.stored_positions.items() if p in reads.positions},
        )

    async def commit(self, plan: BatchPlan) -> None:
        self.plans.append(plan)
        self.applied.update(plan.applied_ids)
        self.stored_positions.update(plan.positions)


def pipeline_on(store: MemoryStore, **settings: Any) -> tuple[Pipeline, list[bytes]]:
    dead: list[bytes] = []

    async def deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
        dead.extend(v for _, v in records)

    s = load_settings(decisions=False, **settings)
    return Pipeline(s, store, Checkpoint(store, deadletters), Catalog()), dead  # type: ignore[arg-type]


def message(offset: int, partition: int = 0, value: bytes | None = None) -> Message:
    body = {"event_id": f"e{partition}-{offset}", "type": "view", "user_id": "u1",
            "item_id": "i1", "timestamp": 1000 + offset}  # fmt: skip
    raw = orjson.dumps(body) if value is None else value
    return Message(b"u1", raw, "events", partition, offset)


def run(pipeline: Pipeline, messages: list[Message]) -> Any:
    return asyncio.run(pipeline.process(messages))


def test_a_redelivered_batch_is_recognised_by_offset_even_after_the_dedupe_window() -> None:
    store = MemoryStore()
    batch = [message(0), message(1, value=b"{not json"), message(2)]
    first = run(pipeline_on(store)[0], batch)
    assert first.counters["accepted"] == 2 and first.counters["deadlettered"] == 1
    assert store.stored_positions == {0: 3}

    store.applied.clear()  # the event ids' window is over
    again, dead = pipeline_on(store)  # a new worker after a crash: loads the positions
    report = asyncio.run(again.process(batch))
    assert report.counters["duplicates"] == 3 and report.counters["redelivered"] == 3
    assert report.counters["consumed"] == 3
    assert report.counters["accepted"] == 0 and report.counters["deadlettered"] == 0
    assert dead == []  # the refused message is not dead-lettered a second time
    assert store.stored_positions == {0: 3}

    older = asyncio.run(again.process(batch[:1]))  # an even older redelivery, alone
    assert older.counters["redelivered"] == 1
    assert store.stored_positions == {0: 3}  # the position never goes back


def test_a_batch_that_straddles_the_position_applies_only_what_is_new() -> None:
    store = MemoryStore()
    pipeline, _ = pipeline_on(store)
    run(pipeline, [message(0), message(1)])
    report = run(pipeline_on(store)[0], [message(0), message(1), message(2), message(3, 1)])
    assert report.counters["redelivered"] == 2
    assert report.counters["accepted"] == 2
    assert store.stored_positions == {0: 3, 1: 4}


def test_an_event_sent_twice_at_another_offset_is_a_duplicate_by_its_event_id() -> None:
    store = MemoryStore()
    pipeline, _ = pipeline_on(store)
    run(pipeline, [message(0)])
    resent = Message(b"u1", message(0).value, "events", 0, 1)  # same event, next offset
    report = run(pipeline, [resent])
    assert report.counters["duplicates"] == 1 and report.counters["redelivered"] == 0
    assert store.stored_positions == {0: 2}


def test_a_batch_beyond_the_stored_position_is_a_gap_and_writes_nothing() -> None:
    store = MemoryStore()
    run(pipeline_on(store)[0], [message(0), message(1)])
    pipeline, _ = pipeline_on(store)
    plans = len(store.plans)
    with pytest.raises(PartitionGap) as gap:
        run(pipeline, [message(5), message(6)])
    assert (gap.value.partition, gap.value.start, gap.value.end) == (0, 2, 5)
    assert "offsets 2-4 were acked to Kafka but are not in Redis" in str(gap.value)
    assert len(store.plans) == plans

    # What the worker does next: apply the missing offsets, then the batch.
    run(pipeline, [message(2), message(3), message(4)])
    report = run(pipeline, [message(5), message(6)])
    assert report.counters["accepted"] == 2 and store.stored_positions == {0: 7}


def test_with_recover_gaps_off_a_gap_is_skipped() -> None:
    store = MemoryStore()
    run(pipeline_on(store)[0], [message(0)])
    report = run(pipeline_on(store, recover_gaps=False)[0], [message(5)])
    assert report.counters["accepted"] == 1 and store.stored_positions == {0: 6}


def test_redis_going_back_under_a_running_worker_is_a_gap() -> None:
    store = MemoryStore()
    pipeline, _ = pipeline_on(store)
    run(pipeline, [message(0), message(1), message(2)])
    store.stored_positions[0] = 1  # Redis restarted from an AOF without its last second
    with pytest.raises(PartitionGap) as gap:
        run(pipeline, [message(3)])
    assert (gap.value.start, gap.value.end) == (1, 3)


def test_skip_to_accounts_for_offsets_without_messages() -> None:
    store = MemoryStore()
    run(pipeline_on(store)[0], [message(0)])
    pipeline, _ = pipeline_on(store)
    with pytest.raises(PartitionGap):
        run(pipeline, [message(3)])  # offsets 1-2: transaction markers, say
    pipeline.skip_to(0, 3)  # the worker read them again: the log holds no message there
    assert run(pipeline, [message(3)]).counters["accepted"] == 1
    assert store.stored_positions == {0: 4}


def test_event_digests_are_twelve_stable_bytes() -> None:
    assert len(event_digest("7f3c0e1a-0001")) == 12
    assert event_digest("a") == event_digest("a") != event_digest("b")
    assert event_digest("é" * 256) != event_digest("e" * 256)
