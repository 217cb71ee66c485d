"""Freshness: from a click's publication to that user's ``nba:{user_id}`` reflecting it.

A worker runs under a steady organic load (default 2,000 events/s from the
simulator). Every ``--probe-every`` seconds a probe user (one the organic
traffic never touches, so only the probe moves its state) gets a ``click``;
the bench polls Redis until ``nba:{probe}`` carries ``last_event_id`` = that
click's event_id, i.e. a decision recomputed from the current model with the
click folded into the user's state. Beside it, in the same run, the baseline:
the same probes seen by a bare aiokafka consumer (Kafka's own delivery
latency under the same load). p50/p99 of both, and their difference.

The model's weights learn from a click later, when its decision's
attribution window closes (``attribution_window_ms``, 10 minutes of event
time by default, as in Azure Personalizer's reward wait time); that delay is
a setting, not a speed, and is not measured here.

Run: ``.venv/bin/python -m bench.bench_freshness --rate 2000 --seconds 30``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from bench.common import bench_settings, own_infra, write_json
from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.producers.sdk import EventPublisher
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.producers.traffic import RateLimiter
from loopwise.redis_clients import redis_client
from loopwise.streams.worker import spawn_worker, stop_worker

console = Console()
RESULTS = Path(__file__).parent / "results"


def organic_load(settings: Settings, rate: float, stop: threading.Event) -> int:
    # Organic traffic in real time: event time advances as fast as the wall clock (the worker
    # refuses events dated ahead of its clock by more than max_future_skew_ms).
    market = Marketplace(
        MarketConfig(seed=9, start_ms=int(time.time() * 1000) - 1000, mean_gap_ms=1000.0 / rate)
    )
    sent = 0
    with EventPublisher.from_settings(settings) as publisher:
        for event in market.catalog_events():
            publisher.send(event)
        limiter = RateLimiter(rate)
        for event in market.events():
            if stop.is_set():
                break
            limiter.wait()
            publisher.send(event)
            sent += 1
    return sent


def kafka_baseline(
    settings: Settings, probes: dict[str, float], seen: dict[str, float], stop: threading.Event
) -> None:
    async def run() -> None:
        consumer = kafka_clients.aio_consumer(
            settings,
            settings.events_topic,
            group_id="fresh-" + uuid.uuid4().hex,
            auto_offset_reset="latest",
        )
        await consumer.start()
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                now = time.perf_counter()
                for records in batches.values():
                    for record in records:
                        if record.key and record.key.startswith(b"probe-"):
                            event_id = orjson.loads(record.value)["event_id"]
                            seen.setdefault(event_id, now)
        finally:
            await consumer.stop()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="organic events/s")
    parser.add_argument("--seconds", type=float, default=30.0, help="probing time")
    parser.add_argument("--probe-every", type=float, default=0.05, help="seconds between probes")
    args = parser.parse_args()
    if args.rate <= 0 or args.seconds <= 0 or args.probe_every <= 0:
        parser.error("--rate, --seconds and --probe-every must be > 0")
    logging.basicConfig(level=logging.WARNING)

    with own_infra("loopwise-fresh-") as infra:
        settings = bench_settings(infra, "fresh")
        worker = spawn_worker(settings, log_level="warning")
        try:
            result = measure(settings, args)
        finally:
            stop_worker(worker)
    report(result, args)


def measure(settings: Settings, args: argparse.Namespace) -> dict[str, list[float]]:
    client = redis_client(settings)
    stop = threading.Event()
    probes: dict[str, float] = {}
    via_kafka: dict[str, float] = {}
    via_nba: dict[str, float] = {}
    threads = [
        threading.Thread(target=organic_load, args=(settings, args.rate, stop)),
        threading.Thread(target=kafka_baseline, args=(settings, probes, via_kafka, stop)),
    ]
    for thread in threads:
        thread.start()
    # Warm up: the worker has the catalog and is keeping up with the load.
    deadline = time.monotonic() + 120
    while not client.exists(settings.key("nba", "__default__")):
        if time.monotonic() > deadline:
            raise RuntimeError("the worker produced no nba:__default__ in 120 s")
        time.sleep(0.1)
    time.sleep(3)
    publisher = EventPublisher.from_settings(settings, linger_ms=0)
    pending: dict[str, str] = {}  # probe user -> event_id
    end = time.monotonic() + args.seconds
    next_probe = time.monotonic()
    n = 0
    with console.status("probing") as status:
        while time.monotonic() < end or (pending and time.monotonic() < end + 30):
            now = time.monotonic()
            if now >= next_probe and now < end:
                user = f"probe-{n % 200}"
                if user not in pending:
                    event_id = uuid.uuid4().hex
                    publisher.click(
                        user,
                        "item-001",
                        event_id=event_id,
                        context={"device": "mobile", "hour": 12},
                    )
                    publisher.flush()
                    probes[event_id] = time.perf_counter()
                    pending[user] = event_id
                n += 1
                next_probe += args.probe_every
            if pending:
                users = list(pending)
                values = client.mget([settings.key("nba", u) for u in users])
                seen_at = time.perf_counter()
                for user, value in zip(users, values, strict=True):
                    if value and orjson.loads(value).get("last_event_id") == pending[user]:
                        via_nba[pending.pop(user)] = seen_at
            status.update(f"probes {len(probes)}, answered {len(via_nba)}")
            time.sleep(0.002)
    publisher.close()
    stop.set()
    for thread in threads:
        thread.join(60)
    client.close()
    nba_ms = [1000 * (via_nba[e] - probes[e]) for e in via_nba]
    kafka_ms = [1000 * (via_kafka[e] - probes[e]) for e in via_kafka if e in probes]
    return {"nba_ms": nba_ms, "kafka_ms": kafka_ms, "probes": [float(len(probes))]}


def report(result: dict[str, list[float]], args: argparse.Namespace) -> None:
    table = Table(title=f"freshness under {args.rate:,.0f} organic events/s, {args.seconds:.0f} s")
    table.add_column("path")
    table.add_column("probes", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    out: dict[str, object] = {
        "rate": args.rate,
        "seconds": args.seconds,
        "probes_sent": int(result["probes"][0]),
    }
    for key, label in (
        ("kafka_ms", "Kafka delivery to a bare consumer (baseline)"),
        ("nba_ms", "click published -> nba:{user} recomputed with it"),
    ):
        values = np.array(result[key])
        if len(values) == 0:
            table.add_row(label, "0", "-", "-")
            continue
        p50, p99 = np.percentile(values, [50, 99])
        table.add_row(label, str(len(values)), f"{p50:.0f}", f"{p99:.0f}")
        out[key] = {"n": len(values), "p50": float(p50), "p99": float(p99)}
    console.print(table)
    write_json(RESULTS / "freshness.json", out, console)


if __name__ == "__main__":
    main()
