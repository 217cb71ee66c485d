"""Errors split by kind: the infrastructure's are retried, the input's are isolated.

- **Transient** (:func:`is_transient`): Redis or Kafka unreachable, a timeout, a
  broker without a leader for a while, Redis loading or out of memory. Nothing
  about the batch is wrong: :func:`retry` runs the work again with backoff,
  logs each failure at ERROR with its traceback and counts it in
  ``loopwise_errors_total{kind="transient"}``.
- **The input's**: anything else (a ``TypeError`` deep in a policy, a message
  the broker refuses as too large, ...). Retrying the same batch would fail the
  same way forever, so the pipeline bisects the batch until the message that
  causes it stands alone, dead-letters it with reason ``processing_error`` and
  goes on (:meth:`loopwise.streams.pipeline.Pipeline.process_isolating`),
  counting ``loopwise_errors_total{kind="input"}``.
- **Redis lost its data** (:class:`RedisDataLost`): neither. Retrying cannot bring the
  state back and no message is at fault, so nothing retries it, nothing bisects a batch
  over it: the worker stops without acking the batch (exit code 3) and says how to go on.
- **A gap** (:class:`PartitionGap`): Redis holds a partition only up to an offset before
  the batch (it lost its last writes: an ``appendfsync everysec`` AOF after a machine
  crash). Not the input's either: the worker reads the missing offsets again, applies
  them, and runs the batch again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import redis.exceptions as redis_errors
from aiokafka import errors as kafka_errors
from prometheus_client import Counter as PromCounter

log = logging.getLogger("loopwise.errors")

ERRORS = PromCounter("loopwise_errors", "failures by kind (transient: retried)", ["kind"])
RETRY_DELAYS: Final = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# Kafka errors that say something about the message, not about the cluster.
_KAFKA_INPUT_ERRORS: Final = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidMessageError,
    kafka_errors.InvalidTimestampError,
    kafka_errors.CorruptRecordException,
)

T = TypeVar("T")


class RedisDataLost(Exception):
    """Redis no longer holds the state the worker's offsets stand for: its epoch key
    (:class:`loopwise.streams.redis_store.Epoch`) is gone or another one. The message says
    where, for which consumer group, and the way out."""


class PartitionGap(Exception):
    """Offsets ``start`` to ``end - 1`` of an events partition were acked to Kafka but are
    not in Redis (its position there is ``start``, the batch begins at ``end``)."""

    def __init__(self, topic: str, partition: int, start: int, end: int) -> None:
        super().__init__(
            f"Redis holds {topic}/{partition} up to offset {start - 1}, the batch begins at "
            f"{end}: offsets {start}-{end - 1} were acked to Kafka but are not in Redis"
        )
        self.topic, self.partition, self.start, self.end = topic, partition, start, end


def is_transient(exc: BaseException) -> bool:
    """True for a failure of Redis, Kafka or the network, which a later attempt may not see."""
    if isinstance(exc, _KAFKA_INPUT_ERRORS):
        return False
    if isinstance(exc, kafka_errors.KafkaError):
        return True  # connection, timeout, leadership, a closed producer: the cluster's state
    if isinstance(exc, redis_errors.DataError):
        return False  # a value Redis cannot encode: the input's
    return isinstance(exc, redis_errors.RedisError | OSError | TimeoutError)


async def retry(work: Callable[[], Awaitable[T]], what: str, *, transient_only: bool = True) -> T:
    """Run ``work`` until it succeeds, with backoff.

    With ``transient_only`` (a batch), an error of the input is raised at once, for the
    caller to isolate; otherwise (timers, publishing, snapshots) every error is retried.
    :class:`RedisDataLost` is never retried.
    """
    attempt = 0
    while True:
        try:
            return await work()
        except asyncio.CancelledError:
            raise
        except (RedisDataLost, PartitionGap):
            raise  # retrying cannot bring the data back
        except Exception as exc:
            if transient_only and not is_transient(exc):
                raise
            ERRORS.labels("transient" if is_transient(exc) else "unexpected").inc()
            delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
            log.error(
                "%s failed (attempt %d); retrying in %.1fs", what, attempt + 1, delay, exc_info=exc
            )
            attempt += 1
            await asyncio.sleep(delay)
