"""Redis's state survives a crash of Redis, and a worker notices a Redis that lost its data.

Each test runs a real worker against the session's Kafka broker and a Redis server of its
own (its own port and folder, started here), so that killing, emptying and restarting that
Redis touches nothing else of the session.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from kafka import KafkaProducer
from worker_helpers import stats, wait_until

from loopwise.config import Settings, load_settings
from loopwise.infra import RedisServer, free_port
from loopwise.infra.kafka_broker import port_open
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.streams.redis_store import Epoch
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import DATA_LOST_EXIT, spawn_worker, stop_worker

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), state_dir=tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def on_redis(settings: Settings, server: RedisServer, **overrides: Any) -> Settings:
    return load_settings(**{**settings.model_dump(), "redis_url": server.url, **overrides})


def traffic(s: Settings, n: int, seed: int = 3) -> list[tuple[bytes, bytes]]:
    """The catalog, then ``n`` organic events dated in the past, as (key, value)."""
    market = Marketplace(
        MarketConfig(n_users=80, n_items=10, seed=seed, run_tag=s.key_prefix.strip(":")).ending_by(
            int(time.time() * 1000), n
        )
    )
    catalog = [(e["item_id"].encode(), orjson.dumps(e)) for e in market.catalog_events()]
    return catalog + [(e["user_id"].encode(), orjson.dumps(e)) for e in market.events(n)]


def publish(producer: KafkaProducer, s: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    for key, value in messages:
        producer.send(s.events_topic, key=key, value=value)
    producer.flush()


def kill_9(server: RedisServer) -> None:
    pid = server.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: server.pid() is None, 30, "redis-server to die")
    # /proc shows no command line once the dying process has released its memory, a moment
    # before the kernel closes its files: wait for the listening socket too.
    wait_until(lambda: not port_open(server.host, server.port), 30, "redis-server's port to close")


def user_state(r: redis.Redis, s: Settings) -> dict[str, Any]:
    """What a crash must not lose: user hashes, catalog, dedup sets, counters, epoch."""
    state: dict[str, Any] = {}
    for family in ("user", "seen"):
        for key in r.scan_iter(match=s.key(family, "*"), count=1000):
            state[key] = r.hgetall(key) if family == "user" else r.smembers(key)
    counters = stats(r, s)
    state["catalog"] = r.hgetall(s.key("catalog"))
    state["stats"] = {k: counters[k] for k in ("consumed", "accepted", "duplicates")}
    state["epoch"] = r.get(s.key("epoch"))
    return state


def test_kill_9_of_redis_mid_run_loses_nothing_and_the_worker_goes_on(
    isolated_settings: Settings, own_redis: RedisServer, tmp_path: Path
) -> None:
    s = on_redis(isolated_settings, own_redis, arms={"popularity": 1.0})
    ensure_topics(s)
    messages = traffic(s, 1490)
    first, second = messages[:1000], messages[1000:]
    r = redis.Redis.from_url(s.redis_url)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
    out = tmp_path / "worker.log"
    with out.open("wb") as output:
        worker = spawn_worker(s, output=output)
        try:
            publish(producer, s, first)
            wait_until(lambda: stats(r, s)["consumed"] == 1000, 120, "the first part", worker)
            before = user_state(r, s)
            assert sum(isinstance(k, bytes) and b":user:" in k for k in before) > 50
            assert before["epoch"]

            kill_9(own_redis)  # the worker keeps running: its Redis calls fail meanwhile
            time.sleep(1.0)
            own_redis.start()  # same port, same folder: it loads the append-only file
            assert user_state(r, s) == before

            publish(producer, s, second)
            wait_until(lambda: stats(r, s)["consumed"] == 1500, 120, "the second part", worker)
            assert stats(r, s)["accepted"] == 1500
            assert worker.poll() is None
            assert stop_worker(worker) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
            producer.close()
            r.close()
    assert "lost the state" not in out.read_text()


def run_until(
    s: Settings, out: Path, done: str, timeout: float, args: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """A worker writing to ``out``, once ``done`` appears in what it wrote."""
    with out.open("wb") as output:
        worker = spawn_worker(s, output=output, args=args)
    try:
        wait_until(lambda: done in out.read_text(), timeout, repr(done), worker)
    except BaseException:
        worker.kill()
        raise
    return worker


def critical_lines(out: Path) -> list[str]:
    return [line for line in out.read_text().splitlines() if " CRITICAL " in line]


def test_a_flushed_redis_stops_the_worker_which_then_refuses_until_told_to_accept(
    isolated_settings: Settings, own_redis: RedisServer, tmp_path: Path
) -> None:
    s = on_redis(isolated_settings, own_redis, decisions=False)  # no timer: the batch notices
    ensure_topics(s)
    messages = traffic(s, 301)
    r = redis.Redis.from_url(s.redis_url)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
    try:
        worker = run_until(s, tmp_path / "1.log", "worker ready", 120)
        publish(producer, s, messages[:-2])
        wait_until(lambda: stats(r, s)["consumed"] == len(messages) - 2, 120, "events", worker)
        first = Epoch.from_json(r.get(s.key("epoch")) or b"")
        assert first is not None and first.origin == "first_start"

        r.flushall()
        publish(producer, s, messages[-2:-1])
        assert worker.wait(timeout=60) == DATA_LOST_EXIT
        [line] = critical_lines(tmp_path / "1.log")
        assert f"Redis at {s.redis_url} lost the state of consumer group '{s.app_id}'" in line
        assert f"epoch key {s.key('epoch')} is gone" in line and first.id in line
        assert "loopwise rebuild" in line and "--accept-empty-redis" in line
        assert r.dbsize() == 0, "the batch that found the loss must write nothing"

        refused = run_until(s, tmp_path / "2.log", "CRITICAL", 120)
        assert refused.wait(timeout=60) == DATA_LOST_EXIT
        [line] = critical_lines(tmp_path / "2.log")
        assert f"it has no epoch key {s.key('epoch')}, but the group has committed" in line
        assert "the worker does not start" in line and "worker ready" not in line
        assert r.dbsize() == 0

        args = ("--accept-empty-redis",)
        worker = run_until(s, tmp_path / "3.log", "worker ready", 120, args)
        anew = Epoch.from_json(r.get(s.key("epoch")) or b"")
        assert anew is not None and anew.origin == "accept_empty_redis" and anew.id != first.id
        publish(producer, s, messages[-1:])
        # The batch that found the loss was not acked: it is read again, with the new event.
        wait_until(lambda: stats(r, s)["consumed"] == 2, 60, "two events", worker)
        assert stop_worker(worker) == 0
        assert stats(r, s)["accepted"] == 2
    finally:
        producer.close()
        r.close()


def test_redis_restarted_empty_stops_an_idle_worker_through_its_timer(
    isolated_settings: Settings, own_redis: RedisServer, tmp_path: Path
) -> None:
    s = on_redis(isolated_settings, own_redis, arms={"popularity": 1.0})
    ensure_topics(s)
    r = redis.Redis.from_url(s.redis_url)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
    try:
        worker = run_until(s, tmp_path / "worker.log", "worker ready", 120)
        publish(producer, s, traffic(s, 200))
        wait_until(lambda: stats(r, s)["consumed"] == 210, 120, "events", worker)

        kill_9(own_redis)  # and its disk is lost: it comes back empty
        shutil.rmtree(own_redis.data_dir)
        own_redis.start()
        assert worker.wait(timeout=60) == DATA_LOST_EXIT  # no event came: the 1 s timer saw it
        [line] = critical_lines(tmp_path / "worker.log")
        assert "is gone" in line and "loopwise rebuild" in line
    finally:
        producer.close()
        r.close()


def newest_aof(server: RedisServer) -> Path:
    """Redis's growing append-only file (``appendonly.aof.{seq}.incr.aof``)."""
    files = list((server.data_dir / "appendonlydir").glob("*.incr.aof"))
    return max(files, key=lambda f: int(f.name.split(".")[-3]))


def test_a_redis_that_lost_its_last_writes_gets_them_again_from_kafka(
    isolated_settings: Settings, own_redis: RedisServer, tmp_path: Path
) -> None:
    """A machine crash with ``appendfsync everysec`` loses the AOF's last second: Redis comes
    back holding less than the offsets the worker acked to Kafka. The worker finds the gap
    (the partition's position in Redis is behind its next message), reads those offsets
    again and applies them: the users end exactly as before the loss."""
    s = on_redis(isolated_settings, own_redis, arms={"popularity": 1.0})
    ensure_topics(s)
    messages = traffic(s, 990)  # 10 catalog events + 990
    first, second = messages[:600], messages[600:]
    r = redis.Redis.from_url(s.redis_url)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
    try:
        worker = run_until(s, tmp_path / "1.log", "worker ready", 120)
        publish(producer, s, first)
        wait_until(lambda: stats(r, s)["consumed"] == 600, 120, "the first part", worker)
        time.sleep(1.0)  # idle: what the AOF holds now is the first part's state
        aof = newest_aof(own_redis)
        kept = aof.stat().st_size
        publish(producer, s, second)
        wait_until(lambda: stats(r, s)["consumed"] == 1000, 120, "the second part", worker)
        before = {k: v for k, v in user_state(r, s).items() if k not in ("epoch",)}
        users_before = {k: v for k, v in before.items() if isinstance(k, bytes) and b":user:" in k}
        time.sleep(2.5)  # the group commits the acked offsets (every second)
        assert stop_worker(worker) == 0

        kill_9(own_redis)
        assert newest_aof(own_redis) == aof, "an AOF rewrite in a 1,000-event test"
        with aof.open("r+b") as f:
            f.truncate(kept)  # the machine crash: the file's tail never reached the disk
        own_redis.start()
        lost = stats(r, s)
        assert lost["consumed"] == 600, "the cut did not take Redis back to the first part"

        out = tmp_path / "2.log"
        worker = run_until(s, out, "worker ready", 120)
        # Nothing new for the users: one unchanged item event per partition wakes each up.
        item = orjson.loads(messages[0][1])
        for partition in range(s.topic_partitions):
            again = {**item, "event_id": f"wake-{partition}"}
            producer.send(s.events_topic, value=orjson.dumps(again), partition=partition)
        producer.flush()
        total = 1000 + s.topic_partitions
        wait_until(lambda: stats(r, s)["consumed"] == total, 120, "the gap applied", worker)
        assert stop_worker(worker) == 0
        after = stats(r, s)
        assert (after["accepted"], after["duplicates"], after["deadlettered"]) == (total, 0, 0)
        users_after = {k: v for k, v in user_state(r, s).items() if k in users_before}
        assert users_after == users_before and len(users_before) > 50
        assert r.hgetall(s.key("catalog")) == before["catalog"]
        log = out.read_text()
        assert "were acked to Kafka but are not in Redis: reading them again" in log
        applied_again = sum(
            int(n) for n in re.findall(r": (\d+) messages of offsets \d+-\d+ applied again", log)
        )
        assert applied_again == 400
    finally:
        producer.close()
        r.close()
