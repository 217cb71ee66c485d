"""One learner among the workers: a lease in Redis, the whole propensity log, fenced snapshots.

Every worker decides for the events partitions Kafka gives it, with the last published
model snapshot; exactly one of them at a time also learns. The workers compete for a
lease (``{p}model:lease``: ``SET NX PX``, ``learner_lease_s``, renewed every third of
it); the holder reads **every** partition of
the propensity log with a consumer of its own (assigned, not in a consumer group, so
Kafka never splits the log between workers), from the offsets of the last snapshot,
learns every record once (:class:`loopwise.streams.learner.Learner`) and publishes
snapshots every ``snapshot_interval_s``. A snapshot is written only while the lease is
still the writer's (one Lua script checks it and writes the hash), so a learner that
lost its lease (paused past it, cut off from Redis) cannot overwrite its successor's
model: the learner example count equals the log, with any number of workers, through
any crash or rebalance. Every worker, the learner included, decides with the published
model: every ``model_reload_s`` it reads the snapshot's ``version`` and loads a newer one,
so its model is at most ``snapshot_interval_s`` + ``model_reload_s`` old, the versions it
decides with never go back, and each decision says its policy's version.

When the holder stops cleanly it releases the lease, and another worker takes over at
once; when it dies, after at most ``learner_lease_s``. The successor starts from the last
snapshot: what its predecessor learned after it is learned again, from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from aiokafka import TopicPartition
from prometheus_client import Counter as PromCounter

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.streams.learner import Learner

PARTITIONS_CHECK_S = 60.0  # how often the learner looks for new log partitions
LEARNED = PromCounter("loopwise_learned_total", "propensity-log records learned")

log = logging.getLogger("loopwise.learner")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: lease, model hash; ARGV: token, then field, value, field, value, ...
_FENCED_HSET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1
"""


class LeaseLost(RuntimeError):
    """The learner's lease is another worker's now (or expired): it must stop learning."""


class Lease:
    """A lease in Redis held by one token at a time, with a time to live."""

    def __init__(self, client: aioredis.Redis, key: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = uuid.uuid4().hex
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._fenced_hset = client.register_script(_FENCED_HSET)

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (or renew it if this token does)."""
        if await self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return True
        return await self.renew()

    async def renew(self) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])

    async def hset_if_held(self, key: str, mapping: dict[str, Any]) -> None:
        """HSET ``mapping`` into ``key`` in one script that first checks the lease is held."""
        args: list[Any] = [self.token]
        for field, value in mapping.items():
            args.extend((field, value))
        if not await self._fenced_hset(keys=[self.key, key], args=args):
            raise LeaseLost(f"{self.key} is no longer this worker's: snapshot not written")

    async def holder(self) -> str | None:
        raw = await self.client.get(self.key)
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)


class Learning:
    """The learner role of a worker, and the model its decisions use.

    Decisions always use a published snapshot (``published``: a :class:`Learner` whose
    policies are the decision maker's), reloaded when a newer version is in Redis, here
    and in every other worker alike: the policy versions a worker decides with never go
    back, and a partition that moves to another worker keeps its users' versions (the new
    owner reloads before its first batch). While this worker holds the lease it also
    learns, on policies of its own (``new_learner()``, a clean slate from the last
    snapshot each time it takes the lease), and publishes them."""

    def __init__(
        self,
        settings: Settings,
        published: Learner,
        new_learner: Callable[[], Learner],
        on_loaded: Callable[[], None] = lambda: None,
    ) -> None:
        # One task learns, snapshots and reloads, in turn; decisions are made in a batch's
        # plan, which never awaits: the policies never change under a decision.
        self.settings = settings
        self.published = published
        self.new_learner = new_learner
        self.on_loaded = on_loaded  # after a snapshot was loaded (the maker's popularity)
        self.client = published.client
        self.key = published.key
        self.lease = Lease(self.client, settings.key("model", "lease"), settings.learner_lease_s)
        self.learner: Learner | None = None  # while leading

    async def run(self) -> None:
        """Until cancelled: reload newer snapshots; learn while the lease is this worker's.
        Redis or Kafka failing: logged, tried again after a pause."""
        try:
            while True:
                try:
                    if await self.lease.acquire():
                        await self._lead()
                    else:
                        await self.reload_if_newer()
                        await asyncio.sleep(self.settings.model_reload_s)
                except asyncio.CancelledError:
                    raise
                except LeaseLost as exc:
                    log.warning("%s; this worker stops learning", exc)
                except Exception as exc:  # transient: Redis or Kafka away
                    log.error("learner: %s; trying again", exc, exc_info=exc)
                    await asyncio.sleep(self.settings.model_reload_s)
                finally:
                    self.learner = None
        finally:
            with contextlib.suppress(Exception):  # stopping anyway; the lease expires by itself
                await asyncio.shield(self.lease.release())

    async def reload_if_newer(self) -> bool:
        """Load the published snapshot into the deciding policies if it is newer."""
        stored = await self.client.hget(self.key, "version")
        if stored is None or int(stored) <= self.published.version:
            return False
        raw = await self.client.hgetall(self.key)
        if int(raw.get(b"version", 0)) <= self.published.version:
            return False
        loaded = self.published.load_snapshot(raw, logging.DEBUG)  # every few seconds
        self.on_loaded()
        return loaded

    async def _lead(self) -> None:
        """Hold the lease: learn every log partition from the last snapshot's offsets."""
        learner = self.learner = self.new_learner()
        # the predecessor's last snapshot (the line below says where learning starts)
        learner.load_snapshot(await self.client.hgetall(self.key), logging.DEBUG)
        log.info(
            "this worker learns now (lease %s, %.0f s), from log offsets %s",
            self.lease.key,
            self.settings.learner_lease_s,
            learner.offsets or "the start",
        )
        consumer = kafka_clients.aio_consumer(
            self.settings, **kafka_clients.GROUPLESS, max_poll_records=self.settings.batch_size
        )
        await consumer.start()
        try:
            topic = self.settings.propensity_log_topic
            assigned: set[int] = set()
            renew_every = self.settings.learner_lease_s / 3
            renewed = checked = time.monotonic()
            listed = -math.inf
            while True:
                if time.monotonic() - listed >= PARTITIONS_CHECK_S:  # new ones are read too
                    partitions = await asyncio.to_thread(log_partitions, self.settings)
                    listed = time.monotonic()
                    assigned = await self._assign(consumer, learner, topic, partitions, assigned)
                batches = await consumer.getmany(timeout_ms=500)
                records = [
                    (tp.partition, r.offset, r.value)
                    for tp, rs in sorted(batches.items(), key=lambda kv: kv[0].partition)
                    for r in rs
                ]
                if time.monotonic() - renewed >= renew_every:
                    if not await self.lease.renew():
                        raise LeaseLost(f"{self.lease.key} expired before it was renewed")
                    renewed = time.monotonic()
                if records:
                    LEARNED.inc(learner.learn(records))
                if learner.unsaved and learner.snapshot_due():
                    await learner.snapshot(self.lease)
                if time.monotonic() - checked >= self.settings.model_reload_s:
                    await self.reload_if_newer()  # decide with what was just published
                    checked = time.monotonic()
        finally:
            await consumer.stop()

    @staticmethod
    async def _assign(
        consumer: Any, learner: Learner, topic: str, partitions: set[int], assigned: set[int]
    ) -> set[int]:
        """Every partition of the log, each from the learner's offset."""
        if partitions == assigned:
            return assigned
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            offset = learner.offsets.get(tp.partition)
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
        return partitions


def log_partitions(settings: Settings) -> set[int]:
    """The partitions of the propensity-log topic (blocking: a kafka-python consumer)."""
    consumer = kafka_clients.consumer(settings, **kafka_clients.GROUPLESS)
    try:
        # topics() lists what exists; partitions_for_topic alone could auto-create the topic.
        topic = settings.propensity_log_topic
        partitions = consumer.partitions_for_topic(topic) if topic in consumer.topics() else None
    finally:
        consumer.close()
    if not partitions:
        raise RuntimeError(f"the propensity-log topic {topic!r} does not exist yet")
    return set(partitions)
