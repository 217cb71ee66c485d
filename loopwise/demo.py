"""``make demo`` / ``loopwise demo``: the main job, end to end, on one machine.

Starts the local Kafka broker and Redis (unless already up), a worker process,
publishes a simulated marketplace's catalog and traffic plus a few malformed
messages and waits until the worker has consumed every one; then closes the
loop: the simulator plays a serving layer, showing each user's
``nba:{user_id}`` and publishing their reactions, while the worker joins
rewards, logs propensities and learns. It prints the experiment report (per
arm, lift over the holdout, oracle and uniform references), writes the
learning curve PNG, stops the worker with SIGTERM, replays the propensity log
from Kafka against candidate policies (off-policy estimates, HTML report) and
prints what landed in Redis. Exit code 0 only if the counts reconcile: accepted + duplicates +
dead-lettered = consumed.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from pathlib import Path

import orjson
from rich.console import Console

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.infra import LocalInfra
from loopwise.producers.closed_loop import run_closed_loop
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.producers.traffic import publish_traffic
from loopwise.report import build_report, plot_report, print_report
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker
from loopwise.summary import print_summary, read_summary

console = Console()
log = logging.getLogger("loopwise.demo")

MALFORMED: list[bytes] = [
    b"{this is not json",
    orjson.dumps({"type": "view", "user_id": "u1", "item_id": "i1", "timestamp": 1}),  # no event_id
    orjson.dumps(
        {"event_id": "bad-3", "type": "like", "user_id": "u1", "item_id": "i1", "timestamp": 1}
    ),
    orjson.dumps(
        {
            "event_id": "bad-4",
            "type": "purchase",
            "user_id": "u1",
            "item_id": "i1",
            "timestamp": 1,
            "price": -3,
        }
    ),
]


def run_demo(
    settings: Settings,
    n_events: int,
    *,
    keep_infra: bool = False,
    n_decisions: int = 20_000,
    out_dir: Path = Path("demo-output"),
) -> int:
    local = LocalInfra.from_settings(settings)
    was_up = all(part["up"] for part in local.status().values())
    console.rule("[bold]1. local Kafka broker and Redis")
    local.up()
    ensure_topics(settings)
    _wait_for_leaders(settings)
    worker = None
    try:
        before = read_summary(settings, 0)["stats"].get("consumed", 0)
        console.rule("[bold]2. worker")
        worker = spawn_worker(settings)
        console.print(f"started `loopwise worker` (pid {worker.pid}); it logs below as loopwise.*")
        console.rule("[bold]3. simulated traffic")
        # One marketplace for the organic traffic and the closed loop: same users and items.
        # Simulated time runs faster than the wall clock, and the worker refuses events dated
        # in its future: the organic traffic and the closed loop that continues it end by now.
        config = MarketConfig(n_users=200, n_items=12, seed=3, run_tag=uuid.uuid4().hex[:8])
        market = Marketplace(config.ending_by(int(time.time() * 1000), n_events + n_decisions))
        published = publish_traffic(settings, market, n_events)
        producer = kafka_clients.producer(settings)
        for raw in MALFORMED:
            producer.send(settings.events_topic, key=b"u1", value=raw)
        producer.flush()
        producer.close()
        published += len(MALFORMED)
        console.print(
            f"published {published:,} messages ({len(MALFORMED)} of them malformed on purpose)"
        )
        console.rule("[bold]4. waiting for the worker")
        consumed = _wait_for(settings, before + published, worker, timeout_s=300)
        if consumed < before + published:
            console.print("[red]the worker did not consume everything[/red]")
            return 1
        console.rule("[bold]5. closed loop: the simulator serves nba:{user_id} and reacts to it")
        out_dir.mkdir(parents=True, exist_ok=True)
        decisions = out_dir / "closed-loop.jsonl"
        result = run_closed_loop(settings, market, n_decisions, decisions, rate=3000.0)
        _wait_for(settings, before + published + result.published, worker, timeout_s=300)
        report = build_report(decisions, holdout=settings.holdout_arm, last=n_decisions // 2)
        print_report(report, Console(width=max(console.width, 140)))  # a wide table
        png = plot_report(
            decisions, out_dir / "closed-loop.png", window=1000, holdout=settings.holdout_arm
        )
        console.print(f"learning curve: {png}")
        _stop(worker)
        worker = None
        console.rule("[bold]6. counterfactual replay of the propensity log (from Kafka)")
        page = _replay(settings, out_dir / "replay")
        console.print(f"replay report: {page}")
        console.rule("[bold]7. what landed in Redis")
        summary = read_summary(settings, 3)
        print_summary(summary, console)
        if not summary["reconciled"]:
            console.print("[red]counts do not reconcile[/red]")
            return 1
        console.print(
            "[green]demo done[/green]: every message is in Redis or on the dead-letter topic; "
            f"decisions and the learning curve are in {out_dir}/."
        )
        return 0
    finally:
        if worker is not None:
            _stop(worker)
        if not keep_infra and not was_up:
            console.rule("[bold]8. stopping the local infrastructure (--keep-infra keeps it)")
            local.down()


REPLAY_TARGETS: tuple[str, ...] = (
    "logged",
    "uniform",
    "vw:--cb_explore_adf --squarecb",
    "vw:--cb_explore_adf --epsilon 0.05",
)
"""The demo's candidates: the logger itself (the sanity check), uniform random, and two VW
explorers trained progressively on the log (squarecb, Loopwise's default, and epsilon-greedy)."""


def _replay(settings: Settings, out: Path) -> Path:
    """``loopwise replay kafka: --target ... --report out``: table, then the HTML page."""
    from loopwise.replay import print_table, replay_details
    from loopwise.replay_report import write_report

    result, details = replay_details(
        ["kafka:"],
        list(REPLAY_TARGETS),
        settings,
        estimators=["ips", "snips", "dr"],
        n_bootstrap=500,
        console=console,
    )
    print_table(result, Console(width=max(console.width, 120)))
    return write_report(result, details, out, logs=["kafka:"])


def _wait_for_leaders(settings: Settings, timeout_s: float = 30) -> None:
    """Return once every partition of the demo's topics has a leader.

    Just created, they have none for a moment, and the traffic's producer would warn
    (``NotLeaderForPartitionError``, retrying) in the middle of the demo.
    """
    from kafka.errors import KafkaTimeoutError

    topics = [settings.events_topic, settings.deadletter_topic, settings.propensity_log_topic]
    admin = kafka_clients.admin(settings, client_id="loopwise")
    try:
        admin.wait_for_topics(topics, timeout_ms=int(timeout_s * 1000))
    except KafkaTimeoutError as exc:  # the producer retries until they have one
        log.warning("publishing although a topic has no leader yet: %s", exc)
    finally:
        admin.close()


def _wait_for(
    settings: Settings, target: int, worker: subprocess.Popen[bytes], timeout_s: float
) -> int:
    deadline = time.monotonic() + timeout_s
    consumed = 0
    with console.status("") as status:
        while time.monotonic() < deadline:
            consumed = read_summary(settings, 0)["stats"].get("consumed", 0)
            status.update(f"worker consumed {consumed:,} / {target:,}")
            if consumed >= target:
                break
            if worker.poll() is not None:
                console.print(f"[red]the worker exited with code {worker.returncode}[/red]")
                break
            time.sleep(0.5)
    return consumed


def _stop(worker: subprocess.Popen[bytes]) -> None:
    stop_worker(worker)
