"""The Faust app: one agent that folds event batches into Redis.

The agent body is the shell around :class:`streams.pipeline.UserStatePipeline`:
it takes batches without acking (``noack_take``), hands them to the pipeline,
retries on Redis or Kafka errors until they succeed, and only then acks each
event in order, so Faust commits no offset whose effects are not in Redis.
One agent instance (``concurrency=1``) serves all assigned partitions in
order, which also keeps clear of faust-streaming's out-of-order commit bug
(fs#606).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram

from config import Settings
from streams.pipeline import Message, UserStatePipeline
from streams.redis_store import RedisStore

log = logging.getLogger("loopwise.worker")

EVENTS = PromCounter("loopwise_events_total", "consumed events by outcome", ["outcome"])
BATCH_SECONDS = Histogram("loopwise_batch_seconds", "time to apply one batch to Redis")
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def build_app(settings: Settings) -> faust.App:
    """A Faust app whose agent keeps ``user:{user_id}`` fresh."""
    app = faust.App(
        settings.app_id,
        broker="kafka://" + settings.bootstrap_servers.replace(",", ";kafka://"),
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, 2 * settings.batch_size),
        broker_max_poll_records=settings.batch_size,
    )
    events_topic = _raw_topic(app, settings.events_topic)
    deadletter_topic = _raw_topic(app, settings.deadletter_topic)

    async def send_deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
        pending = [await deadletter_topic.send(key=key, value=value) for key, value in records]
        await asyncio.gather(*pending)  # wait for the broker's acknowledgement of each

    @app.agent(events_topic, concurrency=1)
    async def user_state(stream: Any) -> None:
        store = RedisStore.connect(settings)
        pipeline = UserStatePipeline(settings, store, send_deadletters)
        try:
            async for batch in stream.noack_take(settings.batch_size, settings.batch_within_s):
                messages = [
                    Message(m.key, m.value, m.topic, m.partition, m.offset)
                    for m in (event.message for event in batch)
                ]
                started = time.perf_counter()
                counters = await _process_until_done(pipeline, messages)
                BATCH_SECONDS.observe(time.perf_counter() - started)
                for outcome in ("accepted", "duplicates", "deadlettered"):
                    EVENTS.labels(outcome).inc(counters[outcome])
                for event in batch:
                    await stream.ack(event)
        finally:
            await store.close()

    return app


def _raw_topic(app: faust.App, name: str) -> Any:
    """A topic of bytes in, bytes out: decoding is ours (``streams.decoding``), not Faust's."""
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


async def _process_until_done(pipeline: UserStatePipeline, messages: list[Message]) -> Any:
    """Apply a batch, retrying with backoff: a batch is never skipped, only delayed."""
    attempt = 0
    while True:
        try:
            return (await pipeline.process(messages)).counters
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis or Kafka unavailable: wait, then replay the batch
            delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
            log.warning("batch of %d failed (%r); retrying in %.1fs", len(messages), exc, delay)
            attempt += 1
            await asyncio.sleep(delay)
