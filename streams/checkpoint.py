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
closed decision is logged exactly once, and none is lost.

**A Redis that went back in time** (it lost its last writes: an ``appendfsync everysec``
AOF after a machine crash; the pipeline finds it as a
:class:`loopwise.streams.errors.PartitionGap`) still holds, open in ``join:*``, decisions
whose close it lost, though their records reached the log: they would close and be logged
again. :meth:`Checkpoint.rewound` reads the decision ids logged in the last
``REWIND_LOOKBACK_MS`` and, for ``REWIND_GUARD_S``, drops every outbox record whose
decision is among them. A replayed batch may
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
LogSince = Callable[[int, int], Awaitable[set[str]]]  # (partition, since_ms) -> decision ids

REWIND_LOOKBACK_MS = 300_000  # a Redis that lost more than 5 minutes of writes: rebuild
REWIND_GUARD_S = 600.0


class Checkpoint:
    """Commits plans in the documented order; owns the outbox's publication."""

    def __init__(
        self,
        store: RedisStore,
        send_deadletters: DeadLetterSink,
        send_log: LogSink | None = None,
        log_tail: LogTail | None = None,
        log_since: LogSince | None = None,
    ) -> None:
        self.store = store
        self.send_deadletters = send_deadletters
        self.send_log = send_log
        self.log_tail = log_tail
        self.log_since = log_since
        self._recovered: set[int] = set()  # partitions whose outbox was checked against the log
        # after a Redis rewind: decision ids logged shortly before it, and until when to look
        self._logged_before_rewind: set[str] = set()
        self._guard_until = 0.0

    async def rewound(self, partitions: Iterable[int]) -> int:
        """Redis lost its last writes: read the decisions logged on ``partitions`` in the
        last ``REWIND_LOOKBACK_MS``, so that none is logged again; their number."""
        if self.log_since is None:
            return 0
        since_ms = int(time.time() * 1000) - REWIND_LOOKBACK_MS
        found: set[str] = set()
        for partition in sorted(partitions):
            found |= await self.log_since(partition, since_ms)
        self._logged_before_rewind |= found
        self._guard_until = time.monotonic() + REWIND_GUARD_S
        return len(found)

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
            parsed = [_ours(raw) for raw in pending[skip:]]
            if self._logged_before_rewind:
                parsed, raws = self._not_logged_before_rewind(partition, parsed, pending[skip:])
            else:
                raws = pending[skip:]
            records = [
                (partition, str(record.user_id).encode(), raw)
                for record, raw in zip(parsed, raws, strict=True)
            ]
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

    def _not_logged_before_rewind(
        self, partition: int, parsed: list[LogRecord], raws: list[bytes]
    ) -> tuple[list[LogRecord], list[bytes]]:
        if time.monotonic() > self._guard_until:
            self._logged_before_rewind.clear()
            return parsed, raws
        logged = self._logged_before_rewind
        kept = [
            (r, raw) for r, raw in zip(parsed, raws, strict=True) if r.decision_id not in logged
        ]
        if len(kept) < len(parsed):
            log.warning(
                "outbox %d: %d records of decisions logged before Redis lost its last writes "
                "are not logged again",
                partition,
                len(parsed) - len(kept),
            )
        return [r for r, _ in kept], [raw for _, raw in kept]

    def disown(self, partitions: Iterable[int]) -> None:
        """Partitions moved to another worker: check their outbox again if they come back."""
        self._recovered -= set(partitions)


def _ours(raw: bytes) -> LogRecord:
    """A log record from the outbox: the reward join wrote it, so it is parsed, not checked
    again (a record refused here would block its outbox for good)."""
    return LogRecord.from_json(raw, check=False)
