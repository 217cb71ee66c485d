"""The whole step-1 pipeline against the real Kafka broker and the real Redis.

20,000 messages for 500 users go through a real worker process: 10% malformed
in varied ways, redelivered duplicates, a few users withdrawing consent. Every
user hash must equal a reference computed here, independently of the worker's
code, from the same events; every bad message must be on the dead-letter topic
with its reason; and the counts must reconcile exactly.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
import redis
from kafka import KafkaProducer, TopicPartition
from worker_helpers import stats, wait_until

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

N_MESSAGES = 20_000
N_USERS = 500
MALFORMED_SHARE = 0.10
N_DUPLICATES = 1_000
NO_CONSENT_USERS = 5


# --- the reference: plain loops over the accepted events, written apart from streams/ ----------


def reference_state(events: list[dict[str, Any]], categories: dict[str, str], s: Settings) -> dict:
    """Expected ``user:{id}`` hashes (affinities as floats) for events in publish order."""
    users: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["type"] == "item":
            continue
        uid = e["user_id"]
        if e.get("consent", True) is False:
            users[uid] = {"erased": True}
            continue
        u = users.get(uid)
        if u is None or "erased" in u:
            u = users[uid] = {"events": []}
        u["events"].append(e)
    expected: dict[str, Any] = {}
    for uid, u in users.items():
        if "erased" in u:
            expected[uid] = None
            continue
        evs = u["events"]
        fields = {
            "views": str(sum(e["type"] == "view" for e in evs)),
            "clicks": str(sum(e["type"] == "click" for e in evs)),
            "purchases": str(sum(e["type"] == "purchase" for e in evs)),
            "revenue": format(
                sum(
                    (
                        Decimal(repr(e["price"])) * e.get("quantity", 1)
                        for e in evs
                        if e["type"] == "purchase"
                    ),
                    Decimal(0),
                ),
                "f",
            ),
            "first_seen": str(min(e["timestamp"] for e in evs)),
            "last_seen": str(max(e["timestamp"] for e in evs)),
        }
        recent: list[str] = []
        for e in reversed(evs):
            if e["item_id"] not in recent:
                recent.append(e["item_id"])
        fields["last_items"] = recent[: s.recent_items]
        weighted = [(e, categories.get(e["item_id"])) for e in evs]
        weighted = [(e, c) for e, c in weighted if c and s.affinity_weights.get(e["type"], 0)]
        affinities: dict[str, float] = {}
        if weighted:
            t_ref = max(e["timestamp"] for e, _ in weighted)
            fields["aff_at"] = str(t_ref)
            for e, c in weighted:
                decay = 2.0 ** (-(t_ref - e["timestamp"]) / s.affinity_half_life_ms)
                affinities[c] = affinities.get(c, 0.0) + s.affinity_weights[e["type"]] * decay
        expected[uid] = (fields, affinities)
    return expected


# --- the traffic ---------------------------------------------------------------------------


def malformed(rng: random.Random, user: str, n: int, max_bytes: int) -> tuple[bytes, str]:
    """One malformed message (unique bytes) and the reason the worker must give."""
    ok = {
        "event_id": f"bad-{n}",
        "type": "view",
        "user_id": user,
        "item_id": "item-001",
        "timestamp": 1,
    }
    kind = n % 8
    if kind == 0:
        return b'{"event_id": "bad-%d", "type": "view", ' % n, "invalid_json"
    if kind == 1:
        return orjson.dumps({k: v for k, v in ok.items() if k != "item_id"}), "missing_field"
    if kind == 2:
        return orjson.dumps({**ok, "timestamp": str(n)}), "wrong_type"
    if kind == 3:
        return orjson.dumps(
            {**ok, "type": "purchase", "price": -1.5 - rng.random()}
        ), "out_of_range"
    if kind == 4:
        return orjson.dumps({**ok, "type": "wishlist"}), "unknown_type"
    if kind == 5:
        return orjson.dumps({**ok, "pad": "x" * (max_bytes + 10)}), "too_large"
    if kind == 6:
        return orjson.dumps({**ok, "decision_id": f"d{n}", "propensity": 0}), "out_of_range"
    return orjson.dumps([ok]), "wrong_type"


def build_traffic(s: Settings, seed: int = 11) -> dict[str, Any]:
    rng = random.Random(seed)
    market = Marketplace(MarketConfig(n_users=N_USERS, seed=seed, run_tag=s.key_prefix.strip(":")))
    n_bad = int(N_MESSAGES * MALFORMED_SHARE)
    n_good = N_MESSAGES - n_bad - N_DUPLICATES
    good = list(market.events(n_good))
    for uid in rng.sample(sorted({e["user_id"] for e in good}), NO_CONSENT_USERS):
        positions = [i for i, e in enumerate(good) if e["user_id"] == uid]
        good[positions[len(positions) // 2]]["consent"] = False  # withdraws consent mid-stream
    stream: list[tuple[bytes, bytes, str | None]] = [
        (e["user_id"].encode(), orjson.dumps(e), None) for e in good
    ]
    users = [e["user_id"] for e in good]
    for n in range(n_bad):
        user = rng.choice(users)
        raw, reason = malformed(rng, user, n, s.max_event_bytes)
        stream.insert(rng.randrange(len(stream) + 1), (user.encode(), raw, reason))
    for _ in range(N_DUPLICATES):
        i = rng.randrange(len(stream))
        while stream[i][2] is not None:
            i = rng.randrange(len(stream))
        # a redelivery: the same bytes again, soon after (same batch) or much later
        gap = rng.choice([1, 5, 50, 5000])
        stream.insert(min(len(stream), i + gap), stream[i])
    return {"market": market, "good": good, "stream": stream, "n_bad": n_bad}


# --- the test ------------------------------------------------------------------------------


def start_worker(s: Settings) -> subprocess.Popen[bytes]:
    return spawn_worker(s)


def test_pipeline_reflects_every_good_event_and_deadletters_every_bad_one(
    isolated_settings: Settings,
) -> None:
    s = isolated_settings
    ensure_topics(s)
    traffic = build_traffic(s)
    market: Marketplace = traffic["market"]
    r = redis.Redis.from_url(s.redis_url)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=5, acks="all")
    worker = start_worker(s)
    try:
        # The catalog first: affinities need each item's category.
        catalog = market.catalog_events()
        for e in catalog:
            producer.send(s.events_topic, key=e["item_id"].encode(), value=orjson.dumps(e))
        producer.flush()
        wait_until(lambda: r.hlen(s.key("catalog")) == len(catalog), 120, "the catalog", worker)

        for key, value, _ in traffic["stream"]:
            producer.send(s.events_topic, key=key, value=value)
        producer.flush()
        published = len(catalog) + len(traffic["stream"])
        wait_until(lambda: stats(r, s)["consumed"] == published, 300, "all messages", worker)
        assert stop_worker(worker) == 0, "SIGTERM must stop the worker cleanly"

        counts = stats(r, s)
        good_unique = len(catalog) + len(traffic["good"])
        assert counts["accepted"] == good_unique
        assert counts["duplicates"] == N_DUPLICATES
        assert counts["deadlettered"] == traffic["n_bad"]
        assert counts["accepted"] + counts["duplicates"] + counts["deadlettered"] == published
        assert counts["no_consent"] == NO_CONSENT_USERS

        # Every bad message is on the dead-letter topic, once, with its reason and source.
        expected_reasons = {raw: reason for _, raw, reason in traffic["stream"] if reason}
        dead = read_topic(s, s.deadletter_topic, len(expected_reasons))
        assert len(dead) == len(expected_reasons)
        import base64

        seen_raw = set()
        for record in dead:
            raw = base64.b64decode(record["original_b64"])
            assert record["reason"] == expected_reasons[raw], record
            assert record["source"]["topic"] == s.events_topic
            assert record["source"]["offset"] >= 0
            seen_raw.add(raw)
        assert seen_raw == set(expected_reasons)

        # Every user hash equals the reference.
        categories = {e["item_id"]: e["features"]["category"] for e in catalog}
        expected = reference_state(traffic["good"], categories, s)
        assert_users_match(r, s, expected)

        # Offsets were committed: a new worker of the group has nothing left to read.
        assert committed_lag(s) == 0

        # Redelivered after a restart: 500 already-applied events change nothing.
        before = {uid: r.hgetall(s.key("user", uid)) for uid in expected}
        worker = start_worker(s)
        redelivered = random.Random(3).sample(traffic["good"], 500)
        for e in redelivered:
            producer.send(s.events_topic, key=e["user_id"].encode(), value=orjson.dumps(e))
        producer.flush()
        wait_until(lambda: stats(r, s)["consumed"] == published + 500, 120, "redeliveries", worker)
        assert stop_worker(worker) == 0
        after_counts = stats(r, s)
        assert after_counts["duplicates"] == N_DUPLICATES + 500
        assert after_counts["accepted"] == counts["accepted"]
        assert {uid: r.hgetall(s.key("user", uid)) for uid in expected} == before
    finally:
        if worker.poll() is None:
            worker.kill()
        producer.close()
        r.close()


def assert_users_match(
    r: redis.Redis,
    s: Settings,
    expected: dict[str, Any],
    min_users: int = int(N_USERS * 0.9),
    user_key: Callable[[str], str] | None = None,
) -> None:
    assert len(expected) >= min_users
    key_of = user_key or (lambda uid: s.key("user", uid))
    mismatches = []
    for uid, want in expected.items():
        got = {k.decode(): v.decode() for k, v in r.hgetall(key_of(uid)).items()}
        if want is None:
            if got:
                mismatches.append((uid, "state kept after consent withdrawn", got))
            continue
        fields, affinities = want
        got_aff = {k[4:]: float(v) for k, v in got.items() if k.startswith("aff:")}
        got_fields = {k: v for k, v in got.items() if not k.startswith("aff:")}
        got_fields["last_items"] = orjson.loads(got_fields.get("last_items", "[]"))
        if got_fields != fields or got_aff != pytest.approx(affinities, rel=1e-9):
            mismatches.append((uid, fields, got_fields, affinities, got_aff))
    assert not mismatches, f"{len(mismatches)} users differ, e.g. {mismatches[:2]}"


def read_topic(
    s: Settings, topic: str, expected: int, timeout_s: float = 60
) -> list[dict[str, Any]]:
    consumer = kafka_clients.consumer(  # the settings' broker and security (TLS, SASL)
        s,
        topic,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=3000,
    )
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=1000)
            for messages in batch.values():
                records.extend(orjson.loads(m.value) for m in messages)
            if len(records) >= expected and not batch:
                break
    finally:
        consumer.close()
    return records


def committed_lag(s: Settings) -> int:
    """Messages of the events topic past the worker group's committed offsets."""
    consumer = kafka_clients.consumer(s, group_id=s.app_id)
    try:
        parts = [
            TopicPartition(s.events_topic, p) for p in consumer.partitions_for_topic(s.events_topic)
        ]
        ends = consumer.end_offsets(parts)
        return sum(ends[tp] - (consumer.committed(tp) or 0) for tp in parts)
    finally:
        consumer.close()
