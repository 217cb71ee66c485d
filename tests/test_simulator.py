"""Unit tests of the synthetic marketplace (producers/simulator.py): no Kafka, no Redis."""

from __future__ import annotations

import doctest
import itertools
import math
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest

from loopwise.producers import simulator
from loopwise.producers.simulator import MarketConfig, Marketplace, Payoff

N_EVENTS = 50_000
EVENT_TYPES = {"view", "click", "purchase", "item"}
KNOWN_FIELDS = {
    "event_id",
    "type",
    "user_id",
    "item_id",
    "timestamp",
    "decision_id",
    "propensity",
    "context",
    "price",
    "quantity",
    "features",
    "active",
    "consent",
}


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def assert_schema_valid(event: dict[str, Any]) -> None:
    """docs/contracts.md "Event schema", checked by hand."""
    assert isinstance(event, dict)
    assert set(event) <= KNOWN_FIELDS, set(event) - KNOWN_FIELDS
    assert type(event["event_id"]) is str and event["event_id"]
    assert event["type"] in EVENT_TYPES
    kind = event["type"]
    if kind == "item":
        assert "user_id" not in event
    else:
        assert type(event["user_id"]) is str and event["user_id"]
    assert type(event["item_id"]) is str and event["item_id"]
    assert type(event["timestamp"]) is int and 0 <= event["timestamp"] <= 2**53
    if "decision_id" in event:
        assert type(event["decision_id"]) is str and event["decision_id"]
        if kind == "view":
            assert _is_number(event["propensity"]) and 0 < event["propensity"] <= 1
    if "context" in event:
        ctx = event["context"]
        assert isinstance(ctx, dict)
        for key, value in ctx.items():
            assert type(key) is str
            assert type(value) in (str, int, float, bool), (key, type(value))
    if kind == "purchase":
        assert _is_number(event["price"]) and event["price"] >= 0
    if "quantity" in event:
        assert type(event["quantity"]) is int and event["quantity"] >= 1
    if kind == "item":
        assert isinstance(event["features"], dict)
        assert orjson.loads(orjson.dumps(event["features"])) == event["features"]
    else:
        assert "features" not in event
    if "active" in event:
        assert type(event["active"]) is bool
    # JSON-ready: plain Python values only (orjson refuses numpy scalars by default).
    assert orjson.loads(orjson.dumps(event)) == event


@pytest.fixture(scope="module")
def market() -> Marketplace:
    return Marketplace(MarketConfig(seed=11))


@pytest.fixture(scope="module")
def stream(market: Marketplace) -> list[dict[str, Any]]:
    return list(market.events(N_EVENTS))


def _views_with_complete_followups(
    market: Marketplace, stream: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[int, int], dict[int, int]]:
    """Views whose clicks/purchases are surely in the stream, and their click/purchase counts.

    A click or purchase is matched to the latest earlier view of the same user,
    item and context (the attribution rule of docs/contracts.md).
    """
    cutoff = stream[-1]["timestamp"] - market.max_followup_ms - 1
    latest: dict[tuple[str, str, bytes], int] = {}
    views: list[dict[str, Any]] = []
    clicks: dict[int, int] = Counter()
    purchases: dict[int, int] = Counter()
    for event in stream:
        key = (event["user_id"], event["item_id"], orjson.dumps(event["context"]))
        if event["type"] == "view":
            latest[key] = len(views)
            views.append(event)
        elif event["type"] == "click":
            clicks[latest[key]] += 1
        elif event["type"] == "purchase":
            purchases[latest[key]] += 1
    keep = [j for j, v in enumerate(views) if v["timestamp"] <= cutoff]
    kept_views = [views[j] for j in keep]
    return (
        kept_views,
        {n: clicks.get(j, 0) for n, j in enumerate(keep)},
        {n: purchases.get(j, 0) for n, j in enumerate(keep)},
    )


# ---------------------------------------------------------------- schema


def test_every_event_is_schema_valid(market: Marketplace, stream: list[dict[str, Any]]) -> None:
    for event in market.catalog_events():
        assert_schema_valid(event)
    for event in stream:
        assert_schema_valid(event)
        assert event["type"] != "item"
        assert "decision_id" not in event and "propensity" not in event
        assert set(event["context"]) == {"device", "hour"}
        assert event["context"]["device"] in market.devices
        assert 0 <= event["context"]["hour"] <= 23


def test_catalog_events(market: Marketplace) -> None:
    catalog = market.catalog_events()
    assert [e["item_id"] for e in catalog] == market.items
    assert len(market.items) == 40 and market.items[6] == "item-007"
    for event in catalog:
        assert event["type"] == "item" and event["active"] is True
        features = event["features"]
        assert features == market.item_features(event["item_id"])
        assert set(features) == {"category", "price", "brand"}
        assert features["category"] in market.categories
        assert type(features["price"]) is float
        assert market.config.price_min <= features["price"] <= market.config.price_max
        assert type(features["brand"]) is str
    assert len({e["features"]["category"] for e in catalog}) == market.config.n_categories
    assert catalog == Marketplace(MarketConfig(seed=11)).catalog_events()  # idempotent ids


def test_purchases_carry_price_and_quantity(
    market: Marketplace, stream: list[dict[str, Any]]
) -> None:
    purchases = [e for e in stream if e["type"] == "purchase"]
    assert purchases
    quantities = Counter(e["quantity"] for e in purchases)
    assert set(quantities) <= {1, 2, 3}
    assert quantities[1] > 0.6 * len(purchases) and quantities[1] < len(purchases)
    for event in purchases:
        assert event["price"] == market.item_features(event["item_id"])["price"]


# ----------------------------------------------------------- determinism & ids


def test_deterministic_per_seed() -> None:
    cfg = MarketConfig(seed=3)
    first = list(Marketplace(cfg).events(3_000))
    again = list(Marketplace(cfg).events(3_000))
    assert first == again
    other = list(Marketplace(MarketConfig(seed=4)).events(3_000))
    assert [e["item_id"] for e in other] != [e["item_id"] for e in first]
    a, b = Marketplace(cfg), Marketplace(cfg)
    ctx = {"device": "desktop", "hour": 9}
    assert np.array_equal(
        a.click_probabilities("user-0001", ctx), b.click_probabilities("user-0001", ctx)
    )
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [a.sample_context(rng_a) for _ in range(50)] == [
        b.sample_context(rng_b) for _ in range(50)
    ]


def test_event_ids_unique_across_calls(market: Marketplace, stream: list[dict[str, Any]]) -> None:
    ids = [e["event_id"] for e in stream]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "sim-11-0"
    more = list(market.events(2_000))  # the world goes on: new ids, later timestamps
    more_ids = {e["event_id"] for e in more}
    assert len(more_ids) == len(more) and not more_ids & set(ids)
    assert min(e["timestamp"] for e in more) >= stream[-1]["timestamp"]
    catalog_ids = {e["event_id"] for e in market.catalog_events()}
    assert len(catalog_ids) == len(market.items) and not catalog_ids & set(ids)
    tagged = next(Marketplace(MarketConfig(seed=11, run_tag="r2")).events(1))
    assert tagged["event_id"] == "sim-r2-11-0"


def test_timestamps(market: Marketplace, stream: list[dict[str, Any]]) -> None:
    stamps = [e["timestamp"] for e in stream]
    assert stamps[0] > market.config.start_ms
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    views = [e for e in stream if e["type"] == "view"]
    mean_gap = (views[-1]["timestamp"] - views[0]["timestamp"]) / (len(views) - 1)
    assert mean_gap == pytest.approx(market.config.mean_gap_ms, rel=0.03)


def test_click_and_purchase_follow_their_view(stream: list[dict[str, Any]]) -> None:
    last_view: dict[tuple[str, str], int] = {}
    last_click: dict[tuple[str, str], int] = {}
    for event in stream:
        key = (event["user_id"], event["item_id"])
        if event["type"] == "view":
            last_view[key] = event["timestamp"]
        elif event["type"] == "click":
            assert key in last_view and last_view[key] < event["timestamp"]
            last_click[key] = event["timestamp"]
        elif event["type"] == "purchase":
            # never a purchase without a click of the same item, before it
            assert key in last_click and last_click[key] < event["timestamp"]


def test_users_differ_in_activity(market: Marketplace, stream: list[dict[str, Any]]) -> None:
    per_user = Counter(e["user_id"] for e in stream if e["type"] == "view")
    counts = sorted(per_user.values(), reverse=True)
    top_decile = sum(counts[: len(market.users) // 10])
    assert top_decile > 0.3 * sum(counts)
    assert len(per_user) > 0.8 * len(market.users)


# ------------------------------------------------- the truth drives the traffic


def test_click_rate_matches_ground_truth(market: Marketplace, stream: list[dict[str, Any]]) -> None:
    views, clicks, _ = _views_with_complete_followups(market, stream)
    p = np.array(
        [market.click_probability(v["user_id"], v["item_id"], v["context"]) for v in views]
    )
    clicked = np.array([clicks[j] for j in range(len(views))], dtype=np.float64)
    assert clicked.max() <= 1
    ctr = clicked.mean()
    assert 0.05 <= ctr <= 0.10  # organic CTR on target (0.07)
    z = (clicked.sum() - p.sum()) / math.sqrt(float(np.sum(p * (1 - p))))
    assert abs(z) < 3.5, (ctr, p.mean(), z)
    # Calibration per quintile of the true probability: each bin matches its own truth.
    order = np.argsort(p)
    rates = []
    for part in np.array_split(order, 5):
        pb, cb = p[part], clicked[part]
        zb = (cb.sum() - pb.sum()) / math.sqrt(float(np.sum(pb * (1 - pb))))
        assert abs(zb) < 4.0, (pb.mean(), cb.mean(), zb)
        rates.append(cb.mean())
    assert rates[-1] > 4 * rates[0]


def test_purchase_rate_matches_ground_truth(
    market: Marketplace, stream: list[dict[str, Any]]
) -> None:
    views, clicks, purchases = _views_with_complete_followups(market, stream)
    clicked = [j for j in range(len(views)) if clicks[j]]
    q = np.array(
        [
            market.purchase_given_click(
                views[j]["user_id"], views[j]["item_id"], views[j]["context"]
            )
            for j in clicked
        ]
    )
    bought = np.array([purchases[j] for j in clicked], dtype=np.float64)
    assert all(purchases[j] == 0 for j in range(len(views)) if not clicks[j])
    assert 0.10 <= bought.mean() <= 0.20
    z = (bought.sum() - q.sum()) / math.sqrt(float(np.sum(q * (1 - q))))
    assert abs(z) < 3.5, (bought.mean(), q.mean(), z)


def test_calibration_hits_other_targets() -> None:
    m = Marketplace(MarketConfig(seed=2, target_ctr=0.03, n_users=200, n_items=25))
    events = list(m.events(30_000))
    kinds = Counter(e["type"] for e in events)
    assert kinds["click"] / kinds["view"] == pytest.approx(0.03, rel=0.1)


# ---------------------------------------------------------- ground-truth API


def test_probabilities_are_consistent(market: Marketplace) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        user = market.sample_user(rng)
        ctx = market.sample_context(rng, user)
        clicks = market.click_probabilities(user, ctx)
        buys = market.purchase_probabilities(user, ctx)
        assert clicks.shape == buys.shape == (len(market.items),)
        assert np.all((clicks > 0) & (clicks < 1))
        assert np.all((buys > 0) & (buys < clicks))  # a purchase needs a click
        item = market.items[int(rng.integers(len(market.items)))]
        j = market.items.index(item)
        assert market.click_probability(user, item, ctx) == pytest.approx(clicks[j])
        assert market.purchase_probability(user, item, ctx) == pytest.approx(
            clicks[j] * market.purchase_given_click(user, item, ctx)
        )
        assert market.expected_reward(user, item, ctx, Payoff(1.0, 5.0)) == pytest.approx(
            clicks[j] + 5.0 * buys[j]
        )
        best = market.best_item(user, ctx)
        assert market.expected_reward(user, best, ctx) == pytest.approx(clicks.max())
        assert market.oracle_value(user, ctx) == pytest.approx(clicks.max())
        assert market.uniform_value(user, ctx) == pytest.approx(clicks.mean())
    with pytest.raises(ValueError):
        market.click_probabilities("user-0001", {"device": "fridge", "hour": 3})
    with pytest.raises(ValueError):
        market.click_probabilities("user-0001", {"device": "mobile"})
    with pytest.raises(KeyError):
        market.click_probabilities("nobody", {"device": "mobile", "hour": 3})


def test_best_item_depends_on_user_and_context(market: Marketplace) -> None:
    grid = [{"device": d, "hour": h} for d in market.devices for h in (0, 6, 12, 18)]
    varies = 0
    regrets = []
    best_overall: Counter[int] = Counter()
    for user in market.users:
        table = np.array([market.click_probabilities(user, ctx) for ctx in grid])  # (C, I)
        best = table.argmax(axis=1)
        varies += len(set(best.tolist())) > 1
        best_overall[int(np.bincount(best).argmax())] += 1
        # The best single item for this user, ignoring the context, loses against the oracle.
        context_free = int(table.mean(axis=0).argmax())
        regrets.append(1.0 - table[:, context_free].mean() / table.max(axis=1).mean())
    assert varies / len(market.users) > 0.5
    assert float(np.mean(regrets)) > 0.05
    # ... and on the user: no single item is the best for most users.
    assert max(best_overall.values()) < 0.5 * len(market.users)


def test_oracle_beats_uniform(market: Marketplace) -> None:
    rng = np.random.default_rng(1)
    oracle, uniform, oracle_rev, uniform_rev = [], [], [], []
    for _ in range(2_000):
        user = market.sample_user(rng)
        ctx = market.sample_context(rng, user)
        oracle.append(market.oracle_value(user, ctx))
        uniform.append(market.uniform_value(user, ctx))
        oracle_rev.append(market.oracle_value(user, ctx, Payoff(1.0, 10.0)))
        uniform_rev.append(market.uniform_value(user, ctx, Payoff(1.0, 10.0)))
        assert oracle[-1] >= uniform[-1]
    ratio = float(np.mean(oracle) / np.mean(uniform))
    assert ratio > 3.0, ratio
    assert float(np.mean(oracle_rev) / np.mean(uniform_rev)) > 3.0


def test_draw_outcome_follows_truth(market: Marketplace) -> None:
    rng = np.random.default_rng(2)
    user, item, ctx = market.users[0], market.items[0], {"device": "mobile", "hour": 20}
    draws = [market.draw_outcome(user, item, ctx, rng) for _ in range(20_000)]
    assert (False, True) not in draws
    p_click = market.click_probability(user, item, ctx)
    p_buy = market.purchase_probability(user, item, ctx)
    n = len(draws)
    clicks = sum(c for c, _ in draws)
    buys = sum(b for _, b in draws)
    assert abs(clicks - n * p_click) < 4 * math.sqrt(n * p_click * (1 - p_click)) + 1
    assert abs(buys - n * p_buy) < 4 * math.sqrt(n * p_buy * (1 - p_buy)) + 1


def test_respond_to_a_decision_view() -> None:
    m = Marketplace(MarketConfig(seed=5))
    rng = np.random.default_rng(9)
    user = m.users[3]
    ctx = {"device": "tablet", "hour": 21}
    item = m.best_item(user, ctx)
    view = {
        "event_id": "app-1",
        "type": "view",
        "user_id": user,
        "item_id": item,
        "timestamp": m.config.start_ms + 1_000,
        "decision_id": "dec-1",
        "propensity": 0.5,
        "context": ctx,
    }
    assert_schema_valid(view)
    outcomes = [m.respond(view, rng) for _ in range(3_000)]
    kinds = Counter(tuple(e["type"] for e in out) for out in outcomes)
    assert set(kinds) <= {(), ("click",), ("click", "purchase")}
    assert kinds[("click",)] + kinds[("click", "purchase")] > 0
    ids = [e["event_id"] for out in outcomes for e in out]
    assert len(ids) == len(set(ids))
    for out in outcomes:
        for event in out:
            assert_schema_valid(event)
            assert event["decision_id"] == "dec-1" and event["context"] == ctx
            assert event["timestamp"] > view["timestamp"]
        if len(out) == 2:
            assert out[1]["timestamp"] > out[0]["timestamp"]
    unlinked = [m.respond(view, rng, link_decision=False) for _ in range(200)]
    assert all("decision_id" not in e for out in unlinked for e in out)


def test_sample_context(market: Marketplace) -> None:
    rng = np.random.default_rng(4)
    contexts = [market.sample_context(rng) for _ in range(5_000)]
    devices = Counter(c["device"] for c in contexts)
    assert set(devices) == set(market.devices)
    assert devices["mobile"] > devices["tablet"]
    assert {c["hour"] for c in contexts} == set(range(24))
    user = market.users[0]
    habit = Counter(market.sample_context(rng, user)["device"] for _ in range(2_000))
    assert habit.most_common(1)[0][1] > 0.6 * 2_000


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        MarketConfig(target_ctr=1.5)
    with pytest.raises(ValueError):
        MarketConfig(devices=("mobile", "mobile"))
    with pytest.raises(ValueError):
        MarketConfig(device_weights=(1.0,))
    with pytest.raises(ValueError):
        MarketConfig(price_min=10.0, price_max=1.0)
    with pytest.raises(ValueError):
        MarketConfig(n_items=0)


def test_docstring_example_runs() -> None:
    result = doctest.testmod(simulator, extraglobs={"np": np}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_a_history_ending_by_now_stays_in_the_past() -> None:
    """The worker refuses events from its future: a simulated run must end before now."""
    now = 1_800_000_000_000
    config = MarketConfig(seed=4, n_users=50, n_items=8).ending_by(now, 3000)
    market = Marketplace(config)
    events = list(market.events(3000))
    assert max(e["timestamp"] for e in events) <= now
    assert config.start_ms >= now - 2 * config.history_span_ms(3000)
