"""Helpers shared by the integration tests that run a real worker process."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable

import orjson
import redis
from kafka import KafkaConsumer, TopicPartition

from loopwise.config import Settings


def stats(r: redis.Redis, s: Settings) -> Counter[str]:
    """The worker's counters (``stats`` hash) as ints."""
    return Counter({k.decode(): int(v) for k, v in r.hgetall(s.key("stats")).items()})


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    worker: subprocess.Popen[bytes] | None = None,
    poll_s: float = 0.2,
) -> None:
    """Poll ``predicate`` until true; fail on timeout or, when given, if ``worker`` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if worker is not None:
            assert worker.poll() is None, (
                f"worker exited with {worker.returncode} while waiting for {what}"
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def log_end_offsets(s: Settings) -> dict[int, int]:
    """The propensity log's end offset per non-empty partition."""
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, group_id=None)
    try:
        tps = [TopicPartition(s.propensity_log_topic, p) for p in range(s.topic_partitions)]
        return {tp.partition: n for tp, n in consumer.end_offsets(tps).items() if n > 0}
    finally:
        consumer.close()


def learned_offsets(r: redis.Redis, s: Settings) -> dict[int, int]:
    """The next log offset per partition the last model snapshot includes."""
    raw = r.hget(s.key("model"), "offsets")
    return {int(p): int(n) for p, n in orjson.loads(raw).items()} if raw else {}


def settled(r: redis.Redis, s: Settings, published: int) -> bool:
    """Everything consumed, every decision closed and logged, the learner at the log's end."""
    parts = [str(p) for p in range(s.topic_partitions)]
    return (
        stats(r, s)["accepted"] == published
        and all(r.hlen(s.key("join", p)) == 0 for p in parts)
        and all(r.llen(s.key("outbox", p)) == 0 for p in parts)
        and learned_offsets(r, s) == log_end_offsets(s)
    )
