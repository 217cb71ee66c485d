"""The learning loop's stream side: reward join, next-best-actions, the propensity-log outbox.

Runs inside a batch, after the user-state fold, and writes into the batch's
Redis transaction (``{p}`` is ``key_prefix``):

- ``{p}join:{partition}``   hash decision_id → open decision (JSON), per events partition
- ``{p}decision:{id}``      a computed decision until it is shown (or expires)
- ``{p}nba:{user_id}``      docs/contracts.md's next-best-action; ``nba:__default__`` too
- ``{p}outbox:{partition}`` list of closed decisions' log records not yet on Kafka

Publishing the log, in order: (1) closed decisions leave ``join:*`` and enter
``outbox:*`` in the batch's transaction; (2) after it, the outbox is sent to
``loopwise.propensity-log`` partition = events partition, and the broker's
acknowledgement awaited; (3) the sent records are trimmed from the outbox.
A crash before (3) leaves sent records in the outbox: before a partition's
outbox is published for the first time, the records already at the tail of its
log partition are dropped from it. So a closed decision is logged exactly
once, and none is lost.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio.client import Pipeline

from loopwise.config import Settings
from loopwise.streams.catalog import Catalog
from loopwise.streams.decisions import DEFAULT_USER, DecisionMaker, nba_json
from loopwise.streams.decoding import Event
from loopwise.streams.redis_store import RedisStore
from loopwise.streams.reward_join import Decision, JoinChanges, OpenDecision, RewardJoin
from loopwise.streams.user_state import UserState

log = logging.getLogger("loopwise.loop")

LogSink = Callable[[list[tuple[int, bytes, bytes]]], Awaitable[None]]
LogTail = Callable[[int, int], Awaitable[set[str]]]


@dataclass(slots=True)
class LoopBatch:
    """The loop's share of one batch's transaction."""

    join: JoinChanges = field(default_factory=JoinChanges)
    decisions: list[Decision] = field(default_factory=list)
    erased_users: list[str] = field(default_factory=list)
    default: Decision | None = None
    records: dict[int, list[bytes]] = field(default_factory=dict)
    last_event: dict[str, str] = field(default_factory=dict)  # decision_id -> user's last event

    def counters(self) -> Counter[str]:
        counts = Counter(self.join.counts)
        counts["decisions_made"] += len(self.decisions)
        counts["decisions_opened"] += len(self.join.opened)
        counts["decisions_closed"] += len(self.join.closed)
        return counts


class LearningLoop:
    """Join + decisions for the partitions this worker owns."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        maker: DecisionMaker,
        join: RewardJoin,
        catalog: Catalog,
        send_log: LogSink,
        log_tail: LogTail,
    ) -> None:
        self.settings = settings
        self.store = store
        self.maker = maker
        self.join = join
        self.catalog = catalog
        self.send_log = send_log
        self.log_tail = log_tail
        self.partitions: set[int] = set()
        self._recovered: set[int] = set()

    def key(self, *parts: str) -> str:
        return self.settings.key(*parts)

    async def own(self, partitions: Iterable[int]) -> None:
        """Load the open decisions of newly owned partitions."""
        new = set(partitions) - self.partitions
        for partition in sorted(new):
            raw = await self.store.client.hgetall(self.key("join", str(partition)))
            self.join.load(OpenDecision.from_json(v) for v in raw.values())
            self.partitions.add(partition)
        if new:
            log.info("owning partitions %s: %d open decisions", sorted(new), len(self.join.open))

    def forget_memory(self) -> None:
        """Drop the in-memory join; the next batch reloads it from Redis (after a failure)."""
        self.disown(set(self.partitions))

    def disown(self, partitions: Iterable[int]) -> None:
        gone = set(partitions) & self.partitions
        self.join.drop([i for i, d in self.join.open.items() if d.partition in gone])
        self.partitions -= gone
        self._recovered -= gone

    async def stage(
        self,
        events: list[tuple[Event, int]],
        states: Mapping[str, UserState | None],
        now_ms: int,
        items: Mapping[str, Mapping[str, object]],
    ) -> LoopBatch:
        """Join the batch's events, close due decisions, decide for every touched user.

        ``items`` are the features of the batch's own item events (in Redis only once
        the batch's transaction ran), so its decisions already see them.
        """
        await self.own({p for _, p in events})
        await self.catalog.refresh(self.store.client, self.key("catalog"))
        self.catalog.update(items)
        batch = LoopBatch()
        shown = sorted({str(e.raw["decision_id"]) for e, _ in events if e.raw.get("decision_id")})
        decisions: dict[str, Decision] = {}
        if shown:
            stored = await self.store.client.mget([self.key("decision", i) for i in shown])
            decisions = {i: Decision.from_json(v) for i, v in zip(shown, stored, strict=True) if v}
        user_events = [(e, p) for e, p in events if e.type != "item"]
        self.join.apply(user_events, decisions, batch.join, now_ms)
        self.join.close_due(now_ms, batch.join)
        self._collect_records(batch)

        if self.catalog.actions:
            latest_context: dict[str, dict[str, Any]] = {}
            latest_event: dict[str, str] = {}
            for event, _ in user_events:
                latest_event[event.user_id or ""] = event.event_id
                if event.raw.get("context"):
                    latest_context[event.user_id or ""] = event.raw["context"]
            for user_id, state in states.items():
                if state is None:
                    batch.erased_users.append(user_id)
                    continue
                context = latest_context.get(user_id, {})
                decision = self.maker.decide(user_id, state, context, self.catalog.actions, now_ms)
                batch.decisions.append(decision)
                batch.last_event[decision.decision_id] = latest_event.get(user_id, "")
            batch.default = self.maker.default_decision(self.catalog.actions, now_ms)
        return batch

    async def tick(self, now_ms: int) -> LoopBatch:
        """Between batches: close decisions whose wall-clock window ended; refresh the default."""
        await self.catalog.refresh(self.store.client, self.key("catalog"))
        batch = LoopBatch()
        self.join.close_due(now_ms, batch.join)
        self._collect_records(batch)
        if self.catalog.actions:
            batch.default = self.maker.default_decision(self.catalog.actions, now_ms)
        return batch

    def _collect_records(self, batch: LoopBatch) -> None:
        for open_decision in batch.join.closed:
            record = orjson.dumps(self.join.record(open_decision))
            batch.records.setdefault(open_decision.partition, []).append(record)

    def write(self, pipe: Pipeline, batch: LoopBatch) -> None:
        """Add the loop's changes to the batch's transaction."""
        window_s = self.settings.attribution_window_ms // 1000 + 1
        ttl = self.settings.nba_ttl_s
        for decision_id in batch.join.updated:
            open_decision = self.join.open[decision_id]
            pipe.hset(
                self.key("join", str(open_decision.partition)), decision_id, open_decision.to_json()
            )
        for open_decision in batch.join.closed:
            join_key = self.key("join", str(open_decision.partition))
            pipe.hdel(join_key, open_decision.decision.decision_id)
            pipe.delete(self.key("decision", open_decision.decision.decision_id))
        for decision_id in batch.join.dropped:
            pipe.delete(self.key("decision", decision_id))
            for owned in self.partitions:
                pipe.hdel(self.key("join", str(owned)), decision_id)
        for partition_id, records in batch.records.items():
            pipe.rpush(self.key("outbox", str(partition_id)), *records)
        for decision in batch.decisions:
            pipe.set(
                self.key("decision", decision.decision_id), decision.to_json(), ex=ttl + window_s
            )
            extra = {"last_event_id": batch.last_event.get(decision.decision_id)}
            pipe.set(self.key("nba", decision.user_id), nba_json(decision, extra), ex=ttl)
        for user_id in batch.erased_users:
            pipe.delete(self.key("nba", user_id))
        if batch.default is not None:
            pipe.set(self.key("nba", DEFAULT_USER), nba_json(batch.default))

    async def publish_outbox(self) -> int:
        """Send every owned partition's outbox to the propensity log; the number sent."""
        sent = 0
        client = self.store.client
        for partition in sorted(self.partitions):
            key = self.key("outbox", str(partition))
            pending = await client.lrange(key, 0, -1)
            if not pending:
                self._recovered.add(partition)
                continue
            skip = 0
            if partition not in self._recovered:
                on_log = await self.log_tail(partition, len(pending))
                while skip < len(pending) and orjson.loads(pending[skip])["decision_id"] in on_log:
                    skip += 1
                if skip:
                    log.warning("outbox %d: %d records were already on the log", partition, skip)
                self._recovered.add(partition)
            records = [
                (partition, str(orjson.loads(raw)["user_id"]).encode(), _as_bytes(raw))
                for raw in pending[skip:]
            ]
            if records:
                await self.send_log(records)
            await client.ltrim(key, len(pending), -1)
            sent += len(records)
        return sent


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
