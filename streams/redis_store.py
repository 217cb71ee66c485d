"""The one owner of the worker's Redis keys: what a batch reads, and its transaction.

Key layout (docs/contracts.md; ``{p}`` is ``key_prefix``):

- ``{p}user:{user_id}``      hash of :class:`loopwise.streams.user_state.UserState`
- ``{p}catalog``             hash item_id → JSON features of the latest ``item`` event
- ``{p}seen:{bucket}``       set of applied event_ids; a bucket spans ``dedupe_window_s``
  of wall-clock time and lives two spans, so an id is remembered at least one span
- ``{p}stats``               hash of counters: consumed, accepted, duplicates,
  deadlettered, deadletter:{reason}, no_consent, batches, and the loop's
- ``{p}join:{partition}``    hash decision_id → open decision (JSON), per events partition
- ``{p}decision:{id}``       a computed decision until it is shown (or expires)
- ``{p}nba:{user_id}``       the next-best-action; ``nba:__default__`` too
- ``{p}outbox:{partition}``  list of closed decisions' log records not yet on Kafka

A batch reads once (:meth:`RedisStore.read`, one round trip) and writes once
(:meth:`RedisStore.commit`, one MULTI/EXEC): user hashes, catalog entries,
idempotency keys, counters, the join, decisions, next-best-actions and the
outbox land together or not at all, so a redelivered batch finds its applied
events marked seen and counts them as duplicates. The read-modify-write of
user hashes assumes one writer per user, which the Kafka key (user_id) and one
consumer per partition provide.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis.asyncio as aioredis

from loopwise.config import Settings
from loopwise.streams.decisions import DEFAULT_USER
from loopwise.streams.plan import BatchPlan, Inputs, Reads
from loopwise.streams.reward_join import Decision, OpenDecision
from loopwise.streams.user_state import UserState, text


class RedisStore:
    """Async access to the keys the worker owns."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    @classmethod
    def connect(cls, settings: Settings) -> RedisStore:
        client = aioredis.Redis.from_url(
            settings.redis_url, password=settings.redis_password, decode_responses=False
        )
        return cls(client, settings)

    def key(self, *parts: str) -> str:
        return self.settings.key(*parts)

    def user_key(self, user_id: str) -> str:
        return self.settings.key("user", user_id)

    def _seen_keys(self, now_s: float) -> tuple[str, str]:
        bucket = int(now_s // self.settings.dedupe_window_s)
        return self.key("seen", str(bucket)), self.key("seen", str(bucket - 1))

    # ------------------------------------------------------------------ reads

    async def read(self, reads: Reads, now_s: float | None = None) -> Inputs:
        """Everything ``reads`` asks for, in one round trip (no transaction: one writer)."""
        inputs = Inputs()
        if not (
            reads.event_ids
            or reads.users
            or reads.decisions
            or reads.join_partitions
            or reads.items
            or reads.whole_catalog
        ):
            return inputs
        current, previous = self._seen_keys(time.time() if now_s is None else now_s)
        catalog_key = self.key("catalog")
        async with self.client.pipeline(transaction=False) as pipe:
            if reads.event_ids:
                pipe.smismember(current, reads.event_ids)
                pipe.smismember(previous, reads.event_ids)
            for user_id in reads.users:
                pipe.hgetall(self.user_key(user_id))
            if reads.decisions:
                pipe.mget([self.key("decision", i) for i in reads.decisions])
            for partition in reads.join_partitions:
                pipe.hgetall(self.key("join", str(partition)))
            if reads.items:
                pipe.hmget(catalog_key, reads.items)
            if reads.whole_catalog:
                pipe.hgetall(catalog_key)
            replies = iter(await pipe.execute())
        if reads.event_ids:
            in_current, in_previous = next(replies), next(replies)
            inputs.applied = {
                e
                for e, a, b in zip(reads.event_ids, in_current, in_previous, strict=True)
                if a or b
            }
        for user_id in reads.users:
            inputs.states[user_id] = UserState.from_hash(next(replies))
        if reads.decisions:
            stored = next(replies)
            inputs.decisions = {
                i: Decision.from_json(v) for i, v in zip(reads.decisions, stored, strict=True) if v
            }
        for partition in reads.join_partitions:
            raw = next(replies)
            inputs.joins[partition] = [OpenDecision.from_json(v) for v in raw.values()]
        if reads.items:
            inputs.items = dict(zip(reads.items, next(replies), strict=True))
        if reads.whole_catalog:
            inputs.catalog = next(replies)
        return inputs

    async def outboxes(self, partitions: Iterable[int]) -> dict[int, list[bytes]]:
        """The pending log records of each partition's outbox (one round trip)."""
        owned = sorted(partitions)
        if not owned:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for partition in owned:
                pipe.lrange(self.key("outbox", str(partition)), 0, -1)
            pending = await pipe.execute()
        return dict(zip(owned, pending, strict=True))

    async def trim_outbox(self, partition: int, sent: int) -> None:
        """Drop the first ``sent`` records of a partition's outbox (the broker has them)."""
        await self.client.ltrim(self.key("outbox", str(partition)), sent, -1)

    async def stats(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.key("stats"))
        return {text(k): int(v) for k, v in raw.items()}

    # ----------------------------------------------------------------- writes

    async def commit(self, plan: BatchPlan, now_s: float | None = None) -> None:
        """Write a plan's Redis part in one MULTI/EXEC, in this order: user hashes, catalog,
        idempotency marks, counters, the join, the outbox, decisions, next-best-actions."""
        settings = self.settings
        current, _ = self._seen_keys(time.time() if now_s is None else now_s)
        nba_ttl = settings.nba_ttl_s
        decision_ttl = nba_ttl + settings.attribution_window_ms // 1000 + 1
        async with self.client.pipeline(transaction=True) as pipe:
            for user_id, state in plan.users.items():
                key = self.user_key(user_id)
                if state is None or user_id in plan.replaced:
                    pipe.delete(key)
                if state is None:
                    continue
                # A live state never drops a field, so HSET alone replaces the hash.
                pipe.hset(key, mapping=state.to_hash())  # type: ignore[arg-type]
            if plan.catalog:
                pipe.hset(self.key("catalog"), mapping=plan.catalog)  # type: ignore[arg-type]
            if plan.applied_ids:
                pipe.sadd(current, *plan.applied_ids)
                pipe.expire(current, 2 * settings.dedupe_window_s + 60)
            stats = self.key("stats")
            for name, value in plan.counters.items():
                if value:
                    pipe.hincrby(stats, name, value)
            for partition, entries in plan.join_set.items():
                pipe.hset(self.key("join", str(partition)), mapping=entries)  # type: ignore[arg-type]
            for partition, ids in plan.join_removed.items():
                pipe.hdel(self.key("join", str(partition)), *ids)
            for decision_id in plan.join_dropped:
                for partition in plan.owned_partitions:
                    pipe.hdel(self.key("join", str(partition)), decision_id)
            for partition, records in plan.outbox.items():
                pipe.rpush(self.key("outbox", str(partition)), *records)
            if plan.decisions_removed:
                pipe.delete(*(self.key("decision", i) for i in plan.decisions_removed))
            for decision_id in plan.decisions_superseded:
                pipe.expire(self.key("decision", decision_id), settings.superseded_decision_ttl_s)
            for decision_id, decision in plan.decisions_set.items():
                pipe.set(self.key("decision", decision_id), decision, ex=decision_ttl)
            for user_id, nba in plan.nba_set.items():
                pipe.set(self.key("nba", user_id), nba, ex=nba_ttl)
            if plan.nba_removed:
                pipe.delete(*(self.key("nba", u) for u in plan.nba_removed))
            if plan.default_nba is not None:
                pipe.set(self.key("nba", DEFAULT_USER), plan.default_nba)
            await pipe.execute()

    async def forget(self, user_id: str) -> int:
        """Erase everything stored about one user; the number of keys removed."""
        return int(await self.client.delete(self.user_key(user_id), self.key("nba", user_id)))

    async def close(self) -> None:
        await self.client.aclose()
