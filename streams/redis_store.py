"""Redis I/O of the user-state stage: idempotency keys, user hashes, catalog, counters.

Key layout (docs/contracts.md; ``{p}`` is ``key_prefix``):

- ``{p}user:{user_id}``  hash of :class:`loopwise.streams.user_state.UserState`
- ``{p}catalog``         hash item_id → JSON features of the latest ``item`` event
- ``{p}seen:{bucket}``   set of applied event_ids; a bucket spans ``dedupe_window_s``
  of wall-clock time and lives two spans, so an id is remembered at least one span
- ``{p}stats``           hash of counters: consumed, accepted, duplicates,
  deadlettered, deadletter:{reason}, no_consent, batches

Every batch ends in one MULTI/EXEC transaction: user hashes, catalog entries,
idempotency keys and counters land together or not at all, so a redelivered
batch finds its applied events marked seen and counts them as duplicates.
The read-modify-write of user hashes assumes one writer per user, which the
Kafka key (user_id) and one consumer per partition provide.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from loopwise.config import Settings
from loopwise.streams.user_state import UserState, text


class RedisStore:
    """Async access to the keys the worker owns."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._categories: dict[str, str | None] = {}

    @classmethod
    def connect(cls, settings: Settings) -> RedisStore:
        client = aioredis.Redis.from_url(
            settings.redis_url, password=settings.redis_password, decode_responses=False
        )
        return cls(client, settings)

    def user_key(self, user_id: str) -> str:
        return self.settings.key("user", user_id)

    def _seen_keys(self, now_s: float) -> tuple[str, str]:
        bucket = int(now_s // self.settings.dedupe_window_s)
        return self.settings.key("seen", str(bucket)), self.settings.key("seen", str(bucket - 1))

    async def already_applied(self, event_ids: list[str], now_s: float | None = None) -> set[str]:
        """The ids among ``event_ids`` that a previous batch applied."""
        if not event_ids:
            return set()
        current, previous = self._seen_keys(time.time() if now_s is None else now_s)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.smismember(current, event_ids)
            pipe.smismember(previous, event_ids)
            in_current, in_previous = await pipe.execute()
        return {e for e, a, b in zip(event_ids, in_current, in_previous, strict=True) if a or b}

    async def load_users(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        ids = list(user_ids)
        if not ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for user_id in ids:
                pipe.hgetall(self.user_key(user_id))
            hashes = await pipe.execute()
        return {u: UserState.from_hash(h) for u, h in zip(ids, hashes, strict=True)}

    async def categories(self, item_ids: Iterable[str]) -> dict[str, str | None]:
        """Category of each item, from a local cache backed by the catalog hash."""
        missing = [i for i in set(item_ids) if i not in self._categories]
        if missing:
            values = await self.client.hmget(self.settings.key("catalog"), missing)
            for item_id, value in zip(missing, values, strict=True):
                category = orjson.loads(value).get("category") if value else None
                # Unknown items are not cached: their item event may still be on its way.
                if category is not None:
                    self._categories[item_id] = str(category)
        return {i: self._categories.get(i) for i in item_ids}

    def remember_catalog(self, features: Mapping[str, Mapping[str, object]]) -> None:
        for item_id, feats in features.items():
            category = feats.get("category")
            self._categories[item_id] = None if category is None else str(category)

    async def commit(
        self,
        *,
        users: Mapping[str, UserState | None],
        replaced: set[str] | frozenset[str] = frozenset(),
        catalog: Mapping[str, bytes],
        applied_ids: list[str],
        counters: Counter[str],
        now_s: float | None = None,
        extra: Callable[[Pipeline], None] | None = None,
    ) -> None:
        """Write one batch atomically.

        ``None`` for a user erases their state (no consent); a user in ``replaced``
        was erased and started afresh within the batch, so the old hash goes first.
        ``extra`` adds further commands (the learning loop's) to the same transaction.
        """
        current, _ = self._seen_keys(time.time() if now_s is None else now_s)
        async with self.client.pipeline(transaction=True) as pipe:
            for user_id, state in users.items():
                key = self.user_key(user_id)
                if state is None or user_id in replaced:
                    pipe.delete(key)
                if state is None:
                    continue
                # A live state never drops a field, so HSET alone replaces the hash.
                pipe.hset(key, mapping=state.to_hash())  # type: ignore[arg-type]
            if catalog:
                pipe.hset(self.settings.key("catalog"), mapping=dict(catalog))  # type: ignore[arg-type]
            if applied_ids:
                pipe.sadd(current, *applied_ids)
                pipe.expire(current, 2 * self.settings.dedupe_window_s + 60)
            stats = self.settings.key("stats")
            for name, value in counters.items():
                if value:
                    pipe.hincrby(stats, name, value)
            if extra is not None:
                extra(pipe)
            await pipe.execute()

    async def stats(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.settings.key("stats"))
        return {text(k): int(v) for k, v in raw.items()}

    async def forget(self, user_id: str) -> int:
        """Erase everything stored about one user; the number of keys removed."""
        return int(
            await self.client.delete(self.user_key(user_id), self.settings.key("nba", user_id))
        )

    async def close(self) -> None:
        await self.client.aclose()
