"""Fresh per-user state (docs/contracts.md ``user:{user_id}``), as a pure fold over events.

The worker reads the touched users' hashes once per batch, folds the batch's
events into them here, and writes each hash back once: one read and one write
per user per batch, whatever the number of events.

Category affinities decay exponentially in event time with half-life ``h``::

    aff_c(T) = Σ_e w(type_e) · 2^(-(T - t_e) / h)     over events e of category c

stored at the reference time ``T = aff_at`` (the latest event time seen). The
fold is order-independent (up to float rounding): an event older than ``T``
is added already decayed, a newer one first moves ``T`` forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

import orjson

from loopwise.streams.decoding import Event

COUNTERS: Final = {"view": "views", "click": "clicks", "purchase": "purchases"}
AFFINITY_PREFIX: Final = "aff:"


@dataclass(slots=True)
class UserState:
    """The fields of ``user:{user_id}``; ``to_hash``/``from_hash`` are the Redis encoding."""

    views: int = 0
    clicks: int = 0
    purchases: int = 0
    revenue: Decimal = field(default_factory=Decimal)
    first_seen: int | None = None
    last_seen: int | None = None
    aff_at: int | None = None
    affinities: dict[str, float] = field(default_factory=dict)
    last_items: list[str] = field(default_factory=list)
    # with pseudonymization: the user's log-and-learning id (loopwise.pseudonyms)
    token: str | None = None

    def to_hash(self) -> dict[str, str]:
        fields = {
            "views": str(self.views),
            "clicks": str(self.clicks),
            "purchases": str(self.purchases),
            "revenue": format(self.revenue, "f"),
            "last_items": orjson.dumps(self.last_items).decode(),
        }
        for name in ("first_seen", "last_seen", "aff_at"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = str(value)
        if self.token is not None:
            fields["token"] = self.token
        for category, value in self.affinities.items():
            fields[AFFINITY_PREFIX + category] = repr(value)
        return fields

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> UserState:
        fields = {text(k): text(v) for k, v in raw.items()}
        state = cls(
            views=int(fields.get("views", 0)),
            clicks=int(fields.get("clicks", 0)),
            purchases=int(fields.get("purchases", 0)),
            revenue=Decimal(fields.get("revenue", "0")),
            last_items=orjson.loads(fields.get("last_items", "[]")),
            token=fields.get("token"),
        )
        for name in ("first_seen", "last_seen", "aff_at"):
            if name in fields:
                setattr(state, name, int(fields[name]))
        state.affinities = {
            k[len(AFFINITY_PREFIX) :]: float(v)
            for k, v in fields.items()
            if k.startswith(AFFINITY_PREFIX)
        }
        return state


@dataclass(frozen=True, slots=True)
class StateRules:
    """How events move state; from the settings of the same names."""

    recent_items: int = 20
    affinity_half_life_ms: int = 7 * 86_400_000
    affinity_weights: Mapping[str, float] = field(
        default_factory=lambda: {"view": 1.0, "click": 3.0, "purchase": 10.0}
    )


def apply_event(state: UserState, event: Event, category: str | None, rules: StateRules) -> None:
    """Fold one accepted, consented user event into ``state`` (in place)."""
    counter = COUNTERS.get(event.type)
    if counter is None:
        return
    setattr(state, counter, getattr(state, counter) + 1)
    ts = event.timestamp
    if event.type == "purchase":
        state.revenue += purchase_amount(event.raw)
    if state.first_seen is None or ts < state.first_seen:
        state.first_seen = ts
    if state.last_seen is None or ts > state.last_seen:
        state.last_seen = ts
    if rules.recent_items:
        items = state.last_items
        if event.item_id in items:
            items.remove(event.item_id)
        items.insert(0, event.item_id)
        del items[rules.recent_items :]
    weight = rules.affinity_weights.get(event.type, 0.0)
    if category is not None and weight:
        _add_affinity(state, category, weight, ts, rules.affinity_half_life_ms)


def purchase_amount(raw: Mapping[str, object]) -> Decimal:
    """price x quantity, exactly, in decimal (the float's shortest repr, as a person wrote it)."""
    price = raw.get("price") or 0
    quantity = raw.get("quantity") or 1
    return Decimal(repr(price)) * int(quantity)  # type: ignore[call-overload]


def _add_affinity(state: UserState, category: str, weight: float, ts: int, half_life: int) -> None:
    if state.aff_at is None:
        state.aff_at = ts
    elif ts > state.aff_at:
        decay = 2.0 ** (-(ts - state.aff_at) / half_life)
        state.affinities = {c: v * decay for c, v in state.affinities.items()}
        state.aff_at = ts
    contribution = weight * 2.0 ** (-(state.aff_at - ts) / half_life)
    state.affinities[category] = state.affinities.get(category, 0.0) + contribution


def group_by_user(events: Iterable[Event]) -> dict[str, list[Event]]:
    """User events by user, each list in arrival (partition) order."""
    groups: dict[str, list[Event]] = {}
    for event in events:
        if event.user_id is not None and event.type != "item":
            groups.setdefault(event.user_id, []).append(event)
    return groups


def text(value: bytes | str) -> str:
    """Redis answers bytes unless asked otherwise."""
    return value.decode() if isinstance(value, bytes) else value
