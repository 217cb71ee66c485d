"""Hostile input in the middle of good traffic, against the real broker and Redis.

Poison shapes that used to stall every partition for good (a schema-valid item
whose category is an object or a list; a message near the broker's size limit,
whose dead letter did not fit the broker) and an event dated far in the future
(which used to close every open decision at once) are published between good
events to a real worker. The worker must dead-letter each with its reason, once,
keep going, reconcile every count, and leave every user hash equal to a
reference computed from the good events alone; the far-future event must close
no decision.
"""

from __future__ import annotations

import base64
import random
import time
from typing import Any

import orjson
import pytest
import redis
from kafka import KafkaProducer
from test_pipeline_integration import assert_users_match, read_topic, reference_state
from worker_helpers import stats, wait_until

from loopwise.config import Settings, load_settings
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

N_GOOD = 4000
DAY_MS = 86_400_000


def poison(now_ms: int) -> list[tuple[bytes, str, str]]:
    """(message, reason, field) of each hostile message."""
    item = {"event_id": "p-item-1", "type": "item", "item_id": "poison-1", "timestamp": now_ms}
    view = {"event_id": "p-view", "type": "view", "user_id": "u-x", "item_id": "i", "timestamp": 1}
    return [
        (
            orjson.dumps({**item, "features": {"category": {"nested": 1}}}),
            "wrong_type",
            "features.category",
        ),
        (
            orjson.dumps({**item, "event_id": "p-item-2", "features": {"category": ["a", "b"]}}),
            "wrong_type",
            "features.category",
        ),
        # ~900 KB: accepted by the broker, refused by the worker (max_event_bytes), and its
        # dead letter (the original in base64 would be 1.2 MB) must still fit the broker.
        (orjson.dumps({**view, "event_id": "p-huge", "pad": "x" * 900_000}), "too_large", ""),
        (
            orjson.dumps({**view, "event_id": "p-future", "timestamp": now_ms + 10 * DAY_MS}),
            "out_of_range",
            "timestamp",
        ),
        (b'{"event_id": "p-nan", "type": "view", "timestamp": NaN}', "invalid_json", ""),
    ]


def test_poison_and_far_future_input_is_deadlettered_and_nothing_stalls(
    isolated_settings: Settings,
) -> None:
    s = load_settings(**{**isolated_settings.model_dump(), "arms": {"popularity": 1.0}})
    ensure_topics(s)
    now_ms = int(time.time() * 1000)
    config = MarketConfig(n_users=150, n_items=12, seed=21, run_tag=s.key_prefix.strip(":"))
    market = Marketplace(config.ending_by(now_ms, N_GOOD))
    catalog = market.catalog_events()
    good = list(market.events(N_GOOD))
    bad = poison(now_ms)
    rng = random.Random(5)
    stream: list[tuple[bytes, bytes, tuple[str, str] | None]] = [
        (e["user_id"].encode(), orjson.dumps(e), None) for e in good
    ]
    for raw, reason, field in bad:
        stream.insert(rng.randrange(len(stream) // 4, len(stream)), (b"u-x", raw, (reason, field)))

    r = redis.Redis.from_url(s.redis_url)
    producer = KafkaProducer(
        bootstrap_servers=s.bootstrap_servers, acks="all", max_request_size=2_000_000
    )
    worker = spawn_worker(s)
    try:
        for e in catalog:
            producer.send(s.events_topic, key=e["item_id"].encode(), value=orjson.dumps(e))
        producer.flush()
        wait_until(lambda: r.hlen(s.key("catalog")) == len(catalog), 120, "the catalog", worker)

        # One decision shown and open before the far-future event arrives on its partition.
        user = good[0]["user_id"]
        producer.send(s.events_topic, key=user.encode(), value=orjson.dumps(good[0]))
        producer.flush()
        wait_until(lambda: r.exists(s.key("nba", user)), 120, "a next-best-action", worker)
        nba = orjson.loads(r.get(s.key("nba", user)))
        shown = {
            "event_id": "shown-1",
            "type": "view",
            "user_id": user,
            "item_id": nba["item_id"],
            "timestamp": good[0]["timestamp"] + 1,
            "decision_id": nba["decision_id"],
            "propensity": nba["propensity"],
        }
        future = {
            **shown,
            "event_id": "future-click",
            "type": "click",
            "timestamp": now_ms + 10 * DAY_MS,
        }
        del future["decision_id"], future["propensity"]
        for event in (shown, future):
            producer.send(s.events_topic, key=user.encode(), value=orjson.dumps(event))
        producer.flush()
        wait_until(lambda: stats(r, s)["decisions_opened"] == 1, 60, "the shown decision", worker)
        wait_until(lambda: stats(r, s)["consumed"] == len(catalog) + 3, 60, "the click", worker)
        counts = stats(r, s)
        assert counts["decisions_closed"] == 0, "a far-future event closed a decision"
        assert counts["deadletter:out_of_range"] == 1

        # A forged propensity-log record from another producer: skipped and counted, not fatal.
        forged = {
            "decision_id": "forged",
            "actions": [{"id": "i"}],
            "chosen": 0,
            "propensity": 0,
            "pmf": [1.0],
            "reward": 1.0,
            "context": {},
        }
        producer.send(s.propensity_log_topic, key=b"u-x", value=orjson.dumps(forged), partition=0)
        for key, value, _ in stream[1:]:
            producer.send(s.events_topic, key=key, value=value)
        producer.flush()

        def invalid_counted() -> bool:
            raw = r.hget(s.key("model"), "invalid_records")
            return bool(raw) and orjson.loads(raw).get("invalid_propensity") == 1

        wait_until(invalid_counted, 60, "the forged log record counted", worker)
        published = len(catalog) + 2 + len(stream)
        wait_until(lambda: stats(r, s)["consumed"] == published, 300, "every message", worker)
        assert worker.poll() is None, "the worker died on hostile input"
        counts = stats(r, s)
        assert stop_worker(worker) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        producer.close()

    assert counts["deadlettered"] == len(bad) + 1  # + the far-future click
    assert counts["accepted"] == len(catalog) + len(good) + 1  # + the shown view
    assert counts["accepted"] + counts["duplicates"] + counts["deadlettered"] == published
    # Closed later, once, by its own partition's event time (the good traffic's), not before.
    assert counts["decisions_closed"] == 1
    on_log = read_topic(s, s.propensity_log_topic, 2)
    assert sorted(rec["decision_id"] for rec in on_log) == sorted([nba["decision_id"], "forged"])

    dead = read_topic(s, s.deadletter_topic, len(bad) + 1)
    assert len(dead) == len(bad) + 1  # each once
    by_id: dict[str, dict[str, Any]] = {}
    for record in dead:
        original = base64.b64decode(record["original_b64"])
        assert len(orjson.dumps(record)) < 1_000_000
        marker = original[:200]
        for raw, reason, field in bad:
            if raw[:200] == marker:
                by_id[raw[:200].decode(errors="replace")] = record
                assert record["reason"] == reason
                assert (record["field"] or "") == field
    assert len(by_id) == len(bad), "every hostile message is on the dead-letter topic"
    huge = next(d for d in dead if d["original_truncated"])
    assert huge["original_size"] > 900_000 and huge["reason"] == "too_large"

    categories = {e["item_id"]: e["features"]["category"] for e in catalog}
    expected = reference_state([good[0], shown, *good[1:]], categories, s)  # publish order
    assert_users_match(r, s, expected, min_users=100)
    r.close()
