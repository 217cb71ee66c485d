"""A Redis that lost its data is its own kind of failure: never retried, never blamed on a
message; the store notices it through the epoch key in the batch's one read.

No Kafka, no Redis: the store's client is a recording stand-in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from loopwise.config import load_settings
from loopwise.streams.catalog import Catalog
from loopwise.streams.checkpoint import Checkpoint
from loopwise.streams.errors import RedisDataLost, is_transient, retry
from loopwise.streams.pipeline import Message, Pipeline
from loopwise.streams.plan import BatchPlan, Inputs, Reads
from loopwise.streams.rebuild import PartitionRange, _TimeMerge
from loopwise.streams.redis_store import Epoch, RedisStore, url_without_password

SETTINGS = load_settings(
    redis_url="redis://ops:s3cret@10.0.0.5:6380/2", app_id="shop-worker", key_prefix="lw:"
)


def lost() -> RedisDataLost:
    return RedisDataLost("Redis at redis://x lost the state of consumer group 'g'")


# --- classification ---------------------------------------------------------------------


def test_lost_data_is_neither_transient_nor_retried_even_where_everything_else_is() -> None:
    assert not is_transient(lost())
    calls: list[int] = []

    async def work() -> None:
        calls.append(1)
        raise lost()

    for transient_only in (True, False):
        calls.clear()
        with pytest.raises(RedisDataLost):
            asyncio.run(retry(work, "a batch", transient_only=transient_only))
        assert calls == [1]


class LosingStore:
    """Every read finds the epoch gone; records every commit."""

    def __init__(self) -> None:
        self.reads = 0
        self.plans: list[BatchPlan] = []

    async def positions(self, partitions: object) -> dict[int, int]:
        return {}  # no epoch check here: the batch's read finds the loss

    async def read(self, reads: Reads) -> Inputs:
        self.reads += 1
        raise lost()

    async def commit(self, plan: BatchPlan) -> None:
        self.plans.append(plan)


def message(offset: int, value: bytes | None = None) -> Message:
    body = {"event_id": f"e{offset}", "type": "view", "user_id": "u1", "item_id": "i1"}
    raw = orjson.dumps({**body, "timestamp": 1000 + offset}) if value is None else value
    return Message(b"u1", raw, "events", 0, offset)


@pytest.mark.parametrize("size", [1, 2, 13])
def test_process_isolating_reraises_lost_data_at_once_instead_of_bisecting(size: int) -> None:
    store = LosingStore()
    dead: list[tuple[bytes | None, bytes]] = []

    async def deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
        dead.extend(records)

    pipeline = Pipeline(SETTINGS, store, Checkpoint(store, deadletters), Catalog())  # type: ignore[arg-type]
    with pytest.raises(RedisDataLost):
        asyncio.run(pipeline.process_isolating([message(i) for i in range(size)], retry))
    assert store.reads == 1  # no bisection, no second attempt
    assert dead == [] and store.plans == []  # nothing dead-lettered, nothing written


# --- the epoch check in the batch's read ---------------------------------------------------


class RecordingPipe:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    async def __aenter__(self) -> RecordingPipe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, command: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> None:
            self.client.commands.append((command, args))

        return queue

    async def execute(self) -> list[Any]:
        self.client.round_trips += 1
        return [self.client.replies.popleft() for _ in self.client.commands]


class FakeClient:
    """Answers a read pipeline with ``replies``, in order; counts the round trips."""

    def __init__(self, *replies: Any) -> None:
        self.replies = deque(replies)
        self.commands: list[tuple[str, tuple[Any, ...]]] = []
        self.round_trips = 0

    def pipeline(self, transaction: bool = True) -> RecordingPipe:
        self.commands = []
        return RecordingPipe(self)


def store_with(epoch: Epoch | None, *replies: Any) -> tuple[RedisStore, FakeClient]:
    client = FakeClient(*replies)
    return RedisStore(client, SETTINGS, epoch), client  # type: ignore[arg-type]


def test_a_store_that_knows_its_epoch_reads_it_in_the_same_round_trip() -> None:
    epoch = Epoch.new("first_start")
    store, client = store_with(epoch, epoch.to_json(), {b"views": b"2"}, [None])
    inputs = asyncio.run(store.read(Reads(users=["u1"])))
    assert client.round_trips == 1
    assert client.commands[0] == ("get", ("lw:epoch",))
    assert inputs.states["u1"].views == 2


def test_a_tick_that_reads_nothing_still_checks_the_epoch() -> None:
    epoch = Epoch.new("rebuild")
    store, client = store_with(epoch, None)
    with pytest.raises(RedisDataLost):
        asyncio.run(store.read(Reads()))
    assert client.round_trips == 1


def test_a_missing_epoch_says_where_which_group_and_the_way_out_without_the_password() -> None:
    epoch = Epoch.new("first_start")
    store, _ = store_with(epoch, None, {}, [None])
    with pytest.raises(RedisDataLost) as raised:
        asyncio.run(store.read(Reads(users=["u1"])))
    text = str(raised.value)
    assert "\n" not in text
    assert "redis://ops:***@10.0.0.5:6380/2" in text and "s3cret" not in text
    assert "'shop-worker'" in text and "lw:epoch is gone" in text and epoch.id in text
    assert "loopwise rebuild" in text and "loopwise worker --accept-empty-redis" in text


def test_another_epoch_counts_as_lost_data() -> None:
    ours, theirs = Epoch.new("first_start"), Epoch.new("rebuild")
    store, _ = store_with(ours, theirs.to_json(), {}, [None])
    with pytest.raises(RedisDataLost, match=f"now holds {theirs.id} \\(rebuild"):
        asyncio.run(store.read(Reads(users=["u1"])))
    store, _ = store_with(ours, b"not json", {}, [None])
    with pytest.raises(RedisDataLost, match="now holds b'not json'"):
        asyncio.run(store.read(Reads(users=["u1"])))


def test_a_store_without_an_epoch_checks_nothing_as_before() -> None:
    store, client = store_with(None, {b"clicks": b"1"}, [None])
    assert asyncio.run(store.read(Reads())) == Inputs()
    assert client.round_trips == 0
    inputs = asyncio.run(store.read(Reads(users=["u1"])))
    assert [c for c, _ in client.commands] == ["hgetall", "hmget"] and inputs.states[
        "u1"
    ].clicks == 1


def test_epoch_round_trips_through_json_and_refuses_what_is_not_one() -> None:
    epoch = Epoch.new("accept_empty_redis")
    assert Epoch.from_json(epoch.to_json()) == epoch
    assert len(epoch.id) == 32 and epoch.id != Epoch.new("accept_empty_redis").id
    for raw in (b"{", b"[]", b'{"id": "x"}', b'"text"'):
        assert Epoch.from_json(raw) is None
    with pytest.raises(ValueError, match="origin"):
        Epoch.new("whim")


def test_urls_lose_only_their_password() -> None:
    assert url_without_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert url_without_password("rediss://:pw@h:1/0") == "rediss://:***@h:1/0"
    assert url_without_password("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"


# --- the rebuild's ranges and merge order --------------------------------------------------


def test_a_range_counts_what_retention_removed_below_the_earliest_offset() -> None:
    assert (PartitionRange(0, 0, 50).messages, PartitionRange(0, 0, 50).skipped) == (50, 0)
    assert (PartitionRange(1, 20, 50).messages, PartitionRange(1, 20, 50).skipped) == (30, 20)
    # retention passed the committed offset: nothing to read, all the group had read is gone
    assert (PartitionRange(2, 70, 50).messages, PartitionRange(2, 70, 50).skipped) == (0, 50)


def record(partition: int, offset: int, timestamp: int) -> Any:
    return SimpleNamespace(partition=partition, offset=offset, timestamp=timestamp)


def test_partitions_merge_by_timestamp_and_wait_for_a_partition_that_has_not_ended() -> None:
    merge = _TimeMerge(None, {"p0": 10, "p1": 10})  # type: ignore[arg-type,dict-item]
    merge.buffers = {
        "p0": deque([record(0, 0, 100), record(0, 1, 300)]),  # type: ignore[dict-item]
        "p1": deque([record(1, 0, 200)]),  # type: ignore[dict-item]
    }
    taken = merge._take(10)
    # p1 ran dry before p0's 300 and has not ended: its next record may be older than 300
    assert [(r.partition, r.offset) for r in taken] == [(0, 0), (1, 0)]
    merge.exhausted.add("p1")  # type: ignore[arg-type]
    assert [(r.partition, r.offset) for r in merge._take(10)] == [(0, 1)]
    assert merge._take(10) == []
