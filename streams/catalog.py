"""The active catalog, as the candidates of every decision.

Item events may land on any partition, so a worker sees only some of them;
the catalog hash in Redis (written by whichever worker got the event) is the
truth, and each worker reloads it every few seconds and after its own item
events.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson
import redis.asyncio as aioredis

from loopwise.learners.policy import Action
from loopwise.streams.user_state import text


class Catalog:
    """Items by id; ``actions`` are the active ones, in a stable order."""

    def __init__(self, refresh_s: float = 5.0) -> None:
        self.refresh_s = refresh_s
        self.items: dict[str, dict[str, object]] = {}
        self.actions: list[Action] = []
        self._loaded_at = float("-inf")

    def replace(self, raw: Mapping[bytes | str, bytes | str]) -> None:
        self.items = {text(k): orjson.loads(v) for k, v in raw.items()}
        self._rebuild()
        self._loaded_at = time.monotonic()

    def update(self, features: Mapping[str, Mapping[str, object]]) -> None:
        """Apply a batch's own item events at once (the Redis copy follows in its transaction)."""
        if features:
            self.items.update({k: dict(v) for k, v in features.items()})
            self._rebuild()

    def _rebuild(self) -> None:
        self.actions = [
            Action(item_id, {k: v for k, v in feats.items() if k != "active"})  # type: ignore[misc]
            for item_id, feats in sorted(self.items.items())
            if feats.get("active", True) is not False
        ]

    async def refresh(self, client: aioredis.Redis, key: str, force: bool = False) -> None:
        if force or time.monotonic() - self._loaded_at >= self.refresh_s:
            self.replace(await client.hgetall(key))
