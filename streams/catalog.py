"""The catalog: every item's features, the candidates of decisions, each item's category.

Item events may land on any partition, so a worker sees only some of them; the
``{p}catalog`` hash in Redis (written by whichever worker got the event) is the
truth. Each worker holds one :class:`Catalog`, the only copy it reads:

- the affinity fold asks it for the category of each item a batch touches
  (:meth:`Catalog.category`); items it does not know yet are read from Redis
  with the batch's other reads (:meth:`Catalog.unknown`, :meth:`Catalog.merge`);
- decisions take their candidates from :attr:`Catalog.actions` (active items,
  in a stable order);
- it is reloaded whole every ``refresh_s`` seconds (so another worker's item
  events reach this one, categories included) and takes a batch's own item
  events at once (:meth:`Catalog.update`; the Redis copy follows in the
  batch's transaction).

Items become :class:`loopwise.learners.policy.Action` objects through one
:class:`loopwise.learners.policy.ActionTable`: an item whose features did not
change keeps its action across reloads, so what is derived from it (its
record in a decision, its VW text) is computed once per item version.
``version`` counts changes to the catalog.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from loopwise.learners.policy import Action, ActionTable
from loopwise.streams.user_state import text


class Catalog:
    """Items by id (features without the ``active`` flag); ``actions`` are the active ones,
    sorted by id."""

    def __init__(self, refresh_s: float = 5.0) -> None:
        self.refresh_s = refresh_s
        self.items: dict[str, dict[str, Any]] = {}
        self.inactive: set[str] = set()
        self.actions: list[Action] = []
        self.version = 0
        self._table = ActionTable()
        self._raw: dict[str, bytes] = {}  # item -> its JSON as last read, to skip unchanged ones
        self._loaded_at = float("-inf")

    def refresh_due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - self._loaded_at >= self.refresh_s

    def category(self, item_id: str) -> str | None:
        features = self.items.get(item_id)
        category = None if features is None else features.get("category")
        return None if category is None else str(category)

    def record(self, item_id: str, version: str) -> dict[str, Any] | None:
        """The ``{"id", "features"}`` record of an item version, if it is the item's latest."""
        action = self._table.current(item_id)
        if action is None or action.version != version:
            return None
        return action.as_record()

    def unknown(self, item_ids: Iterable[str]) -> list[str]:
        """The ids among ``item_ids`` this catalog has never seen (to read from Redis)."""
        items = self.items
        return sorted({i for i in item_ids if i not in items})

    def replace(self, raw: Mapping[bytes, bytes] | Mapping[str, bytes]) -> None:
        """Take the whole catalog hash as read from Redis."""
        self._merge(raw, whole=True)
        self._loaded_at = time.monotonic()

    def merge(self, raw: Mapping[str, bytes | None]) -> None:
        """Take some entries of the catalog hash (``None``: not in Redis either)."""
        self._merge({k: v for k, v in raw.items() if v is not None}, whole=False)

    def update(self, features: Mapping[str, Mapping[str, Any]]) -> None:
        """Apply a batch's own item events at once (the Redis copy follows in its transaction).

        ``features`` maps item ids to their catalog features with the ``active`` flag."""
        if features:
            for item_id, feats in features.items():
                self._set(item_id, feats)
                self._raw.pop(item_id, None)
            self._rebuild()

    def _set(self, item_id: str, feats: Mapping[str, Any]) -> None:
        self.items[item_id] = {k: v for k, v in feats.items() if k != "active"}
        if feats.get("active", True) is False:
            self.inactive.add(item_id)
        else:
            self.inactive.discard(item_id)

    def _merge(self, raw: Mapping[Any, bytes | str], *, whole: bool) -> None:
        known = self._raw
        seen: set[str] = set()
        changed = False
        for key, value in raw.items():
            item_id = text(key)
            seen.add(item_id)
            blob = value if isinstance(value, bytes) else value.encode()
            if known.get(item_id) == blob:
                continue
            known[item_id] = blob
            self._set(item_id, orjson.loads(blob))
            changed = True
        if whole:
            for item_id in [i for i in self.items if i not in seen]:
                del self.items[item_id]
                known.pop(item_id, None)
                self.inactive.discard(item_id)
                changed = True
        if changed:
            self._rebuild()

    def _rebuild(self) -> None:
        get, inactive = self._table.get, self.inactive
        # The same action while an item's features stay: only changed items get a new one.
        self.actions = [
            get(item_id, feats)
            for item_id, feats in sorted(self.items.items())
            if item_id not in inactive
        ]
        self.version += 1
