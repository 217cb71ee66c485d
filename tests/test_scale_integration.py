"""Many workers, one brain: three workers on six partitions, one killed and one added.

The product's closed loop (``run_closed_loop``) plays the serving layer against real
worker processes in one consumer group (the session's broker and Redis). First a reference
run with one worker; then the same closed loop (same market, same seed) with three
workers, one SIGKILLed a third of the way in and a fourth added two thirds in. Afterwards:

- every message consumed once (``accepted`` = published; nothing dead-lettered);
- every shown decision has exactly one propensity-log record, and nothing else is logged;
- the model's example count (VW's) equals the log's records, the holdout's its own arm's:
  one learner at a time (``loopwise.streams.learning``), through the kill and the joins;
- for every user and arm, the policy versions their decisions carry never go back;
- the truth's expected reward of the decisions shown in the second half, as a share of the
  oracle's, is within the spread of one-worker runs (0.15) of the one-worker run's, and
  higher than in the first quarter (the three workers learned).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import IO

import orjson
import pytest
import redis
from worker_helpers import learned_offsets, log_end_offsets, settled, stats, wait_until

from loopwise.config import Settings, load_settings
from loopwise.export import export_log, read_log
from loopwise.learners.policy import restore
from loopwise.producers.closed_loop import ClosedLoopReport, run_closed_loop
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

N_DECISIONS = 9_000
RATE = 300.0  # shown decisions per second


def scaled(base: Settings, tag: str) -> Settings:
    return load_settings(
        **{
            **base.model_dump(),
            "events_topic": f"{base.events_topic}.{tag}",
            "deadletter_topic": f"{base.deadletter_topic}.{tag}",
            "propensity_log_topic": f"{base.propensity_log_topic}.{tag}",
            "app_id": f"{base.app_id}-{tag}",
            "key_prefix": f"{base.key_prefix}{tag}:",
            "topic_partitions": 6,
            # Event time runs ~75x the wall clock here (a 250 ms gap per decision at 300/s):
            # 20 s of it hold nearly every click (4 s mean delay) and close in well under a
            # second of wall clock; a dead worker's open decisions outlast its ~10 s outage.
            "attribution_window_ms": 20_000,
            "snapshot_interval_s": 1.0,
            "learner_lease_s": 3.0,  # a killed learner's successor takes over after 3 s
        }
    )


def run(
    s: Settings, tmp_path: Path, workers: int, faults: bool
) -> tuple[list[dict], list[dict], Counter[str], dict[bytes, bytes], list[str]]:
    """The closed loop against ``workers`` worker processes: (shown decisions, log records,
    counters, the model hash, what happened)."""
    ensure_topics(s)
    market = Marketplace(MarketConfig(n_users=200, n_items=12, seed=7, run_tag=s.key_prefix))
    out = tmp_path / f"decisions-{workers}.jsonl"
    log_file: IO[bytes] = (tmp_path / f"workers-{workers}.log").open("ab")
    r = redis.Redis.from_url(s.redis_url)
    procs: list[subprocess.Popen[bytes]] = []
    events: list[str] = []
    results: list[ClosedLoopReport] = []
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            results.append(
                run_closed_loop(s, market, N_DECISIONS, out, rate=RATE, seed=7, progress=False)
            )
        except BaseException as exc:  # the test fails on it below
            errors.append(exc)

    def shown_so_far() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    try:
        procs = [spawn_worker(s, output=log_file) for _ in range(workers)]
        serving = threading.Thread(target=serve, daemon=True)
        serving.start()
        if faults:
            wait_until(lambda: shown_so_far() >= N_DECISIONS // 3, 240, "a third shown")
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(30)
            events.append(f"worker 1 SIGKILLed at {shown_so_far()} shown")
            wait_until(lambda: shown_so_far() >= 2 * N_DECISIONS // 3, 240, "two thirds shown")
            procs.append(spawn_worker(s, output=log_file))
            events.append(f"worker 4 started at {shown_so_far()} shown")
        serving.join(600)
        assert not serving.is_alive(), "the serving layer did not finish"
        assert not errors and results, errors
        published = results[0].published
        wait_until(
            lambda: settled(r, s, published),
            240,
            f"every decision closed, logged and learned ({events})",
            poll_s=1.0,
        )
        for proc in procs[1:] if faults else procs:
            assert stop_worker(proc) == 0
        assert not r.exists(s.key("model", "lease")), "a stopped learner kept its lease"
        counts = stats(r, s)
        model = r.hgetall(s.key("model"))
        assert learned_offsets(r, s) == log_end_offsets(s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        log_file.close()
        r.close()
    shown = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    log_path = tmp_path / f"log-{workers}.jsonl"
    export_log(s, log_path, progress=False)
    return shown, list(read_log(log_path)), counts, model, events


def share_of_oracle(shown: list[dict]) -> float:
    """The truth's expected reward of the decisions shown, over the oracle's on the same
    requests (so the users and contexts a run happened to draw cancel out)."""
    return sum(d["expected_reward"] for d in shown) / sum(d["oracle"] for d in shown)


def test_three_workers_one_killed_one_added_lose_nothing_and_learn_as_one(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    one = run(scaled(isolated_settings, "one"), tmp_path, workers=1, faults=False)
    s = scaled(isolated_settings, "three")
    shown, records, counts, model, events = run(s, tmp_path, workers=3, faults=True)
    print("events:", events, "| counters:", dict(counts), "| one worker:", dict(one[2]))

    assert counts["accepted"] == counts["consumed"] - counts["duplicates"]
    assert counts["deadlettered"] == 0
    ids = [d["decision_id"] for d in shown]
    assert len(ids) == len(set(ids)) == N_DECISIONS
    logged = Counter(rec["decision_id"] for rec in records)
    twice = [d for d, n in logged.items() if n > 1]
    assert not twice, f"{len(twice)} decisions logged twice, e.g. {twice[:3]} ({events})"
    assert set(logged) == set(ids), "a shown decision lost, or one logged that was not shown"
    assert counts["decisions_opened"] == counts["decisions_closed"] == len(records)

    # One learner at a time: each record learned exactly once across the kill and the joins.
    assert restore(bytes(model[b"vw"])).version == len(records)
    holdout = s.holdout_arm
    own = sum(1 for rec in records if rec["arm"] == holdout)
    assert restore(bytes(model[holdout.encode()]), kind=holdout).version == own

    # The versions a user's decisions carry never go back (shown in event-time order).
    versions: dict[tuple[str, str], list[int]] = defaultdict(list)
    for rec in sorted(records, key=lambda rec: rec["timestamp"]):
        versions[(rec["user_id"], rec["arm"])].append(int(rec["policy_version"].rsplit("/", 1)[1]))
    back = {key: v for key, v in versions.items() if v != sorted(v)}
    assert not back, f"{len(back)} users' policy versions went back, e.g. {list(back.items())[:2]}"
    assert max(max(v) for v in versions.values()) > 0, "no decision used a learned model"

    # Learning as well as one worker. Runs of the same loop differ more from each other than
    # a run's own standard error says (learning paths and timing vary: over three runs the
    # one-worker second half reached 0.62-0.73 of the oracle, the three workers 0.54-0.64,
    # 0.19-0.24 above their first quarter), so the band is that spread: within 0.15 of the
    # oracle's share; and the three workers must have learned during the run.
    half, quarter = len(shown) // 2, len(shown) // 4
    one_worker = share_of_oracle(one[0][half:])
    three, start = share_of_oracle(shown[half:]), share_of_oracle(shown[:quarter])
    print(f"share of the oracle, second half: 1 worker {one_worker:.3f}, 3 workers {three:.3f}")
    assert three >= one_worker - 0.15, (three, one_worker)
    assert three >= start + 0.1, f"no learning: {start:.3f} in the first quarter, {three:.3f}"
