"""The worker on a Redis Cluster of 3 masters (Debian's redis-server in cluster mode, started
here) and the real Kafka broker.

On a cluster a transaction must stay in one hash slot, so each events partition's keys carry
its hash tag (``{prefix}{p3}:user:u-42``) and each partition commits in a transaction of its
own. These tests hold the worker to the same exact counts as on one Redis: the pipeline
test's 20,000 messages (malformed, duplicated, consent withdrawn) with a SIGKILL in the
middle, and a closed loop whose decisions are logged exactly once and learned once each.
"""

from __future__ import annotations

import base64
import random
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2
from redis.cluster import RedisCluster
from test_pipeline_integration import (
    N_DUPLICATES,
    NO_CONSENT_USERS,
    assert_users_match,
    build_traffic,
    committed_lag,
    read_topic,
    reference_state,
)
from worker_helpers import log_end_offsets, wait_until

from loopwise.cli import main
from loopwise.config import Settings
from loopwise.export import export_log, read_log
from loopwise.infra.redis_cluster import LocalRedisCluster, cluster_ports
from loopwise.learners.policy import restore
from loopwise.producers.closed_loop import run_closed_loop
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.redis_clients import redis_client
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

PARTITIONS = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    local = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), cluster_ports(3))
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture
def s(isolated_settings: Settings, cluster: LocalRedisCluster) -> Settings:
    return isolated_settings.model_copy(
        update={
            "redis_url": cluster.url,
            "redis_cluster": True,
            "topic_partitions": PARTITIONS,
        }
    )


def stats(r: RedisCluster, s: Settings) -> Counter[str]:
    """The counters summed over every partition's ``{p<N>}:stats`` hash."""
    total: Counter[str] = Counter()
    for key in r.scan_iter(match=s.partition_pattern("stats"), count=1000):
        total.update({k.decode(): int(v) for k, v in r.hgetall(key).items()})
    return total


def partition_of(user_id: str, partitions: int) -> int:
    """Kafka's default partitioner (murmur2 of the key), as the producers used here apply."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def test_pipeline_counts_are_exact_on_a_redis_cluster_through_a_sigkill(s: Settings) -> None:
    ensure_topics(s)
    traffic = build_traffic(s)
    market: Marketplace = traffic["market"]
    r = redis_client(s)
    assert isinstance(r, RedisCluster)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=5, acks="all")
    worker = spawn_worker(s)
    try:
        catalog = market.catalog_events()
        for e in catalog:
            producer.send(s.events_topic, key=e["item_id"].encode(), value=orjson.dumps(e))
        producer.flush()
        wait_until(lambda: r.hlen(s.key("catalog")) == len(catalog), 120, "the catalog", worker)

        stream = traffic["stream"]
        half = len(stream) // 2
        for key, value, _ in stream[:half]:
            producer.send(s.events_topic, key=key, value=value)
        producer.flush()
        # Killed mid-stream: batches committed in some partitions' transactions and not in
        # others' are replayed by the next worker, and each partition skips what it holds.
        wait_until(lambda: stats(r, s)["consumed"] > half // 3, 120, "a third of the first half")
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        worker = spawn_worker(s)
        for key, value, _ in stream[half:]:
            producer.send(s.events_topic, key=key, value=value)
        producer.flush()
        published = len(catalog) + len(stream)
        good_unique = len(catalog) + len(traffic["good"])
        wait_until(lambda: stats(r, s)["accepted"] == good_unique, 300, "every event", worker)
        wait_until(lambda: committed_lag(s) == 0, 120, "every offset committed", worker, 1.0)
        assert stop_worker(worker) == 0, "SIGTERM must stop the worker cleanly"

        # Each message counted once, and once more per redelivery after the kill (which
        # counts as a duplicate): nothing of a committed transaction is applied twice.
        counts = stats(r, s)
        redelivered = counts["redelivered"]
        assert counts["accepted"] == good_unique
        assert counts["deadlettered"] == traffic["n_bad"]
        assert counts["duplicates"] == N_DUPLICATES + redelivered
        assert counts["consumed"] == published + redelivered
        assert counts["no_consent"] == NO_CONSENT_USERS

        # Every bad message on the dead-letter topic with its reason (at least once: a kill
        # between a batch's dead letters and its transaction sends them again).
        expected_reasons = {raw: reason for _, raw, reason in stream if reason}
        dead = read_topic(s, s.deadletter_topic, len(expected_reasons))
        seen_raw = set()
        for record in dead:
            raw = base64.b64decode(record["original_b64"])
            assert record["reason"] == expected_reasons[raw], record
            seen_raw.add(raw)
        assert seen_raw == set(expected_reasons)
        assert len(dead) >= counts["deadlettered"]

        # Every user hash equals the reference, under its events partition's hash tag.
        categories = {e["item_id"]: e["features"]["category"] for e in catalog}
        expected = reference_state(traffic["good"], categories, s)

        def user_key(uid: str) -> str:
            return s.partition_key(partition_of(uid, PARTITIONS), "user", uid)

        assert_users_match(r, s, expected, user_key=user_key)  # type: ignore[arg-type]
        tagged = list(r.scan_iter(match=s.partition_pattern("user", "*"), count=1000))
        assert len(tagged) == sum(1 for v in expected.values() if v is not None)
        assert not list(r.scan_iter(match=s.key("user", "*"), count=1000))  # no untagged one

        # The keys spread over the cluster: each partition's in its own slot, on every master.
        seen = [k.decode() for k in r.scan_iter(match=s.partition_pattern("seen", "*"))]
        assert {k.split("}")[0] for k in seen} == {
            f"{s.key_prefix}{{p{p}" for p in range(PARTITIONS)
        }
        masters = {
            r.get_node_from_key(k).name  # type: ignore[union-attr]
            for k in tagged + seen
        }
        assert len(masters) >= 2, masters
        print(f"redeliveries after the kill: {redelivered}; masters used: {sorted(masters)}")
    finally:
        if worker.poll() is None:
            worker.kill()
        producer.close()
        r.close()


def test_closed_loop_on_a_redis_cluster_logs_and_learns_each_decision_once(
    s: Settings, tmp_path: Path
) -> None:
    s = s.model_copy(update={"attribution_window_ms": 2_000, "snapshot_interval_s": 1.0})
    ensure_topics(s)
    market = Marketplace(MarketConfig(seed=7, run_tag=s.key_prefix.strip(":")))
    r = redis_client(s)
    out = tmp_path / "decisions.jsonl"
    worker = spawn_worker(s)
    results = []
    sim = threading.Thread(
        target=lambda: results.append(
            run_closed_loop(s, market, 4_000, out, rate=1000.0, seed=7, progress=False)
        )
    )
    sim.start()
    try:
        wait_until(lambda: stats(r, s)["decisions_closed"] > 1_000, 120, "decisions to close")
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        worker = spawn_worker(s)
        sim.join(300)
        assert results and results[0].decisions == 4_000
        published = results[0].published

        def settled() -> bool:
            counts = stats(r, s)
            model_offsets = r.hget(s.key("model"), "offsets")
            learned = sum(orjson.loads(model_offsets).values()) if model_offsets else -1
            outboxes = sum(r.llen(s.partition_key(p, "outbox", str(p))) for p in range(PARTITIONS))
            return (
                counts["accepted"] == published
                and counts["decisions_opened"] == counts["decisions_closed"]
                and outboxes == 0
                and learned == sum(log_end_offsets(s).values())
            )

        wait_until(settled, 180, "every decision closed, logged and learned", worker)

        # `loopwise forget` finds the user's tombstone and decisions under their partition.
        gone = sorted(orjson.loads(line)["user_id"] for line in out.read_bytes().splitlines())[0]
        user_key = s.partition_key(partition_of(gone, PARTITIONS), "user", gone)
        assert r.exists(user_key)
        result = CliRunner().invoke(main, ["forget", gone, "--wait", "60"], env=s.as_env())
        assert result.exit_code == 0 and "tombstone kept" in result.output, result.output
        assert not r.exists(user_key) and not r.exists(s.key("nba", gone))
        decisions = [
            orjson.loads(v)
            for k in r.scan_iter(match=s.partition_pattern("decision", "*"), count=1000)
            if (v := r.get(k)) is not None
        ]
        assert decisions and not [d for d in decisions if d["user_id"] == gone]
        assert stop_worker(worker) == 0
        counts = stats(r, s)
        log_file = tmp_path / "log.jsonl"
        export_log(s, log_file, progress=False)
        records = list(read_log(log_file))
        ids = [rec["decision_id"] for rec in records]
        assert len(ids) == len(set(ids)) == counts["decisions_closed"] > 3_000
        shown = {orjson.loads(line)["decision_id"] for line in out.read_bytes().splitlines()}
        assert set(ids) <= shown
        # Each log record learned once: the snapshot's offsets are the log's end, and the
        # arms' policies learned as many examples as their arms have records.
        model = r.hgetall(s.key("model"))
        assert int(model[b"version"]) > 0
        assert not r.exists(s.key("model", "lease"))  # released at the clean stop
        assert restore(bytes(model[b"vw"])).version == len(records)
        holdout = s.holdout_arm
        own = sum(1 for rec in records if rec["arm"] == holdout)
        assert restore(bytes(model[holdout.encode()]), kind=holdout).version == own
        # Next-best-actions hash by user (serving layers read nba:{user_id} as on one Redis).
        sample = random.Random(1).sample(sorted({rec["user_id"] for rec in records}), 20)
        assert any(r.get(s.key("nba", u)) for u in sample)
    finally:
        if worker.poll() is None:
            worker.kill()
        sim.join(5)
        r.close()
