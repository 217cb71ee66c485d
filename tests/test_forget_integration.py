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

import orjson
import pytest
import redis
from click.testing import CliRunner
from worker_helpers import stats, wait_until

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
