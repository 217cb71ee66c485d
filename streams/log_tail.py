"""Direct reads of one partition, outside the consumer group: the last records of a
propensity-log partition (outbox recovery) and a range of an events partition (a gap that
Redis lost, :meth:`loopwise.streams.pipeline.Pipeline.gaps`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.learners.log_record import LogRecord, LogRecordError

STALL_TIMEOUT_S = 60.0


async def decision_ids_at_tail(settings: Settings, partition: int, n: int) -> set[str]:
    """decision_ids of the last ``n`` records of partition ``partition`` of the log topic."""

    async def start(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> int:
        return max(0, end - n)

    return await _decision_ids(settings, partition, start)


async def _decision_ids(
    settings: Settings,
    partition: int,
    start_of: Callable[[AIOKafkaConsumer, TopicPartition, int], Awaitable[int | None]],
) -> set[str]:
    """decision_ids of log partition ``partition`` from ``start_of(consumer, tp, end)`` (None:
    nothing) to its end offset."""
    consumer = kafka_clients.aio_consumer(settings, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(settings.propensity_log_topic, partition)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        start = await start_of(consumer, tp, end)
        if start is None:
            return set()
        consumer.seek(tp, start)
        ids: set[str] = set()
        while await consumer.position(tp) < end:
            batches = await consumer.getmany(tp, timeout_ms=2000)
            records = batches.get(tp, [])
            if not records:
                break
            for record in records:
                try:
                    decision_id = LogRecord.from_json(record.value, check=False).decision_id
                except LogRecordError:
                    continue
                if decision_id is not None:
                    ids.add(str(decision_id))
        return ids
    finally:
        await consumer.stop()


async def read_range(
    settings: Settings, topic: str, partition: int, start: int, end: int, size: int
) -> AsyncIterator[list[tuple[bytes | None, bytes | None, int]]]:
    """Lists of up to ``size`` records ``(key, value, offset)`` of ``topic``/``partition``
    from offset ``start`` up to ``end`` (excluded), in order. Offsets the log no longer holds
    (retention) or that held control records are simply absent."""
    consumer = kafka_clients.aio_consumer(settings, **kafka_clients.GROUPLESS)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        chunk: list[tuple[bytes | None, bytes | None, int]] = []
        last_progress = time.monotonic()
        while await consumer.position(tp) < end:
            fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=size)
            for record in fetched.get(tp, []):
                if record.offset >= end:
                    break
                chunk.append((record.key, record.value, record.offset))
                if len(chunk) >= size:
                    yield chunk
                    chunk = []
            if fetched:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
                raise TimeoutError(
                    f"no record of {topic}/{partition} from the broker for "
                    f"{STALL_TIMEOUT_S:.0f} s while reading offsets {start}-{end - 1}"
                )
        if chunk:
            yield chunk
    finally:
        await consumer.stop()


async def decision_ids_since(settings: Settings, partition: int, since_ms: int) -> set[str]:
    """decision_ids of the records of log partition ``partition`` logged at or after
    ``since_ms`` (Kafka timestamps)."""

    async def start(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> int | None:
        found = (await consumer.offsets_for_times({tp: since_ms}))[tp]
        return None if found is None else found.offset

    return await _decision_ids(settings, partition, start)
