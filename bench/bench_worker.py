"""End-to-end throughput: events/s through the worker into Redis, beside the ceiling.

All in one run, on one preloaded topic (real Kafka broker, real Redis, started
here on free ports):

- ``raw aiokafka + orjson``: the ceiling, a plain consumer that decodes every
  message with orjson and does nothing else;
- ``aiokafka + pipeline``: the same consumer driving Loopwise's batch pipeline
  (validation, dedupe, user state, Redis transaction) without Faust: the cost
  of our core;
- ``loopwise worker``: the product, a Faust worker process, timed by polling
  its Redis counters from its first applied batch to its last: with the
  learning loop off (user state only) and on (every touched user also gets a
  fresh VW decision after each batch).

Ratios to the ceiling are what to compare across machines, not absolute rates.

Run: ``make bench`` or ``.venv/bin/python -m bench.bench_worker --events 200000``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench.common import bench_settings, own_infra, write_json
from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.redis_clients import redis_client
from loopwise.streams.catalog import Catalog
from loopwise.streams.checkpoint import Checkpoint
from loopwise.streams.pipeline import Message, Pipeline
from loopwise.streams.redis_store import RedisStore
from loopwise.streams.worker import spawn_worker, stop_worker

console = Console()
RESULTS = Path(__file__).parent / "results"


def preload(settings: Settings, n: int, seed: int = 5) -> int:
    market = Marketplace(MarketConfig(n_users=5000, n_items=200, seed=seed))
    producer = kafka_clients.producer(settings, linger_ms=20, batch_size=256 * 1024)
    events = market.catalog_events() + list(market.events(n - len(market.catalog_events())))
    for event in track(events, description="preloading the topic", console=console):
        key = (event.get("user_id") or event["item_id"]).encode()
        producer.send(settings.events_topic, key=key, value=orjson.dumps(event))
    producer.flush()
    producer.close()
    return len(events)


async def _consume(settings: Settings, n: int, handle: Any) -> float:
    consumer = kafka_clients.aio_consumer(
        settings,
        settings.events_topic,
        group_id="bench-" + uuid.uuid4().hex,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=settings.batch_size,
    )
    await consumer.start()
    try:
        seen = 0
        started = 0.0
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=settings.batch_size)
            for records in batches.values():
                if not started:
                    started = time.perf_counter()
                await handle(records)
                seen += len(records)
        return n / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def ceiling(settings: Settings, n: int) -> float:
    async def decode_only(records: list[Any]) -> None:
        for record in records:
            orjson.loads(record.value)

    return asyncio.run(_consume(settings, n, decode_only))


def core_without_faust(settings: Settings, n: int) -> float:
    async def run() -> float:
        store = RedisStore.connect(settings)

        async def no_deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
            assert not records, "the benchmark topic has only valid events"

        pipeline = Pipeline(settings, store, Checkpoint(store, no_deadletters), Catalog())

        async def apply(records: list[Any]) -> None:
            await pipeline.process(
                [Message(r.key, r.value, r.topic, r.partition, r.offset) for r in records]
            )

        try:
            return await _consume(settings, n, apply)
        finally:
            await store.close()

    return asyncio.run(run())


def faust_worker(settings: Settings, n: int, decisions: bool = False) -> float:
    client = redis_client(settings)
    worker = spawn_worker(settings.model_copy(update={"decisions": decisions}), "warning")
    stats_key = settings.key("stats")
    try:
        first_at = first_count = 0.0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            consumed = int(client.hget(stats_key, "consumed") or 0)
            now = time.perf_counter()
            if consumed and not first_at:
                first_at, first_count = now, consumed
            if consumed >= n:
                if now == first_at:
                    raise RuntimeError("one batch held everything: use more --events")
                return (consumed - first_count) / (now - first_at)
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}")
            time.sleep(0.02)
        raise RuntimeError("worker did not finish in 600 s")
    finally:
        stop_worker(worker)
        client.close()


def fresh(settings: Settings) -> Settings:
    """Same topic, new consumer group and Redis keys: a cold start on the same data."""
    tag = uuid.uuid4().hex[:8]
    return settings.model_copy(update={"app_id": f"bench-{tag}", "key_prefix": f"bench{tag}:"})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, default=200_000, help="events on the topic (default 200000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each, the median is reported"
    )
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.events < 10_000:
        parser.error("--events must be at least 10000 for a meaningful rate")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    with own_infra("loopwise-bench-") as infra:
        base = bench_settings(infra, batch_size=args.batch_size)
        n = preload(base, args.events)
        rows: dict[str, list[float]] = {"ceiling": [], "core": [], "worker": [], "loop": []}
        for i in range(args.repeat):
            console.print(f"round {i + 1}/{args.repeat}")
            rows["ceiling"].append(ceiling(fresh(base), n))
            rows["core"].append(core_without_faust(fresh(base), n))
            rows["worker"].append(faust_worker(fresh(base), n))
            rows["loop"].append(faust_worker(fresh(base), n, decisions=True))
    report(rows, n, args)


def report(rows: dict[str, list[float]], n: int, args: argparse.Namespace) -> None:
    labels = {
        "ceiling": "raw aiokafka + orjson (ceiling)",
        "core": "aiokafka + Loopwise pipeline (no Faust)",
        "worker": "loopwise worker (Faust), user state only",
        "loop": "loopwise worker (Faust), full loop (a decision per touched user)",
    }
    top = statistics.median(rows["ceiling"])
    table = Table(title=f"{n:,} events, batch {args.batch_size}, median of {args.repeat}")
    table.add_column("consumer")
    table.add_column("events/s", justify="right")
    table.add_column("runs", justify="right")
    table.add_column("vs ceiling", justify="right")
    result: dict[str, Any] = {"events": n, "batch_size": args.batch_size, "repeat": args.repeat}
    for key, label in labels.items():
        median = statistics.median(rows[key])
        runs = ", ".join(f"{r:,.0f}" for r in rows[key])
        table.add_row(label, f"{median:,.0f}", runs, f"{median / top:.3f}")
        result[key] = {
            "median_events_per_s": median,
            "runs": rows[key],
            "ratio_to_ceiling": median / top,
        }
    console.print(table)
    write_json(RESULTS / "worker.json", result, console)


if __name__ == "__main__":
    main()
