"""``loopwise rebuild`` against the real broker and Redis.

A real worker applies a marketplace's traffic (with malformed messages, redeliveries and
withdrawn consent); then every key of the test's prefix is deleted from the session's Redis,
as if Redis had lost its data, and ``loopwise rebuild`` must recompute every user hash, the
catalog, the counters and the dedup memory exactly as the worker had written them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from test_pipeline_integration import committed_lag, malformed
from worker_helpers import stats, wait_until

from loopwise.config import Settings, load_settings
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.streams.rebuild import RebuildError, describe, rebuild
from loopwise.streams.redis_store import Epoch
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

N_GOOD = 3000
N_BAD = 80
N_REDELIVERED = 150
REBUILT_COUNTERS = ("consumed", "accepted", "duplicates", "deadlettered", "no_consent")


def market_for(s: Settings, n: int, seed: int) -> Marketplace:
    config = MarketConfig(n_users=150, n_items=15, seed=seed, run_tag=s.key_prefix.strip(":"))
    return Marketplace(config.ending_by(int(time.time() * 1000), n))


def build_stream(s: Settings) -> tuple[list[dict[str, Any]], list[tuple[bytes, bytes]], list]:
    """The catalog, and the traffic: good events, malformed ones, redeliveries."""
    rng = random.Random(8)
    market = market_for(s, N_GOOD, seed=23)
    catalog = market.catalog_events()
    good = list(market.events(N_GOOD))
    for uid in rng.sample(sorted({e["user_id"] for e in good}), 3):
        positions = [i for i, e in enumerate(good) if e["user_id"] == uid]
        good[positions[len(positions) // 2]]["consent"] = False
    stream = [(e["user_id"].encode(), orjson.dumps(e)) for e in good]
    accepted = {value for _, value in stream[: len(good)]}
    for n in range(N_BAD):
        user = rng.choice(good)["user_id"]
        raw, _ = malformed(rng, user, n, s.max_event_bytes)
        stream.insert(rng.randrange(len(stream) + 1), (user.encode(), raw))
    for _ in range(N_REDELIVERED):  # redelivered good events: the same bytes again
        i = rng.randrange(len(stream))
        while stream[i][1] not in accepted:
            i = rng.randrange(len(stream))
        stream.insert(min(len(stream), i + rng.choice([1, 40, 2000])), stream[i])
    return catalog, stream, good


def publish(producer: KafkaProducer, s: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    for key, value in messages:
        producer.send(s.events_topic, key=key, value=value)
    producer.flush()


def snapshot(r: redis.Redis, s: Settings) -> dict[str, Any]:
    """What rebuild recomputes: user hashes, catalog, counters, the ids in the dedup sets."""
    users = {key: r.hgetall(key) for key in r.scan_iter(match=s.key("user", "*"), count=1000)}
    seen: set[bytes] = set()
    for key in r.scan_iter(match=s.key("seen", "*"), count=1000):
        seen |= r.smembers(key)
    counters = stats(r, s)
    return {
        "users": users,
        "catalog": r.hgetall(s.key("catalog")),
        "counters": {
            k: v
            for k, v in counters.items()
            if k in REBUILT_COUNTERS or k.startswith("deadletter:")
        },
        "seen": seen,
    }


def delete_prefix(r: redis.Redis, s: Settings) -> int:
    """Every key of this test's prefix, and only those: Redis 'lost its data'."""
    keys = list(r.scan_iter(match=s.key_prefix + "*", count=1000))
    if keys:
        r.delete(*keys)
    return len(keys)


def run_cli(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWISE_")}
    return subprocess.run(
        [sys.executable, "-m", "loopwise.cli", *args],
        env={**env, **s.as_env()},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_rebuild_recomputes_users_catalog_counters_and_dedup_memory_exactly(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    s = load_settings(**{**isolated_settings.model_dump(), "arms": {"popularity": 1.0}})
    ensure_topics(s)
    catalog, stream, good = build_stream(s)
    r = redis.Redis.from_url(s.redis_url)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=5, acks="all")
    log = (tmp_path / "worker.log").open("wb")
    worker = spawn_worker(s, output=log)
    try:
        publish(producer, s, [(e["item_id"].encode(), orjson.dumps(e)) for e in catalog])
        wait_until(lambda: r.hlen(s.key("catalog")) == len(catalog), 120, "the catalog", worker)
        publish(producer, s, stream)
        published = len(catalog) + len(stream)
        wait_until(lambda: stats(r, s)["consumed"] == published, 300, "every message", worker)
        assert stop_worker(worker) == 0
        assert committed_lag(s) == 0
        live = snapshot(r, s)
        assert len(live["users"]) > 100 and live["counters"]["deadlettered"] == N_BAD
        assert live["counters"]["duplicates"] == N_REDELIVERED
        assert live["counters"]["no_consent"] == 3

        assert delete_prefix(r, s) > len(live["users"])
        done = run_cli(s, "rebuild", "--json", "--no-progress")
        assert done.returncode == 0, done.stderr
        summary = orjson.loads(done.stdout)
        assert summary["messages"] == published and summary["skipped"] == 0
        assert summary["deadletters_dropped"] == N_BAD and summary["replaced_epoch"] is None
        epoch = Epoch.from_json(r.get(s.key("epoch")) or b"")
        assert epoch is not None and epoch.origin == "rebuild" and epoch.id == summary["epoch"]

        rebuilt = snapshot(r, s)
        assert rebuilt["users"].keys() == live["users"].keys()
        differing = [k for k, v in live["users"].items() if rebuilt["users"][k] != v]
        assert differing == [], f"{len(differing)} users differ, e.g. {differing[:3]}"
        assert rebuilt["catalog"] == live["catalog"]
        assert rebuilt["counters"] == live["counters"]
        assert rebuilt["seen"] == live["seen"]

        refused = run_cli(s, "rebuild", "--no-progress")
        assert refused.returncode == 2 and "holds epoch" in refused.stderr, refused.stderr

        # The worker resumes where the rebuilt state ends: applied events are duplicates.
        worker = spawn_worker(s, output=log)
        again = random.Random(4).sample(good, 100)
        publish(producer, s, [(e["user_id"].encode(), orjson.dumps(e)) for e in again])
        wait_until(lambda: stats(r, s)["consumed"] == published + 100, 120, "resent", worker)
        assert stop_worker(worker) == 0
        after = stats(r, s)
        assert after["duplicates"] == live["counters"]["duplicates"] + 100
        assert after["accepted"] == live["counters"]["accepted"]
        assert snapshot(r, s)["users"] == live["users"]
        assert "lost the state" not in (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
        producer.close()
        r.close()


def commit_group_at_end(s: Settings) -> dict[int, int]:
    """The worker group's offsets at the end of the events topic, as a worker would leave
    them (committed by a consumer that is not a member: the group is empty)."""
    consumer = KafkaConsumer(
        bootstrap_servers=s.bootstrap_servers, group_id=s.app_id, enable_auto_commit=False
    )
    try:
        tps = [TopicPartition(s.events_topic, p) for p in range(s.topic_partitions)]
        ends = consumer.end_offsets(tps)
        consumer.commit({tp: OffsetAndMetadata(ends[tp]) for tp in tps})
        return {tp.partition: ends[tp] for tp in tps}
    finally:
        consumer.close()


def test_rebuild_from_a_topic_that_lost_old_messages_says_how_many(
    isolated_settings: Settings,
) -> None:
    s = isolated_settings
    ensure_topics(s)
    market = market_for(s, 400, seed=5)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
    try:
        catalog = [(e["item_id"].encode(), orjson.dumps(e)) for e in market.catalog_events()]
        publish(producer, s, catalog)
        publish(producer, s, [(e["user_id"].encode(), orjson.dumps(e)) for e in market.events(400)])
    finally:
        producer.close()
    ends = commit_group_at_end(s)
    partition = max(ends, key=ends.__getitem__)
    gone = ends[partition] // 3
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    try:  # what retention.ms would do to the oldest messages
        admin.delete_records({TopicPartition(s.events_topic, partition): gone})
    finally:
        admin.close()

    report = rebuild(s, progress=False)
    by_partition = {r.partition: r for r in report.ranges}
    assert by_partition[partition].skipped == gone and by_partition[partition].start == gone
    assert report.skipped == gone and report.messages == sum(ends.values()) - gone
    assert report.counters["consumed"] == report.messages
    lines = list(describe(report))
    assert any(f"{gone:,} before them no longer retained" in line for line in lines)
    assert any(line.startswith(f"warning: {gone:,} messages") for line in lines)

    with pytest.raises(RebuildError, match="did not lose its data"):
        rebuild(s, progress=False)
    forced = rebuild(s, force=True, progress=False)  # replaces, never adds up
    assert forced.replaced_epoch is not None and forced.replaced_epoch.id == report.epoch.id  # type: ignore[union-attr]
    r = redis.Redis.from_url(s.redis_url)
    try:
        assert stats(r, s)["consumed"] == report.messages
    finally:
        r.close()
