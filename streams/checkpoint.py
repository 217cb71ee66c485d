"""Commit a batch's plan: the one path by which the worker's results leave it.

A batch and a timer tick both end here, in this order (as Quix Streams'
``Checkpoint.commit``):

1. send the plan's dead letters to Kafka and wait for the broker's
   acknowledgement;
2. write the plan's Redis part in one MULTI/EXEC
   (:meth:`loopwise.streams.redis_store.RedisStore.commit`): closed decisions
   leave ``join:*`` and enter ``outbox:*`` in it;
3. :meth:`Checkpoint.publish`: send each owned partition's outbox to the
   propensity-log partition of the same number and wait for the broker;
4. trim the sent records from the outbox;
5. the caller acks the batch's offsets.

Steps 1-2 and 3-4 are retried separately: a failure before the transaction
leaves nothing of the batch in Redis (the caller drops the in-memory join and
replays the batch); a failure after it leaves the records in the outbox, and
``publish`` is simply called again. A crash or a failure between 3 and 4
leaves sent records in the outbox: before a partition's outbox is published
for the first time, and again after any failed publication, the records
already at the tail of its log partition are dropped from it. So a
closed decision is logged exactly once, and none is lost. A replayed batch may
put a dead letter on the topic again (at-least-once), and counts it again:
``consumed`` counts deliveries, ``accepted`` each event once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from loopwise.learners.log_record import LogRecord
from loopwise.streams.plan import BatchPlan
from loopwise.streams.redis_store import RedisStore

log = logging.getLogger("loopwise.checkpoint")

DeadLetterSink = Callable[[list[tuple[bytes | None, bytes]]], Awaitable[None]]
LogSink = Callable[[list[tuple[int, bytes, bytes]]], Awaitable[None]]
LogTail = Callable[[int, int], Awaitable[set[str]]]


class Checkpoint:
    """Commits plans in the documented order; owns the outbox's publication."""

    def __init__(
        self,
        store: RedisStore,
        send_deadletters: DeadLetterSink,
        send_log: LogSink | None = None,
        log_tail: LogTail | None = None,
    ) -> None:
        self.store = store
        self.send_deadletters = send_deadletters
        self.send_log = send_log
        self.log_tail = log_tail
        self._recovered: set[int] = set()  # partitions whose outbox was checked against the log

    async def commit(self, plan: BatchPlan) -> None:
        """Steps 1-2: dead letters (acknowledged), then the Redis transaction."""
        if plan.deadletters:
            await self.send_deadletters(plan.deadletters)
        if plan.writes_redis():
            await self.store.commit(plan)
            written_at = time.time()
            for action in plan.item_versions:  # in Redis now: renewed only once it ages
                action.derived["written_at"] = written_at

    async def publish(self, partitions: Iterable[int]) -> int:
        """Steps 3-4 for ``partitions``' outboxes; the number of records sent."""
        if self.send_log is None:
            return 0
        sent = 0
        for partition, pending in (await self.store.outboxes(partitions)).items():
            if not pending:
                self._recovered.add(partition)
                continue
            skip = 0
            if partition not in self._recovered:
                skip = await self._already_on_log(partition, pending)
            records = [(partition, str(_ours(raw).user_id).encode(), raw) for raw in pending[skip:]]
            try:
                if records:
                    await self.send_log(records)
                await self.store.trim_outbox(partition, len(pending))
            except BaseException:
                # The broker may hold some or all of these records (acknowledged, then the
                # send or the trim failed): the retry checks the log's tail again.
                self._recovered.discard(partition)
                raise
            self._recovered.add(partition)
            sent += len(records)
        return sent

    async def _already_on_log(self, partition: int, pending: list[bytes]) -> int:
        """How many of the outbox's first records a crash left already published."""
        if self.log_tail is None:
            return 0
        on_log = await self.log_tail(partition, len(pending))
        skip = 0
        while skip < len(pending) and _ours(pending[skip]).decision_id in on_log:
            skip += 1
        if skip:
            log.warning("outbox %d: %d records were already on the log", partition, skip)
        return skip

    def disown(self, partitions: Iterable[int]) -> None:
        """Partitions moved to another worker: check their outbox again if they come back."""
        self._recovered -= set(partitions)


def _ours(raw: bytes) -> LogRecord:
    """A log record from the outbox: the reward join wrote it, so it is parsed, not checked
    again (a record refused here would block its outbox for good)."""
    return LogRecord.from_json(raw, check=False)
