"""One learner among the workers (``loopwise.streams.learning``), on the real broker and Redis.

The lease: one holder at a time, renewed only by its holder, and a snapshot written only
while it is held (fencing). Two learning roles in one event loop, as two workers would
run them: exactly one learns, each log record is learned once across a hand-over, and the
other worker decides with the published snapshot, whose version never goes back.
"""

from __future__ import annotations

import asyncio
import time
from itertools import count

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from loopwise import kafka_clients
from loopwise.config import Settings, load_settings
from loopwise.learners.policy import restore
from loopwise.streams.learner import Learner, build_policies
from loopwise.streams.learning import Learning, Lease, LeaseLost
from loopwise.streams.topics import ensure_topics

pytestmark = pytest.mark.integration

_ids = count()


def log_record(user: str, arm: str, chosen: int, reward: float) -> bytes:
    items = [f"i{k}" for k in range(5)]
    pmf = [0.2] * 5
    return orjson.dumps(
        {
            "decision_id": f"d{next(_ids)}",
            "timestamp": 1_700_000_000_000,
            "user_id": user,
            "arm": arm,
            "policy_version": f"{arm}/{arm}/0",
            "context": {"device": "mobile"},
            "user_features": {"user_id": user, "views": 3},
            "actions": [
                {"id": i, "features": {"category": f"c{k % 2}"}} for k, i in enumerate(items)
            ],
            "chosen": chosen,
            "propensity": pmf[chosen],
            "pmf": pmf,
            "reward": reward,
        }
    )


def publish(s: Settings, n: int, start: int) -> None:
    producer = kafka_clients.producer(s, acks="all")
    try:
        for k in range(start, start + n):
            arm = "popularity" if k % 10 == 0 else "vw"
            value = log_record(f"u{k % 37}", arm, k % 5, float(k % 3 == 0))
            producer.send(s.propensity_log_topic, key=f"u{k % 37}".encode(), value=value)
        producer.flush()
    finally:
        producer.close()


def model(s: Settings) -> dict[bytes, bytes]:
    with redis.Redis.from_url(s.redis_url) as r:
        return r.hgetall(s.key("model"))


def test_the_lease_has_one_holder_and_fences_the_snapshot(isolated_settings: Settings) -> None:
    s = isolated_settings

    async def scenario() -> None:
        client = aioredis.Redis.from_url(s.redis_url)
        try:
            key = s.key("model", "lease")
            a, b = Lease(client, key, 1.0), Lease(client, key, 1.0)
            assert await a.acquire() and not await b.acquire()
            assert await a.acquire()  # the holder renews
            await a.hset_if_held(s.key("model"), {"version": 1})
            with pytest.raises(LeaseLost):
                await b.hset_if_held(s.key("model"), {"version": 99})
            await asyncio.sleep(1.2)  # a paused holder: its lease expires, another takes it
            assert await b.acquire() and not await a.renew()
            with pytest.raises(LeaseLost):
                await a.hset_if_held(s.key("model"), {"version": 2})
            await a.release()  # not a's any more: releasing does nothing
            assert await b.holder() == b.token
            await b.release()
            assert await a.acquire()
            assert await client.hget(s.key("model"), "version") == b"1"
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_one_of_two_workers_learns_each_record_once_across_a_hand_over(
    isolated_settings: Settings,
) -> None:
    s = load_settings(
        **{
            **isolated_settings.model_dump(),
            "snapshot_interval_s": 0.3,
            "model_reload_s": 0.2,
            "learner_lease_s": 3.0,
        }
    )
    ensure_topics(s)
    first, second = 1_200, 800

    async def scenario() -> None:
        client = aioredis.Redis.from_url(s.redis_url)
        workers: list[Learning] = []
        tasks: list[asyncio.Task[None]] = []
        stopped: list[asyncio.Task[None]] = []
        try:
            for _ in range(2):
                published = Learner(s, client, build_policies(s))
                workers.append(
                    Learning(s, published, lambda: Learner(s, client, build_policies(s)))
                )
                tasks.append(asyncio.create_task(workers[-1].run()))

            async def until(what: str, check: object, timeout: float = 90.0) -> None:
                deadline = time.monotonic() + timeout
                while not check():  # type: ignore[operator]
                    assert time.monotonic() < deadline, f"timed out: {what}"
                    ended = [t for t in tasks if t.done() and t not in stopped]
                    assert not ended, f"a learning task ended: {ended[0].exception()!r}"
                    await asyncio.sleep(0.1)

            def learned() -> int:
                raw = model(s).get(b"offsets")
                return sum(orjson.loads(raw).values()) if raw else 0

            await asyncio.to_thread(publish, s, first, 0)
            await until("the first records learned", lambda: learned() == first)
            leaders = [w for w in workers if w.learner is not None]
            assert len(leaders) == 1, "exactly one worker learns"
            leader, other = leaders[0], next(w for w in workers if w is not leaders[0])
            version = int(model(s)[b"version"])
            await until("the other worker reloads", lambda: other.published.version == version)
            seen = [other.published.version]

            stopped.append(tasks[workers.index(leader)])
            stopped[0].cancel()  # a clean stop releases the lease
            await asyncio.to_thread(publish, s, second, first)
            await until("the other worker learns", lambda: other.learner is not None, 30)
            await until("every record learned", lambda: learned() == first + second)
            final = int(model(s)[b"version"])
            await until("it decides with the newest", lambda: other.published.version == final)
            seen.append(other.published.version)
            assert seen == sorted(seen) and final > version
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()

    asyncio.run(scenario())
    saved = model(s)
    total = first + second
    # Each record learned exactly once across the hand-over: the VW model's example count is
    # the log's; the holdout (popularity) learned only its own arm's records (every tenth).
    assert restore(bytes(saved[b"vw"])).version == total
    assert restore(bytes(saved[b"popularity"]), kind="popularity").version == total // 10
