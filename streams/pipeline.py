"""One batch of consumed messages → dead letters, user state, counters.

The commit path of a batch, in order (the offsets are acked by the caller only
after ``process`` returned, so a crash anywhere replays the batch):

1. decode and validate every message (pure); a refused one becomes a
   dead-letter record;
2. drop events already applied: by an earlier batch (idempotency keys in
   Redis) or earlier in this batch;
3. read the touched users' hashes and the categories of the touched items;
4. fold the events into the states (pure, ``streams.user_state``);
5. send the dead letters to Kafka and wait for the broker's acknowledgement;
6. write states, catalog entries, idempotency keys and counters in one Redis
   transaction.

A replayed batch re-sends its dead letters (at-least-once) and counts its
applied events as duplicates; nothing is applied twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import orjson
from redis.asyncio.client import Pipeline

from loopwise.config import Settings
from loopwise.streams.deadletter import Source, deadletter_record
from loopwise.streams.decoding import Event, Rejection, decode
from loopwise.streams.loop import LearningLoop, LoopBatch
from loopwise.streams.redis_store import RedisStore
from loopwise.streams.user_state import StateRules, UserState, apply_event, group_by_user


@dataclass(frozen=True, slots=True)
class Message:
    """A consumed Kafka record, whatever client read it."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int


DeadLetterSink = Callable[[list[tuple[bytes | None, bytes]]], Awaitable[None]]


@dataclass(slots=True)
class BatchReport:
    """What one batch did; the counters are also added to ``{prefix}stats``."""

    counters: Counter[str] = field(default_factory=Counter)
    accepted: list[Event] = field(default_factory=list)
    touched_users: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Triage:
    events: list[Event]
    partitions: list[int]  # of each event
    deadletters: list[tuple[bytes | None, bytes]]
    counters: Counter[str]


def triage(messages: Sequence[Message], max_bytes: int) -> Triage:
    """Steps 1 and the in-batch half of 2: decode, validate, drop in-batch repeats."""
    counters: Counter[str] = Counter(consumed=len(messages))
    events: list[Event] = []
    partitions: list[int] = []
    deadletters: list[tuple[bytes | None, bytes]] = []
    seen: set[str] = set()
    for message in messages:
        result = decode(message.value, max_bytes)
        if isinstance(result, Rejection):
            source = Source(message.topic, message.partition, message.offset)
            deadletters.append((message.key, deadletter_record(result, source, message.value)))
            counters["deadlettered"] += 1
            counters["deadletter:" + result.reason] += 1
        elif result.event_id in seen:
            counters["duplicates"] += 1
        else:
            seen.add(result.event_id)
            events.append(result)
            partitions.append(message.partition)
    return Triage(events, partitions, deadletters, counters)


class UserStatePipeline:
    """Applies batches to Redis; shared by the Faust worker and the benchmarks."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        send_deadletters: DeadLetterSink,
        loop: LearningLoop | None = None,
    ):
        self.settings = settings
        self.store = store
        self.send_deadletters = send_deadletters
        self.loop = loop
        self.rules = StateRules(
            recent_items=settings.recent_items,
            affinity_half_life_ms=settings.affinity_half_life_ms,
            affinity_weights=dict(settings.affinity_weights),
        )

    async def process(self, messages: Sequence[Message]) -> BatchReport:
        """Apply one batch (steps 1-6); on failure nothing of it is in Redis, so retry it.

        The learning loop's closed decisions are then in its outbox: call
        ``loop.publish_outbox()`` after this returns.
        """
        try:
            return await self._process(messages)
        except Exception:
            if self.loop is not None:
                self.loop.forget_memory()  # its in-memory join ran ahead of Redis
            raise

    async def _process(self, messages: Sequence[Message]) -> BatchReport:
        batch = triage(messages, self.settings.max_event_bytes)
        counters = batch.counters
        applied = await self.store.already_applied([e.event_id for e in batch.events])
        fresh_with_partition = [
            (e, p)
            for e, p in zip(batch.events, batch.partitions, strict=True)
            if e.event_id not in applied
        ]
        fresh = [e for e, _ in fresh_with_partition]
        counters["duplicates"] += len(batch.events) - len(fresh)
        counters["accepted"] += len(fresh)

        catalog = {
            e.item_id: {**e.raw["features"], "active": e.raw.get("active", True)}
            for e in fresh
            if e.type == "item"
        }
        self.store.remember_catalog(catalog)
        by_user = group_by_user(fresh)
        states = await self.store.load_users(by_user)
        categories = await self.store.categories({e.item_id for e in fresh if e.type != "item"})
        users: dict[str, UserState | None] = {}
        replaced: set[str] = set()
        for user_id, events in by_user.items():
            state: UserState | None = states[user_id]
            for event in events:
                if not event.consent:
                    counters["no_consent"] += 1
                    state = None  # erase what we had and store nothing of this event
                    continue
                if state is None:
                    state = UserState()
                    replaced.add(user_id)
                apply_event(state, event, categories.get(event.item_id), self.rules)
            users[user_id] = state

        loop_batch = None
        if self.loop is not None:
            now_ms = int(time.time() * 1000)
            loop_batch = await self.loop.stage(fresh_with_partition, users, now_ms, catalog)
            counters.update(loop_batch.counters())

        if batch.deadletters:
            await self.send_deadletters(batch.deadletters)
        counters["batches"] += 1
        await self.store.commit(
            users=users,
            replaced=replaced,
            catalog={i: orjson.dumps(f) for i, f in catalog.items()},
            applied_ids=[e.event_id for e in fresh],
            counters=counters,
            extra=None if loop_batch is None or self.loop is None else self._writer(loop_batch),
        )
        return BatchReport(counters, fresh, set(users))

    def _writer(self, loop_batch: LoopBatch) -> Callable[[Pipeline], None]:
        loop = self.loop
        assert loop is not None
        return lambda pipe: loop.write(pipe, loop_batch)
