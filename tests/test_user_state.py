"""The user-state fold: counts, exact revenue, decayed affinities, recent items."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from loopwise.streams.decoding import Event
from loopwise.streams.user_state import StateRules, UserState, apply_event, purchase_amount

RULES = StateRules(
    recent_items=3, affinity_half_life_ms=1000, affinity_weights={"view": 1.0, "click": 2.0}
)


def event(kind: str, item: str, ts: int, **raw: object) -> Event:
    return Event(f"e{ts}{item}{kind}", kind, "u1", item, ts, {"type": kind, **raw})


def test_counts_revenue_and_seen_times() -> None:
    state = UserState()
    for e in [
        event("view", "a", 50),
        event("click", "a", 60),
        event("purchase", "a", 70, price=19.99, quantity=2),
        event("purchase", "b", 40, price=0.1),
    ]:
        apply_event(state, e, None, RULES)
    assert (state.views, state.clicks, state.purchases) == (1, 1, 2)
    assert state.revenue == Decimal("40.08")
    assert (state.first_seen, state.last_seen) == (40, 70)


def test_revenue_is_exact_decimal_not_float_sum() -> None:
    state = UserState()
    for i in range(10):
        apply_event(state, event("purchase", "a", i, price=0.1), None, RULES)
    assert state.to_hash()["revenue"] == "1.0"
    assert purchase_amount({"price": 5, "quantity": 3}) == Decimal(15)


def test_affinity_halves_every_half_life() -> None:
    state = UserState()
    apply_event(state, event("view", "a", 0), "shoes", RULES)
    apply_event(state, event("view", "b", 1000), "hats", RULES)
    assert state.affinities == pytest.approx({"shoes": 0.5, "hats": 1.0})
    assert state.aff_at == 1000


def test_affinity_does_not_depend_on_arrival_order() -> None:
    events = [
        event(random.choice(["view", "click"]), "x", random.randrange(10_000)) for _ in range(50)
    ]
    cats = {e.event_id: random.choice(["c1", "c2"]) for e in events}
    ordered, shuffled = UserState(), UserState()
    for e in sorted(events, key=lambda e: e.timestamp):
        apply_event(ordered, e, cats[e.event_id], RULES)
    random.shuffle(events)
    for e in events:
        apply_event(shuffled, e, cats[e.event_id], RULES)
    assert shuffled.aff_at == ordered.aff_at
    assert shuffled.affinities == pytest.approx(ordered.affinities, rel=1e-12)


def test_recent_items_are_distinct_newest_first_and_capped() -> None:
    state = UserState()
    for i, item in enumerate(["a", "b", "c", "a", "d"]):
        apply_event(state, event("view", item, i), None, RULES)
    assert state.last_items == ["d", "a", "c"]


def test_hash_round_trip() -> None:
    state = UserState()
    apply_event(state, event("purchase", "a", 5, price=3.5), "c", RULES)
    raw = {k.encode(): v.encode() for k, v in state.to_hash().items()}
    assert UserState.from_hash(raw) == state
    assert set(state.to_hash()) >= {
        "views",
        "clicks",
        "purchases",
        "revenue",
        "first_seen",
        "last_seen",
    }
