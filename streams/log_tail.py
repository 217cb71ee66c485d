"""Read the last records of one propensity-log partition (outbox recovery)."""

from __future__ import annotations

from aiokafka import TopicPartition

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.learners.log_record import LogRecord, LogRecordError


async def decision_ids_at_tail(settings: Settings, partition: int, n: int) -> set[str]:
    """decision_ids of the last ``n`` records of partition ``partition`` of the log topic."""
    consumer = kafka_clients.aio_consumer(settings, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(settings.propensity_log_topic, partition)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        start = max(0, end - n)
        consumer.seek(tp, start)
        ids: set[str] = set()
        position = start
        while position < end:
            batches = await consumer.getmany(tp, timeout_ms=2000)
            records = batches.get(tp, [])
            if not records:
                break
            for record in records:
                position = record.offset + 1
                try:
                    decision_id = LogRecord.from_json(record.value, check=False).decision_id
                except LogRecordError:
                    continue
                if decision_id is not None:
                    ids.add(str(decision_id))
        return ids
    finally:
        await consumer.stop()
