"""The learning loop through crashes: worker SIGKILLs and a broker kill -9, decisions on.

A broker and a Redis of this test's own (it kills the broker), a real worker with the whole
learning loop (decisions, reward join, propensity log through the outbox, learner; default
arms), and the product's closed loop (``run_closed_loop``) as the serving layer in a thread:
it reads ``nba:{user}``, publishes the view with its decision_id and the clicks the hidden
ground truth draws. While it runs, the worker is SIGKILLed twice and the broker is killed with
-9 and restarted once, each at a random moment (seeded) of its stretch of the run; a worker
that exits on its own is started again, as a supervisor would. Afterwards every shown decision
must have exactly one record on the propensity log (none lost, none twice, none that was not
shown), ``decisions_opened == decisions_closed ==`` the records, every record valid, and the
learner's example count (the VW model's version in the ``model`` hash) must equal the records
on the log, the holdout's its own arm's records, with the snapshot's offsets at the log's end.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import IO

import orjson
import pytest
import redis
from worker_helpers import learned_offsets, log_end_offsets, settled, stats, wait_until

from loopwise.config import Settings, load_settings
from loopwise.export import export_log, read_log
from loopwise.infra import LocalInfra
from loopwise.infra.kafka_broker import port_open
from loopwise.learners.log_record import LogRecord
from loopwise.learners.policy import restore
from loopwise.producers.closed_loop import ClosedLoopReport, run_closed_loop
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

N_DECISIONS = 6_000
RATE = 400.0  # decisions shown per second while the worker keeps up
FAULTS = (  # (what, stretch of the run it strikes in, as shares of the decisions shown)
    ("worker SIGKILL", 0.12, 0.30),
    ("broker kill -9", 0.40, 0.55),
    ("worker SIGKILL", 0.65, 0.85),
)


class Worker:
    """The worker process, started again whenever it exited (a supervisor's job)."""

    def __init__(self, s: Settings, output: IO[bytes]) -> None:
        self.s, self.output = s, output
        self.proc = spawn_worker(s, output=output)
        self.exits: list[int] = []

    def alive(self) -> subprocess.Popen[bytes]:
        if self.proc.poll() is not None:
            self.exits.append(self.proc.returncode)
            self.proc = spawn_worker(self.s, output=self.output)
        return self.proc


def test_sigkills_and_a_broker_kill_9_lose_no_decision_and_learn_each_once(
    tmp_path: Path,
) -> None:
    local = LocalInfra.for_tests(tmp_path / "infra")
    local.up()
    tag = uuid.uuid4().hex[:8]
    s = load_settings(
        bootstrap_servers=local.bootstrap_servers,
        redis_url=local.redis_url,
        kafka_controller_port=local.kafka.controller_port,
        key_prefix=f"loopfaults{tag}:",
        app_id=f"loopfaults-{tag}",
        state_dir=tmp_path / "state",
        # Short windows (event time and wall clock): every shown decision closes in the test.
        attribution_window_ms=2_000,
        snapshot_interval_s=1.0,
    )
    rng = random.Random(41)
    r = redis.Redis.from_url(s.redis_url)
    out = tmp_path / "decisions.jsonl"
    events: list[str] = []
    results: list[ClosedLoopReport] = []
    errors: list[BaseException] = []
    market = Marketplace(MarketConfig(seed=41, run_tag=tag))

    def serve() -> None:
        try:
            report = run_closed_loop(
                s, market, N_DECISIONS, out, rate=RATE, seed=41, progress=False
            )
            results.append(report)
        except BaseException as exc:  # the test fails on it below
            errors.append(exc)

    def shown_so_far() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    log_file = (tmp_path / "worker.log").open("ab")
    worker: Worker | None = None
    try:
        ensure_topics(s)
        worker = Worker(s, log_file)
        serving = threading.Thread(target=serve, daemon=True)
        serving.start()
        for what, low, high in FAULTS:
            target = int(N_DECISIONS * rng.uniform(low, high))

            def reached(t: int = target, w: Worker = worker) -> bool:
                w.alive()
                assert not errors, errors
                return shown_so_far() >= t

            wait_until(reached, 180, f"{target} decisions shown before the {what}")
            if what == "worker SIGKILL":
                proc = worker.alive()
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                worker.proc = spawn_worker(s, output=log_file)
            else:
                pid = local.kafka.pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda: local.kafka.pid() is None, 30, "the broker to die")
                wait_until(lambda: not port_open(local.kafka.host, local.kafka.port), 30, "port")
                time.sleep(1.0)
                local.kafka.start()
            events.append(f"{what} at {target} decisions shown")

        serving.join(300)
        assert not serving.is_alive(), "the serving layer did not finish"
        assert not errors and results, errors
        published = results[0].published
        wait_until(
            lambda: worker is not None and bool(worker.alive()) and settled(r, s, published),
            180,
            f"every decision closed, logged and learned ({events})",
            poll_s=1.0,
        )
        assert stop_worker(worker.proc) == 0
        counts = stats(r, s)
        model = r.hgetall(s.key("model"))
    finally:
        if worker is not None and worker.proc.poll() is None:
            worker.proc.kill()
        log_file.close()

    try:
        print("faults:", "; ".join(events), "| exits:", worker.exits, "| counters:", dict(counts))
        shown = [orjson.loads(line)["decision_id"] for line in out.read_bytes().splitlines()]
        assert len(shown) == len(set(shown)) == N_DECISIONS
        log_path = tmp_path / "log.jsonl"
        export_log(s, log_path, progress=False)
        records = list(read_log(log_path))
        logged = Counter(rec["decision_id"] for rec in records)
        twice = [d for d, n in logged.items() if n > 1]
        assert not twice, f"{len(twice)} decisions logged twice, e.g. {twice[:3]}"
        lost = set(shown) - set(logged)
        assert not lost, f"{len(lost)} shown decisions not on the log; counters {dict(counts)}"
        assert set(logged) == set(shown), "a decision on the log that was never shown"
        assert counts["decisions_opened"] == counts["decisions_closed"] == len(records)
        for rec in records:
            LogRecord.from_json(orjson.dumps(rec))  # valid, by the learner's and replay's rules
        # The learner: each record learned exactly once, across the kills and the broker's.
        assert restore(bytes(model[b"vw"])).version == len(records)
        holdout = sum(rec["arm"] == s.holdout_arm for rec in records)
        assert restore(bytes(model[s.holdout_arm.encode()])).version == holdout
        assert orjson.loads(model.get(b"invalid_records") or b"{}") == {}
        assert learned_offsets(r, s) == log_end_offsets(s)
    finally:
        r.close()
        local.down()
