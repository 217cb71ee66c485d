"""Crashes mid-run: the worker SIGKILLed at random moments, the broker killed with -9.

A broker and a Redis of this test's own (it kills the broker), a real worker
process, and 8,000 good events for 150 users with malformed messages and
redelivered duplicates mixed in, published in five parts. Between parts the
worker is SIGKILLed at a random moment (twice) and the broker is killed with
-9 and restarted (once). Afterwards every user hash must equal a reference
computed from the good events, each good event must be accepted exactly once,
every refused message must be on the dead-letter topic (at least once: a
redelivered batch sends its dead letters again), the counters must reconcile,
and the group's committed offsets must reach the end of the topic.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from kafka import KafkaProducer
from test_pipeline_integration import (
    assert_users_match,
    committed_lag,
    malformed,
    read_topic,
    reference_state,
)
from worker_helpers import stats, wait_until

from loopwise.config import load_settings
from loopwise.infra import LocalInfra
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

N_GOOD = 8_000
N_BAD = 400
N_DUPLICATES = 300
PARTS = 5


def build_stream(run_tag: str, max_bytes: int) -> tuple[list[dict[str, Any]], list[Any], list]:
    rng = random.Random(17)
    config = MarketConfig(n_users=150, n_items=12, seed=17, run_tag=run_tag)
    market = Marketplace(config.ending_by(int(time.time() * 1000), N_GOOD))
    catalog = market.catalog_events()
    good = list(market.events(N_GOOD))
    stream: list[tuple[bytes, bytes, str | None]] = [
        (e["user_id"].encode(), orjson.dumps(e), None) for e in good
    ]
    for n in range(N_BAD):
        user = rng.choice(good)["user_id"]
        raw, reason = malformed(rng, user, n, max_bytes)
        stream.insert(rng.randrange(len(stream) + 1), (user.encode(), raw, reason))
    for _ in range(N_DUPLICATES):
        i = rng.randrange(len(stream))
        while stream[i][2] is not None:
            i = rng.randrange(len(stream))
        stream.insert(min(len(stream), i + rng.choice([1, 50, 3000])), stream[i])
    return catalog, good, stream


def test_worker_sigkills_and_a_broker_kill_9_lose_nothing(tmp_path: Path) -> None:
    local = LocalInfra.for_tests(tmp_path / "infra")
    local.up()
    tag = uuid.uuid4().hex[:8]
    s = load_settings(
        bootstrap_servers=local.bootstrap_servers,
        redis_url=local.redis_url,
        kafka_controller_port=local.kafka.controller_port,
        key_prefix=f"crash{tag}:",
        app_id=f"crash-{tag}",
        state_dir=tmp_path / "state",
        arms={"popularity": 1.0},
        batch_size=100,  # many batches per part, so that a kill lands in the middle of them
    )
    rng = random.Random(23)
    r = redis.Redis.from_url(s.redis_url)
    producer: KafkaProducer | None = None
    worker = None
    events: list[str] = []
    try:
        ensure_topics(s)
        catalog, good, stream = build_stream(tag, s.max_event_bytes)
        producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", retries=20)
        log_file = (tmp_path / "worker.log").open("ab")
        worker = spawn_worker(s, output=log_file)
        for e in catalog:
            producer.send(s.events_topic, key=e["item_id"].encode(), value=orjson.dumps(e))
        producer.flush()
        wait_until(lambda: r.hlen(s.key("catalog")) == len(catalog), 120, "the catalog", worker)

        bad_at: set[tuple[int, int]] = set()  # (partition, offset) of every refused message
        size = len(stream) // PARTS + 1
        for part in range(PARTS):
            futures = []
            for key, value, reason in stream[part * size : (part + 1) * size]:
                future = producer.send(s.events_topic, key=key, value=value)
                if reason is not None:
                    futures.append(future)
            producer.flush()
            for future in futures:
                metadata = future.get(timeout=60)
                bad_at.add((metadata.partition, metadata.offset))
            # Strike while the part is being processed, at a random point of it.
            before = min(len(stream), part * size)
            target = before + int(size * rng.uniform(0.2, 0.8))
            wait_until(lambda t=target: stats(r, s)["consumed"] >= t, 120, "the part", worker)
            if part in (1, 3):
                worker.send_signal(signal.SIGKILL)
                worker.wait(30)
                events.append(f"worker SIGKILL after part {part}")
                worker = spawn_worker(s, output=log_file)
            elif part == 2:
                pid = local.kafka.pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda: local.kafka.pid() is None, 30, "the broker to die")
                time.sleep(1.0)
                local.kafka.start()
                events.append(f"broker kill -9 after part {part}")
                if worker.poll() is not None:  # a supervisor restarts it; say that it was needed
                    events.append(f"worker exited with {worker.returncode}: restarted")
                    worker = spawn_worker(s, output=log_file)

        published = len(catalog) + len(stream)
        unique_good = len(catalog) + len(good)
        wait_until(
            lambda: stats(r, s)["accepted"] == unique_good and committed_lag(s) == 0,
            300,
            f"every event applied and committed ({events})",
            worker,
        )
        assert stop_worker(worker) == 0
        counts = stats(r, s)
        print("faults injected:", "; ".join(events), "| counters:", dict(counts))
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        if producer is not None:
            producer.close()

    try:
        # Each good event applied exactly once; every delivery counted once as what it was.
        assert counts["accepted"] == unique_good, events
        assert (
            counts["accepted"] + counts["duplicates"] + counts["deadlettered"] == counts["consumed"]
        )
        # The kills landed mid-stream: some batches were applied but not yet committed to
        # Kafka, delivered again, and counted as duplicates (consumed counts deliveries).
        assert counts["consumed"] > published
        assert counts["deadlettered"] >= N_BAD

        dead = read_topic(s, s.deadletter_topic, N_BAD)
        sources = {(d["source"]["partition"], d["source"]["offset"]) for d in dead}
        assert sources == bad_at, "a refused message is missing from the dead-letter topic"

        categories = {e["item_id"]: e["features"]["category"] for e in catalog}
        assert_users_match(r, s, reference_state(good, categories, s), min_users=140)
    finally:
        r.close()
        local.down()
