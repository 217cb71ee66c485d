"""The learning loop, closed, against the real Kafka broker and the real Redis.

The simulator plays a serving layer that knows only docs/contracts.md: it reads
``nba:{user_id}``, shows the item, publishes the view with its decision_id and
the clicks its hidden ground truth draws. The worker joins, logs, learns.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis
from worker_helpers import stats, wait_until

from loopwise.config import Settings
from loopwise.export import export_log, read_log
from loopwise.producers.closed_loop import run_closed_loop
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.report import build_report
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker

pytestmark = pytest.mark.integration


def start_worker(s: Settings) -> subprocess.Popen[bytes]:
    return spawn_worker(s, log_level="warning")


def outbox_empty(r: redis.Redis, s: Settings) -> bool:
    return all(r.llen(s.key("outbox", str(p))) == 0 for p in range(s.topic_partitions))


def open_decisions(r: redis.Redis, s: Settings) -> int:
    return sum(r.hlen(s.key("join", str(p))) for p in range(s.topic_partitions))


def test_closed_loop_learns_close_to_the_oracle(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    s = isolated_settings.model_copy(update={"snapshot_interval_s": 2.0})
    ensure_topics(s)
    market = Marketplace(
        MarketConfig(n_users=200, n_items=12, seed=3, run_tag=s.key_prefix.strip(":"))
    )
    # The ground truth is contextual: for most users the best item changes with the context.
    contexts = [{"device": d, "hour": h} for d in market.config.devices for h in (3, 9, 15, 21)]
    varies = [len({market.best_item(u, c) for c in contexts}) > 1 for u in market.users]
    assert sum(varies) >= 0.5 * len(varies)
    r = redis.Redis.from_url(s.redis_url)
    worker = start_worker(s)
    out = tmp_path / "decisions.jsonl"
    try:
        result = run_closed_loop(s, market, 100_000, out, rate=3000.0, seed=3, progress=False)
        assert result.decisions == 100_000
        report = build_report(out, holdout=s.holdout_arm, last=20_000)
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        vw_arm = report["sections"]["last"]["arms"]["vw"]
        vw, oracle, uniform = vw_arm["reward"]["mean"], vw_arm["oracle"], vw_arm["uniform"]
        assert vw >= 0.8 * oracle, (vw, oracle)
        assert vw >= 2 * uniform, (vw, uniform)
        lift = vw_arm["lift"]["reward"]["diff"]
        assert lift["ci_low"] > 0, lift

        # The log: one record per closed decision, each with propensity = pmf[chosen].
        wait_until(
            lambda: stats(r, s)["accepted"] == result.published and outbox_empty(r, s),
            120,
            "the worker to consume everything and drain its outbox",
        )
        closed = stats(r, s)["decisions_closed"]
        assert worker.send_signal(signal.SIGTERM) is None and worker.wait(60) == 0
        log_file = tmp_path / "log.jsonl"
        export_log(s, log_file, progress=False)
        records = list(read_log(log_file))
        assert len(records) == closed > 90_000
        assert len({rec["decision_id"] for rec in records}) == len(records)
        catalog = {k.decode(): orjson.loads(v) for k, v in r.hgetall(s.key("catalog")).items()}
        for rec in records:
            assert rec["propensity"] == rec["pmf"][rec["chosen"]]
            assert rec["arm"] in s.arms
            # The candidates' features as decided, resolved from the stored decision's
            # item versions (the catalog did not change during the run).
            for action in rec["actions"]:
                features = {k: v for k, v in catalog[action["id"]].items() if k != "active"}
                assert action["features"] == features
        # Decisions not shown are stored compact: candidates by item version, whose features
        # are in itemv: keys that outlive them.
        stored = [
            orjson.loads(r.get(key) or b"null")
            for key in list(r.scan_iter(match=s.key("decision", "*"), count=1000))[:200]
        ]
        stored = [d for d in stored if d is not None]
        assert stored
        for decision in stored:
            assert all(isinstance(a, str) for a in decision["actions"])
            for item_id, version in zip(decision["actions"], decision["versions"], strict=True):
                assert r.ttl(s.key("itemv", item_id, version)) > r.ttl(
                    s.key("decision", decision["decision_id"])
                )
        # The learner's reward-rate monitor, saved with its snapshots: every arm watched.
        monitor = orjson.loads(r.hget(s.key("model"), "reward_monitor") or b"{}")
        assert set(monitor) == set(s.arms), monitor
        assert 0 < sum(m["n"] for m in monitor.values()) <= len(records)
    finally:
        if worker.poll() is None:
            worker.kill()
        r.close()


def test_sigkill_loses_no_decision_logs_none_twice_and_learning_resumes(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    # Short windows (event time and wall clock) so every decision closes within the test.
    s = isolated_settings.model_copy(
        update={"attribution_window_ms": 2_000, "snapshot_interval_s": 1.0}
    )
    ensure_topics(s)
    market = Marketplace(MarketConfig(seed=5, run_tag=s.key_prefix.strip(":")))
    r = redis.Redis.from_url(s.redis_url)
    out = tmp_path / "decisions.jsonl"
    worker = start_worker(s)
    results = []
    sim = threading.Thread(
        target=lambda: results.append(
            run_closed_loop(s, market, 12_000, out, rate=1500.0, seed=5, progress=False)
        )
    )
    sim.start()
    try:
        wait_until(lambda: stats(r, s)["decisions_closed"] > 3_000, 120, "decisions to close")
        assert r.hget(s.key("model"), "offsets") is not None, "no model snapshot yet"
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        time.sleep(2)  # the simulator keeps publishing while the worker is down
        worker = start_worker(s)
        sim.join(300)
        assert not sim.is_alive()
        shown = {orjson.loads(line)["decision_id"] for line in out.read_bytes().splitlines()}
        assert len(shown) == 12_000
        # Every message consumed; every shown decision closes (2 s window) and reaches the log.
        published = results[0].published
        wait_until(
            lambda: (
                stats(r, s)["accepted"] == published
                and open_decisions(r, s) == 0
                and outbox_empty(r, s)
            ),
            180,
            "the worker to consume everything and close every decision",
        )
        log_file = tmp_path / "log.jsonl"
        export_log(s, log_file, progress=False)
        logged = Counter(rec["decision_id"] for rec in read_log(log_file))
        assert not [d for d, n in logged.items() if n > 1], "a decision was logged twice"
        lost = shown - set(logged)
        assert not lost, f"{len(lost)} shown decisions lost; counters {dict(stats(r, s))}"
        # Learning resumed from the snapshot: every record learned exactly once.
        time.sleep(3)  # a snapshot after the last record
        model = r.hgetall(s.key("model"))
        from loopwise.learners.policy import restore

        vw = restore(bytes(model[b"vw"]))
        assert vw.version == sum(logged.values())
    finally:
        if worker.poll() is None:
            worker.kill()
        r.close()
