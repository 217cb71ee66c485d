"""`loopwise forget USER` against a real worker, broker and Redis.

A user is active (state, next-best-action, stored decisions, an open decision
shown to them); another user is active beside them. After `forget`, a scan of
every Redis key finds nothing that holds the forgotten user's id, the open
decision never reaches the propensity log, the other user is untouched, and an
old event of the user delivered again (a producer's retry, with a new event
id) re-creates nothing; an event dated after the forget starts them afresh.
"""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
import redis
from click.testing import CliRunner
from kafka import TopicPartition
from worker_helpers import stats, wait_until

from loopwise import kafka_clients
from loopwise.cli import main
from loopwise.config import Settings, load_settings
from loopwise.producers.sdk import EventPublisher
from loopwise.streams.redis_store import forgotten_field
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

GONE = "forget-me"
KEPT = "keep-me"


def keys_mentioning(r: redis.Redis, s: Settings, text: str) -> list[str]:
    """Every key under the prefix whose name or value contains ``text``."""
    needle = text.encode()
    found = []
    for key in r.scan_iter(match=s.key_prefix + "*", count=1000):
        kind = r.type(key)
        if kind == b"string":
            values = [r.get(key) or b""]
        elif kind == b"hash":
            values = [k + b"=" + v for k, v in r.hgetall(key).items()]
        elif kind == b"set":
            values = list(r.smembers(key))
        elif kind == b"list":
            values = r.lrange(key, 0, -1)
        else:
            values = []
        if needle in key or any(needle in v for v in values):
            found.append(key.decode())
    return found


def test_forget_erases_every_trace_in_redis_and_old_events_recreate_nothing(
    isolated_settings: Settings,
) -> None:
    s = load_settings(**{**isolated_settings.model_dump(), "arms": {"popularity": 1.0}})
    ensure_topics(s)
    r = redis.Redis.from_url(s.redis_url)
    worker = spawn_worker(s)
    env = {k: v for k, v in s.as_env().items()}
    now = int(time.time() * 1000)
    try:
        with EventPublisher.from_settings(s) as sdk:
            for i in range(5):
                sdk.item(f"item-{i}", {"category": f"c{i % 2}", "price": 10.0 + i})
            sdk.flush()
            for t, user in enumerate([GONE, KEPT] * 20):
                sdk.view(user, f"item-{t % 5}", timestamp=now - 60_000 + t)
            sdk.flush()
            wait_until(lambda: r.exists(s.key("nba", GONE)), 120, "a decision for the user", worker)
            nba = orjson.loads(r.get(s.key("nba", GONE)) or b"{}")
            sdk.view(
                GONE,
                nba["item_id"],
                decision_id=nba["decision_id"],
                propensity=nba["propensity"],
                timestamp=now - 1_000,
            )
            sdk.flush()
            wait_until(lambda: stats(r, s)["decisions_opened"] >= 1, 60, "the view", worker)
            assert keys_mentioning(r, s, GONE)  # the user is all over Redis now

            result = CliRunner().invoke(main, ["forget", GONE, "--wait", "60"], env=env)
            assert result.exit_code == 0, result.output
            assert "tombstone kept" in result.output

            # Nothing in Redis names the user (the tombstone holds a hash of the id).
            assert keys_mentioning(r, s, GONE) == []
            assert r.hexists(s.key("forgotten"), forgotten_field(GONE))
            assert r.exists(s.key("user", KEPT)) and r.exists(s.key("nba", KEPT))
            counts = stats(r, s)
            assert counts["forgets"] == 1 and counts["dropped_no_consent"] == 1

            # An old event of the user again (new event id: not a duplicate) re-creates nothing;
            # one dated after the forget starts the user afresh.
            sdk.view(GONE, "item-1", timestamp=now - 30_000)
            sdk.flush()
            wait_until(lambda: stats(r, s)["forgotten_events"] == 1, 60, "the old event", worker)
            assert keys_mentioning(r, s, GONE) == []
            sdk.click(GONE, "item-2", timestamp=int(time.time() * 1000) + 1_000)
            sdk.flush()
            wait_until(lambda: r.exists(s.key("user", GONE)), 60, "the new event", worker)
            fresh = {k.decode(): v.decode() for k, v in r.hgetall(s.key("user", GONE)).items()}
            assert fresh["views"] == "0" and fresh["clicks"] == "1", fresh
        counts = stats(r, s)
        assert (
            counts["accepted"] + counts["duplicates"] + counts["deadlettered"]
            == (counts["consumed"])
        )
    finally:
        assert stop_worker(worker) == 0
        r.close()


def log_messages(s: Settings) -> list[tuple[bytes, bytes]]:
    """Every (key, value) on the propensity log, read to its end."""
    consumer = kafka_clients.consumer(
        s, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    try:
        partitions = [TopicPartition(s.propensity_log_topic, p) for p in range(s.topic_partitions)]
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        consumer.seek_to_beginning(*partitions)
        found: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, "the log could not be read to its end"
            for records in consumer.poll(timeout_ms=1000).values():
                found.extend((m.key or b"", m.value or b"") for m in records)
        return found
    finally:
        consumer.close()


def test_with_pseudonyms_nothing_left_in_redis_or_on_the_log_links_to_a_forgotten_user(
    isolated_settings: Settings,
) -> None:
    """With ``pseudonym_key``: Redis holds pseudonyms, the log and the models a random token
    per user; ``forget`` deletes the only link between the two. Afterwards neither the id,
    nor its pseudonym, nor its token is anywhere in Redis, and the log (append-only: the
    user's records stay) holds the token only, which nothing maps back to the user."""
    key = "k-" + uuid.uuid4().hex
    s = load_settings(
        **{
            **isolated_settings.model_dump(),
            "arms": {"popularity": 1.0},
            "attribution_window_ms": 1_000,  # shown decisions close (and are logged) at once
            "pseudonym_key": key,
        }
    )
    alias = s.pseudonym(GONE)
    assert alias.startswith("p-") and alias != GONE
    ensure_topics(s)
    r = redis.Redis.from_url(s.redis_url)
    worker = spawn_worker(s)
    env = dict(s.as_env())
    assert env["LOOPWISE_PSEUDONYM_KEY"] == key
    now = int(time.time() * 1000)
    try:
        with EventPublisher.from_settings(s) as sdk:
            for i in range(5):
                sdk.item(f"item-{i}", {"category": f"c{i % 2}", "price": 10.0 + i})
            sdk.flush()
            for t, user in enumerate([GONE, KEPT] * 20):
                sdk.view(user, f"item-{t % 5}", timestamp=now - 60_000 + t)
            sdk.flush()
            wait_until(lambda: r.exists(s.key("nba", alias)), 120, "the user's nba", worker)
            assert not r.exists(s.key("nba", GONE)) and not r.exists(s.key("user", GONE))
            token = (r.hget(s.key("user", alias), "token") or b"").decode()
            assert token.startswith("t-")
            for user in (GONE, KEPT):  # each is shown a decision, which is logged
                nba = orjson.loads(r.get(s.key("nba", s.pseudonym(user))) or b"{}")
                sdk.view(
                    user,
                    nba["item_id"],
                    decision_id=nba["decision_id"],
                    propensity=nba["propensity"],
                    timestamp=now - 1_000,
                )
            sdk.flush()
            wait_until(lambda: stats(r, s)["decisions_closed"] >= 2, 60, "two logged", worker)
            wait_until(lambda: len(log_messages(s)) >= 2, 60, "the log records", worker)
            logged = log_messages(s)
            gone_records = [orjson.loads(v) for k, v in logged if k == token.encode()]
            assert len(gone_records) == 1 and gone_records[0]["user_id"] == token
            assert gone_records[0]["user_features"]["user_id"] == token  # what policies learn
            for needle in (GONE, alias):
                assert not any(needle.encode() in k + v for k, v in logged), needle
            assert keys_mentioning(r, s, GONE) == []  # Redis never held the id itself
            assert keys_mentioning(r, s, alias) and keys_mentioning(r, s, token)

            result = CliRunner().invoke(main, ["forget", GONE, "--wait", "60"], env=env)
            assert result.exit_code == 0, result.output
            assert "tombstone kept" in result.output

            for needle in (GONE, alias, token):
                assert keys_mentioning(r, s, needle) == [], needle
            assert r.hexists(s.key("forgotten"), forgotten_field(alias))
            logged = log_messages(s)
            assert any(token.encode() in v for _, v in logged)  # the log is append-only ...
            for needle in (GONE, alias):  # ... but holds nothing that leads to the user
                assert not any(needle.encode() in k + v for k, v in logged), needle
            assert r.exists(s.key("user", s.pseudonym(KEPT)))

            # Back after the forget: a new state, under a new token.
            sdk.click(GONE, "item-2", timestamp=int(time.time() * 1000) + 1_000)
            sdk.flush()
            wait_until(lambda: r.exists(s.key("user", alias)), 60, "the new event", worker)
            assert (r.hget(s.key("user", alias), "token") or b"").decode() not in ("", token)
    finally:
        assert stop_worker(worker) == 0
        r.close()
