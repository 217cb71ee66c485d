"""The one owner of the worker's Redis keys: what a batch reads, and its transaction.

Key layout (docs/contracts.md; ``{p}`` is ``key_prefix``):

- ``{p}user:{user_id}``      hash of :class:`loopwise.streams.user_state.UserState`
- ``{p}catalog``             hash item_id → JSON features of the latest ``item`` event
- ``{p}seen:{bucket}``       set of applied event_ids, each as a 12-byte BLAKE2b digest; a
  bucket spans ``dedupe_window_s`` of wall-clock time and lives two spans, so an id is
  remembered at least one span
- ``{p}positions``           hash ``{topic}:{partition}`` -> the next offset to apply: every
  message before it is in Redis (redeliveries are recognised by offset, for ever)
- ``{p}stats``               hash of counters: consumed, accepted, duplicates,
  deadlettered, deadletter:{reason}, no_consent, batches, and the loop's
- ``{p}join:{partition}``    hash decision_id → open decision (JSON), per events partition
- ``{p}decision:{id}``       a computed decision until it is shown (or expires)
- ``{p}itemv:{id}:{version}`` an item version's features, which decisions refer to
- ``{p}nba:{user_id}``       the next-best-action; ``nba:__default__`` too
- ``{p}outbox:{partition}``  list of closed decisions' log records not yet on Kafka
- ``{p}epoch``               JSON :class:`Epoch`: which life of this state Redis holds
- ``{p}forgotten``           hash sha256(user_id)[:32] -> event time of the user's ``forget``

On a Redis Cluster (``redis_cluster``) the keys of the families ``user``, ``seen``,
``positions``, ``stats``, ``join``, ``outbox``, ``decision`` and ``forgotten`` carry the
hash tag of the events partition they belong to (``{p}{p3}:user:u-42``), and the worker
runs one store per partition (:meth:`RedisStore.for_partition`): a batch then holds one
partition's events and its transaction writes one slot; ``model`` and ``model:lease``
share the tag ``{model}``; the other keys (``catalog``, ``nba:*``, ``itemv:*``,
``epoch``) hash as they are.

A batch reads once (:meth:`RedisStore.read`, one round trip) and writes once
(:meth:`RedisStore.commit`, one MULTI/EXEC): user hashes, catalog entries,
idempotency keys, counters, the join, decisions, next-best-actions and the
outbox land together or not at all, with the partitions' positions, so a redelivered
batch is recognised by its offsets (and any event sent twice by its ``event_id``) and
counted as duplicates. The read-modify-write of
user hashes assumes one writer per user, which the Kafka key (user_id) and one
consumer per partition provide.

**The epoch.** Kafka's committed offsets say which events the state in Redis includes; a
Redis that lost its data (restarted without persistence, a lost disk, FLUSHALL) no longer
holds that state, and the worker would go on from the offsets as if nothing happened. So
the state carries an :class:`Epoch`, written when it begins (the worker's first start, a
start with ``--accept-empty-redis``, the end of ``loopwise rebuild``). A store that knows
its epoch checks it in every read (one GET in the same round trip) and raises
:class:`loopwise.streams.errors.RedisDataLost` when it is gone or another one. A store
without one (the benchmarks, the rebuild itself) checks nothing. A loss between a batch's
read and its transaction lets that one batch land in the empty Redis (without an epoch);
the next read stops the worker, and ``loopwise rebuild`` erases such leftovers first.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis

from loopwise.config import Settings
from loopwise.streams.decisions import DEFAULT_USER
from loopwise.streams.errors import RedisDataLost
from loopwise.streams.plan import BatchPlan, Inputs, Reads
from loopwise.streams.reward_join import OpenDecision
from loopwise.streams.user_state import UserState, text

EPOCH_ORIGINS = ("first_start", "accept_empty_redis", "rebuild")


@dataclass(frozen=True, slots=True)
class Epoch:
    """``{p}epoch``: one life of the worker's state in Redis.

    ``id`` is random (32 hex characters), ``created_at_ms`` wall-clock ms, ``origin`` what
    began it: the worker's ``first_start`` (its consumer group had no committed offsets), a
    start with ``--accept-empty-redis``, or a ``rebuild`` from the events topic.
    """

    id: str
    created_at_ms: int
    origin: str

    @classmethod
    def new(cls, origin: str) -> Epoch:
        if origin not in EPOCH_ORIGINS:
            raise ValueError(f"epoch origin {origin!r}: one of {', '.join(EPOCH_ORIGINS)}")
        return cls(uuid.uuid4().hex, int(time.time() * 1000), origin)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Epoch | None:
        """The epoch stored in ``raw``, or None when it is not one (then it is not ours)."""
        try:
            value: Any = orjson.loads(raw)
            return cls(str(value["id"]), int(value["created_at_ms"]), str(value["origin"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created_at_ms / 1000))
        return f"{self.id} ({self.origin}, {created})"


def url_without_password(url: str) -> str:
    """``redis://user:***@host:port/db``: a Redis URL fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def data_lost(settings: Settings, finding: str) -> RedisDataLost:
    """The error (one line) that says Redis lost the worker's data, and the way out."""
    return RedisDataLost(
        f"Redis at {url_without_password(settings.redis_url)} lost the state of consumer "
        f"group {settings.app_id!r}: {finding}. Recompute it from the events topic with "
        "`loopwise rebuild`, or start anew knowingly with `loopwise worker "
        "--accept-empty-redis` (the state Redis holds now becomes the truth)"
    )


class RedisStore:
    """Async access to the keys the worker owns; with ``epoch``, every read checks it."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        epoch: Epoch | None = None,
        partition: int | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.epoch = epoch
        # On a Redis Cluster a batch is one events partition's, and its keys carry the
        # partition's hash tag (``Settings.partition_key``): the store of that partition.
        self.partition = partition
        self.cluster = settings.redis_cluster

    @classmethod
    def connect(cls, settings: Settings, epoch: Epoch | None = None) -> RedisStore:
        """A store on the settings' Redis (URL, ACL user, password, TLS: one client builder)."""
        from loopwise.redis_clients import async_redis_client

        return cls(async_redis_client(settings, decode_responses=False), settings, epoch)

    def for_partition(self, partition: int) -> RedisStore:
        """This store (same client and epoch) for the keys of one events partition."""
        return RedisStore(self.client, self.settings, self.epoch, partition)

    @property
    def epoch_key(self) -> str:
        return self.settings.key("epoch")

    def key(self, *parts: str) -> str:
        return self.settings.key(*parts)

    def pkey(self, *parts: str) -> str:
        """A per-partition family's key: tagged with this store's partition on a cluster."""
        if self.cluster:
            if self.partition is None:
                raise RuntimeError(f"a Redis Cluster store of no partition wrote {parts}")
            return self.settings.partition_key(self.partition, *parts)
        return self.settings.key(*parts)

    def user_key(self, user_id: str) -> str:
        return self.pkey("user", user_id)

    def position_field(self, partition: int) -> str:
        return f"{self.settings.events_topic}:{partition}"

    async def positions(self, partitions: Iterable[int]) -> dict[int, int]:
        """The stored position (next offset to apply) of each partition that has one."""
        wanted = sorted(set(partitions))
        if not wanted:
            return {}
        found = await self.client.hmget(
            self.pkey("positions"), [self.position_field(p) for p in wanted]
        )
        return {p: int(v) for p, v in zip(wanted, found, strict=True) if v is not None}

    def _seen_keys(self, now_s: float) -> tuple[str, str]:
        bucket = int(now_s // self.settings.dedupe_window_s)
        return self.pkey("seen", str(bucket)), self.pkey("seen", str(bucket - 1))

    # ------------------------------------------------------------------ reads

    async def read(self, reads: Reads, now_s: float | None = None) -> Inputs:
        """Everything ``reads`` asks for, in one round trip (no transaction: one writer).

        With an epoch, the round trip also reads ``{p}epoch`` (even when ``reads`` asks for
        nothing) and raises :class:`RedisDataLost` unless it is still ours.
        """
        inputs = Inputs()
        if self.epoch is None and not (
            reads.event_ids
            or reads.positions
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
            if self.epoch is not None:
                pipe.get(self.epoch_key)
            if reads.event_ids:
                digests = [event_digest(e) for e in reads.event_ids]
                pipe.smismember(current, digests)
                pipe.smismember(previous, digests)
            if reads.positions:
                pipe.hmget(
                    self.pkey("positions"), [self.position_field(p) for p in reads.positions]
                )
            for user_id in reads.users:
                pipe.hgetall(self.user_key(user_id))
            if reads.users:
                pipe.hmget(self.pkey("forgotten"), [forgotten_field(u) for u in reads.users])
            if reads.decisions and self.cluster:  # a cluster's pipeline refuses MGET
                for decision_id in reads.decisions:
                    pipe.get(self.pkey("decision", decision_id))
            elif reads.decisions:
                pipe.mget([self.pkey("decision", i) for i in reads.decisions])
            for partition in reads.join_partitions:
                pipe.hgetall(self.pkey("join", str(partition)))
            if reads.items:
                pipe.hmget(catalog_key, reads.items)
            if reads.whole_catalog:
                pipe.hgetall(catalog_key)
            replies = iter(await pipe.execute())
        if self.epoch is not None:
            self._check_epoch(next(replies))
        if reads.event_ids:
            in_current, in_previous = next(replies), next(replies)
            inputs.applied = {
                e
                for e, a, b in zip(reads.event_ids, in_current, in_previous, strict=True)
                if a or b
            }
        if reads.positions:
            inputs.positions = {
                p: int(v) for p, v in zip(reads.positions, next(replies), strict=True) if v
            }
        for user_id in reads.users:
            inputs.states[user_id] = UserState.from_hash(next(replies))
        if reads.users:
            inputs.forgotten = {
                u: int(t) for u, t in zip(reads.users, next(replies), strict=True) if t is not None
            }
        if reads.decisions:
            many = self.cluster  # one GET per decision, else one MGET
            stored = [next(replies) for _ in reads.decisions] if many else next(replies)
            inputs.decisions = {
                i: orjson.loads(v) for i, v in zip(reads.decisions, stored, strict=True) if v
            }
        for partition in reads.join_partitions:
            raw = next(replies)
            inputs.joins[partition] = [OpenDecision.from_json(v) for v in raw.values()]
        if reads.items:
            inputs.items = dict(zip(reads.items, next(replies), strict=True))
        if reads.whole_catalog:
            inputs.catalog = next(replies)
        return inputs

    async def item_versions(self, refs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """The features JSON of item versions (``itemv:{item_id}:{version}``) that exist."""
        wanted = sorted(set(refs))
        if not wanted:
            return {}
        keys = [self.key("itemv", i, v) for i, v in wanted]
        if self.cluster:  # one slot per key
            found = await self.client.mget_nonatomic(keys)  # type: ignore[attr-defined]
        else:
            found = await self.client.mget(keys)
        return {
            ref: raw if isinstance(raw, bytes) else raw.encode()
            for ref, raw in zip(wanted, found, strict=True)
            if raw is not None
        }

    def _check_epoch(self, raw: bytes | None) -> None:
        assert self.epoch is not None
        if raw is None:
            finding = f"its epoch key {self.epoch_key} is gone"
        else:
            found = Epoch.from_json(raw)
            if found is not None and found.id == self.epoch.id:
                return
            what = found.describe() if found is not None else repr(raw[:80])
            finding = f"its epoch key {self.epoch_key} now holds {what}"
        raise data_lost(
            self.settings,
            f"{finding}, while this worker started on epoch {self.epoch.describe()}; "
            "the worker stops without acking the batch",
        )

    async def load_epoch(self) -> Epoch | None:
        """The epoch Redis holds (None when absent or not an epoch)."""
        raw = await self.client.get(self.epoch_key)
        return None if raw is None else Epoch.from_json(raw)

    async def outboxes(self, partitions: Iterable[int]) -> dict[int, list[bytes]]:
        """The pending log records of each partition's outbox (one round trip)."""
        owned = sorted(partitions)
        if not owned:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for partition in owned:
                pipe.lrange(self.pkey("outbox", str(partition)), 0, -1)
            pending = await pipe.execute()
        return dict(zip(owned, pending, strict=True))

    async def trim_outbox(self, partition: int, sent: int) -> None:
        """Drop the first ``sent`` records of a partition's outbox (the broker has them)."""
        await self.client.ltrim(self.pkey("outbox", str(partition)), sent, -1)

    async def stats(self) -> dict[str, int]:
        """The counters (on a cluster: summed over every partition's ``stats``)."""
        totals: dict[str, int] = {}
        for key in await self._family_keys("stats"):
            for k, v in (await self.client.hgetall(key)).items():
                totals[text(k)] = totals.get(text(k), 0) + int(v)
        return totals

    async def _family_keys(self, family: str) -> list[str]:
        """A per-partition family's single key (``stats``, ``forgotten``): the one key, or
        on a cluster every partition's (found with SCAN on every master)."""
        if not self.cluster:
            return [self.key(family)]
        pattern = self.settings.partition_pattern(family)
        return sorted({text(k) async for k in self.client.scan_iter(match=pattern, count=1000)})

    # ----------------------------------------------------------------- writes

    async def commit(self, plan: BatchPlan, now_s: float | None = None) -> None:
        """Write a plan's Redis part in one MULTI/EXEC: user hashes, catalog, idempotency
        marks, positions, counters, the join, the outbox, decisions, item versions and
        next-best-actions land together or not at all.

        On a Redis Cluster (one events partition's plan, its keys in its slot) in three
        steps: the shared, idempotent writes (catalog entries, item versions); the
        partition's transaction (user hashes, tombstones, idempotency marks, position,
        counters, join, outbox, decisions); then the next-best-actions, which hash by user.
        A crash between two steps is repaired by the redelivery (the first step is written
        again, unchanged) or leaves a user's previous next-best-action until their next
        event (the last step)."""
        current, _ = self._seen_keys(time.time() if now_s is None else now_s)
        if not self.cluster:
            async with self.client.pipeline(transaction=True) as pipe:
                self._shared_writes(pipe, plan)
                self._partition_writes(pipe, plan, current)
                self._serving_writes(pipe, plan)
                await pipe.execute()
            return
        async with self.client.pipeline(transaction=False) as pipe:
            self._shared_writes(pipe, plan)
            if len(pipe):
                await pipe.execute()
        async with self.client.pipeline(transaction=True) as pipe:
            self._partition_writes(pipe, plan, current)
            if len(pipe):
                await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            self._serving_writes(pipe, plan)
            if len(pipe):
                await pipe.execute()

    def _shared_writes(self, pipe: Any, plan: BatchPlan) -> None:
        """Keys every partition shares, written with values that do not depend on the
        order of the writes: catalog entries and item versions."""
        if plan.catalog:
            pipe.hset(self.key("catalog"), mapping=plan.catalog)
        for action in plan.item_versions:
            pipe.set(
                self.key("itemv", action.id, action.version),
                orjson.dumps(action.features),
                ex=2 * self.settings.decision_ttl_s,
            )

    def _partition_writes(self, pipe: Any, plan: BatchPlan, seen_key: str) -> None:
        """The keys of the plan's events partition(s)."""
        settings = self.settings
        for user_id, state in plan.users.items():
            key = self.user_key(user_id)
            if state is None or user_id in plan.replaced:
                pipe.delete(key)
            if state is None:
                continue
            # A live state never drops a field, so HSET alone replaces the hash.
            pipe.hset(key, mapping=state.to_hash())
        if plan.forgotten:
            tombstones = {forgotten_field(u): t for u, t in plan.forgotten.items()}
            pipe.hset(self.pkey("forgotten"), mapping=tombstones)
        if plan.applied_ids:
            pipe.sadd(seen_key, *(event_digest(e) for e in plan.applied_ids))
            pipe.expire(seen_key, 2 * settings.dedupe_window_s + 60)
        if plan.positions:
            positions = {self.position_field(p): o for p, o in plan.positions.items()}
            pipe.hset(self.pkey("positions"), mapping=positions)
        stats = self.pkey("stats")
        for name, value in plan.counters.items():
            if value:
                pipe.hincrby(stats, name, value)
        for partition, entries in plan.join_set.items():
            pipe.hset(self.pkey("join", str(partition)), mapping=entries)
        for partition, ids in plan.join_removed.items():
            pipe.hdel(self.pkey("join", str(partition)), *ids)
        for decision_id in plan.join_dropped:
            for partition in plan.owned_partitions:
                pipe.hdel(self.pkey("join", str(partition)), decision_id)
        for partition, records in plan.outbox.items():
            pipe.rpush(self.pkey("outbox", str(partition)), *records)
        if plan.decisions_removed:
            pipe.delete(*(self.pkey("decision", i) for i in plan.decisions_removed))
        for decision_id in plan.decisions_superseded:
            pipe.expire(self.pkey("decision", decision_id), settings.superseded_decision_ttl_s)
        for decision_id, decision in plan.decisions_set.items():
            pipe.set(self.pkey("decision", decision_id), decision, ex=settings.decision_ttl_s)

    def _serving_writes(self, pipe: Any, plan: BatchPlan) -> None:
        """``nba:{user_id}`` (hashed by user on a cluster) and ``nba:__default__``."""
        nba_ttl = self.settings.nba_ttl_s
        for user_id, nba in plan.nba_set.items():
            pipe.set(self.key("nba", user_id), nba, ex=nba_ttl)
        if plan.nba_removed:
            removed = [self.key("nba", u) for u in plan.nba_removed]
            if self.cluster:  # one slot per key
                for key in removed:
                    pipe.delete(key)
            else:
                pipe.delete(*removed)
        if plan.default_nba is not None:
            pipe.set(self.key("nba", DEFAULT_USER), plan.default_nba)

    async def begin_epoch(self, origin: str) -> Epoch:
        """Write a new epoch over any other, and check reads against it from now on."""
        epoch = Epoch.new(origin)
        await self.client.set(self.epoch_key, epoch.to_json())
        self.epoch = epoch
        return epoch

    async def erase_user_state(
        self, counters: Iterable[str], counter_prefixes: Iterable[str]
    ) -> int:
        """Delete what ``loopwise rebuild`` recomputes: the epoch, every ``user:*``, the
        ``catalog``, the ``positions``, every ``seen:*`` and the given ``stats`` fields
        (``counters``, and those starting with one of ``counter_prefixes``). The learning
        loop's keys stay. The number of keys and fields deleted."""
        client = self.client
        deleted = int(
            await client.delete(
                self.epoch_key, self.key("catalog"), self.key("forgotten"), self.key("positions")
            )
        )
        for family in ("user", "seen"):
            pattern = _glob_escape(self.key(family, "")) + "*"
            async for keys in _chunks(client.scan_iter(match=pattern, count=1000), 1000):
                deleted += int(await client.delete(*keys))
        stats = self.key("stats")
        names = set(counters)
        prefixes = tuple(counter_prefixes)
        fields = [
            f for f in await client.hkeys(stats) if text(f) in names or text(f).startswith(prefixes)
        ]
        if fields:
            deleted += int(await client.hdel(stats, *fields))
        return deleted

    async def forgotten_at(self, user_id: str) -> int | None:
        """The event time of the user's applied ``forget`` (None: not forgotten)."""
        for key in await self._family_keys("forgotten"):
            raw = await self.client.hget(key, forgotten_field(user_id))
            if raw is not None:
                return int(raw)
        return None

    async def erase_decisions(self, user_id: str) -> int:
        """Delete the user's stored decisions still in Redis (replaced ones expire within
        ``superseded_decision_ttl_s``; this does not wait): one SCAN over ``decision:*``."""
        pattern = self.settings.partition_pattern("decision", "*")
        deleted = 0
        async for keys in _chunks(self.client.scan_iter(match=pattern, count=1000), 500):
            if self.cluster:  # keys of many slots: one command per key
                values = await self.client.mget_nonatomic(keys)  # type: ignore[attr-defined]
            else:
                values = await self.client.mget(keys)
            mine = [k for k, v in zip(keys, values, strict=True) if v and _user_of(v) == user_id]
            groups = [[k] for k in mine] if self.cluster else [mine] if mine else []
            for group in groups:  # on a cluster one DEL per key: its keys are in many slots
                deleted += int(await self.client.delete(*group))
        return deleted

    async def close(self) -> None:
        await self.client.aclose()


def _user_of(stored_decision: bytes | str) -> str | None:
    try:
        user = orjson.loads(stored_decision).get("user_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return user if isinstance(user, str) else None


def event_digest(event_id: str) -> bytes:
    """How an applied ``event_id`` is remembered in ``seen:*``: 12 bytes of BLAKE2b (an id
    of 36 characters costs Redis ~88 bytes as a set member, a digest ~56). Two ids of one
    window share a digest with probability ~n²/2^97: 1e-12 for 10^9 ids."""
    return hashlib.blake2b(event_id.encode(), digest_size=12).digest()


def forgotten_field(user_id: str) -> str:
    """The ``forgotten`` hash's field for a user: SHA-256 of the id (32 hex digits), so the
    tombstone does not store the id itself (it only confirms an id one already knows)."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:32]


def _glob_escape(literal: str) -> str:
    """A Redis glob pattern (SCAN MATCH) that matches ``literal`` and nothing else."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in literal)


async def _chunks(keys: AsyncIterator[bytes], size: int) -> AsyncIterator[list[bytes]]:
    """Lists of up to ``size`` items of the async iterator ``keys``."""
    chunk: list[bytes] = []
    async for key in keys:
        chunk.append(key)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
