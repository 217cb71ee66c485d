"""``loopwise rebuild``: recompute the worker's Redis state from the events topic.

When Redis lost its data (restarted without persistence, a lost disk, FLUSHALL) the worker
refuses to go on (:mod:`loopwise.streams.redis_store`, the epoch). The events topic still
holds what the state was made of, so :func:`rebuild` reads it again, per partition from its
earliest retained offset up to the worker's consumer group (``app_id``) committed offset,
and runs it through the worker's own :class:`loopwise.streams.pipeline.Pipeline` (read →
plan → commit) in user-state mode. It ends exactly where the worker resumes, and writes a
new epoch; then start the worker as usual.

What it recomputes: every ``user:{id}``, the ``catalog``, the idempotency sets ``seen:*``
and the ``stats`` counters of the user-state pipeline (``consumed``, ``accepted``,
``duplicates``, ``deadlettered``, ``deadletter:{reason}``, ``no_consent``; ``batches``
counts the rebuild's own batches). Dead letters are counted, never sent again: they are on
the dead-letter topic already.

What it does not: the learning loop's state lives in Redis only and is not rebuilt. Open
decisions (``join:*``) are gone, so views and rewards of decisions shown before the loss
count as ``unknown_decisions`` and those decisions are never logged; closed decisions
still in an ``outbox:*`` are missing from the propensity log; stored ``decision:*`` and
``nba:{user}`` values are gone (users are served ``nba:__default__``, which the worker
refreshes within a second, until their next event); the ``model`` snapshot is gone, so
the policies start untrained and learn from new log records only; the loop's counters
(``decisions_made``, ...) start from zero. The propensity log itself, on Kafka, is intact.

**Kafka retention.** A full rebuild needs every event since the first one: give the events
topic ``retention.ms=-1`` (or a tiered-storage plan that keeps it all; compaction is no
substitute, as events are keyed by user and each one counts). With a shorter retention
the state is rebuilt from the retained part only: the report says, per partition, how
many messages below the earliest retained offset were skipped.

How exact it is (the pipeline is the worker's; its inputs differ in three ways):

- **Order across partitions.** A user's events are in one partition, in order; but the
  catalog's ``item`` events are keyed by item, and an event adds affinity only for items
  the worker knew when it processed it. The rebuild merges partitions by the messages'
  Kafka timestamps, which is the order the worker saw them as long as it kept up.
- **The clock.** The worker refused events dated more than ``max_future_skew_ms`` after
  its clock *then*; the rebuild's clock is now, so it may accept an event the worker
  refused for that reason.
- **The dedup window.** The rebuild marks every event id in the current ``seen`` bucket:
  ids are remembered from the rebuild on (at least one more ``dedupe_window_s``), and an
  event resent after the worker had forgotten its id counts as a duplicate here.

The rebuild uses an assigned consumer (aiokafka, no consumer group, nothing committed) and
refuses to run while the group has members (a worker running) or while Redis holds an
epoch (it did not lose its data), unless ``force``. Before it starts it deletes the keys
it recomputes (left over by an interrupted rebuild, or by a batch that landed after the
loss); the learning loop's keys stay.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from kafka import TopicPartition as SyncTopicPartition
from rich.console import Console

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.progress import progress_bar
from loopwise.streams.catalog import Catalog
from loopwise.streams.checkpoint import Checkpoint
from loopwise.streams.errors import retry
from loopwise.streams.pipeline import Message, Pipeline
from loopwise.streams.redis_store import Epoch, RedisStore, url_without_password

USER_STATE_COUNTERS = (
    "consumed",
    "accepted",
    "duplicates",
    "deadlettered",
    "no_consent",
    "batches",
)
USER_STATE_COUNTER_PREFIXES = ("deadletter:",)
STALL_TIMEOUT_S = 60.0  # no message for this long while offsets remain: the broker is gone


class RebuildError(Exception):
    """The rebuild cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one events partition: from the earliest retained to the
    group's committed offset (where the worker resumes)."""

    partition: int
    start: int
    end: int

    @property
    def messages(self) -> int:
        return max(0, self.end - self.start)

    @property
    def skipped(self) -> int:
        """Offsets below the earliest retained one that the group had consumed: gone."""
        return min(self.start, self.end)


@dataclass(slots=True)
class RebuildReport:
    topic: str
    group: str
    redis: str
    ranges: list[PartitionRange]
    counters: Counter[str] = field(default_factory=Counter)
    deadletters_dropped: int = 0
    users: int = 0
    catalog_items: int = 0
    erased: int = 0  # keys and counters deleted before the rebuild
    replaced_epoch: Epoch | None = None  # with force: the epoch Redis held
    epoch: Epoch | None = None
    seconds: float = 0.0

    @property
    def messages(self) -> int:
        return sum(r.messages for r in self.ranges)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.ranges)

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "group": self.group,
            "redis": self.redis,
            "partitions": {
                str(r.partition): {"start": r.start, "end": r.end, "skipped": r.skipped}
                for r in self.ranges
            },
            "messages": self.messages,
            "skipped": self.skipped,
            "counters": dict(self.counters),
            "deadletters_dropped": self.deadletters_dropped,
            "users": self.users,
            "catalog_items": self.catalog_items,
            "erased": self.erased,
            "replaced_epoch": self.replaced_epoch.id if self.replaced_epoch else None,
            "epoch": self.epoch.id if self.epoch else None,
            "seconds": round(self.seconds, 3),
        }


def committed_offsets(settings: Settings) -> dict[int, int]:
    """The worker group's committed offset per events partition (partitions without one are
    left out; an events topic that does not exist has none)."""
    consumer = kafka_clients.consumer(
        settings,
        client_id="loopwise-offsets",
        group_id=settings.app_id,
        enable_auto_commit=False,
    )
    try:
        topic = settings.events_topic
        # topics() lists what exists; partitions_for_topic alone could auto-create the topic.
        if topic not in consumer.topics():
            return {}
        offsets: dict[int, int] = {}
        for partition in sorted(consumer.partitions_for_topic(topic) or ()):
            committed = consumer.committed(SyncTopicPartition(topic, partition))
            if committed is not None and committed >= 0:
                offsets[partition] = committed
        return offsets
    finally:
        consumer.close()


def group_members(settings: Settings) -> int:
    """How many consumers the worker group has right now (a running worker has one)."""
    admin = kafka_clients.admin(settings, client_id="loopwise")
    try:
        described = admin.describe_groups([settings.app_id])
    finally:
        admin.close()
    group: Any = described.get(settings.app_id, {}) if isinstance(described, dict) else {}
    return len(group.get("members") or ())


def rebuild(
    settings: Settings,
    *,
    force: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> RebuildReport:
    """Recompute the user state, catalog, counters and dedup memory into Redis from the
    events topic, up to the group's committed offsets; then write a new epoch."""
    if settings.redis_cluster:
        raise RebuildError(
            "`loopwise rebuild` does not support a Redis Cluster yet (redis_cluster=true): "
            "recover a cluster from its replicas or its persistence files"
        )
    return asyncio.run(_rebuild(settings, force, progress, console))


async def _rebuild(
    settings: Settings, force: bool, progress: bool, console: Console | None
) -> RebuildReport:
    started = time.monotonic()
    redis_at = url_without_password(settings.redis_url)
    store = RedisStore.connect(settings)
    try:
        existing = await store.load_epoch()
        if existing is not None and not force:
            raise RebuildError(
                f"Redis at {redis_at} holds epoch {existing.describe()} under "
                f"{store.epoch_key}: it did not lose its data, nothing to rebuild "
                "(--force rebuilds anyway, replacing user state, catalog and counters)"
            )
        members = await asyncio.to_thread(group_members, settings)
        if members:
            raise RebuildError(
                f"consumer group {settings.app_id!r} has {members} active member(s): a worker "
                "is running; stop it before rebuilding (the rebuild ends at the group's "
                "committed offsets, which a running worker moves)"
            )
        committed = await asyncio.to_thread(committed_offsets, settings)
        if not committed:
            raise RebuildError(
                f"consumer group {settings.app_id!r} has no committed offsets on "
                f"{settings.events_topic!r}: nothing to rebuild (a worker starting now reads "
                "the topic from its earliest offset)"
            )
        report = RebuildReport(settings.events_topic, settings.app_id, redis_at, [])
        report.replaced_epoch = existing
        report.erased = await store.erase_user_state(
            USER_STATE_COUNTERS, USER_STATE_COUNTER_PREFIXES
        )
        await _replay(settings, store, committed, report, progress, console)
        report.catalog_items = int(await store.client.hlen(store.key("catalog")))
        report.epoch = await store.begin_epoch("rebuild")
    finally:
        await store.close()
    report.seconds = time.monotonic() - started
    return report


async def _replay(
    settings: Settings,
    store: RedisStore,
    committed: dict[int, int],
    report: RebuildReport,
    progress: bool,
    console: Console | None,
) -> None:
    async def drop_deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
        report.deadletters_dropped += len(records)  # on the dead-letter topic already

    pipeline = Pipeline(settings, store, Checkpoint(store, drop_deadletters), Catalog())
    consumer = kafka_clients.aio_consumer(
        settings,
        client_id="loopwise-rebuild",
        max_poll_records=settings.batch_size,
        **kafka_clients.GROUPLESS,
    )
    await consumer.start()
    try:
        topic = settings.events_topic
        tps = [TopicPartition(topic, p) for p in sorted(committed)]
        firsts = await consumer.beginning_offsets(tps)
        report.ranges = [
            PartitionRange(tp.partition, firsts[tp], committed[tp.partition]) for tp in tps
        ]
        ends = {TopicPartition(topic, r.partition): r.end for r in report.ranges if r.messages}
        consumer.assign(list(ends))
        for r in report.ranges:
            if r.messages:
                consumer.seek(TopicPartition(topic, r.partition), r.start)
        merged = _TimeMerge(consumer, ends)
        users: set[str] = set()
        bar = progress_bar(
            f"[bold]rebuild[/bold] {topic}",
            "{task.fields[accepted]} accepted",
            enabled=progress,
            console=console or Console(stderr=True),
        )
        with bar:
            task = bar.add_task("rebuild", total=report.messages, accepted="0")
            async for records in merged.batches(settings.batch_size):
                messages = [
                    Message(r.key, r.value, r.topic, r.partition, r.offset) for r in records
                ]
                done = await pipeline.process_isolating(messages, retry)
                report.counters.update(done.counters)
                users |= done.touched_users
                bar.update(task, advance=len(records), accepted=f"{report.counters['accepted']:,}")
            bar.update(task, completed=report.messages)
        report.users = len(users)
    finally:
        await consumer.stop()


class _TimeMerge:
    """Records of the assigned partitions up to their end offsets, merged by Kafka timestamp
    (each partition in offset order): the order in which a worker that kept up saw them."""

    def __init__(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        self.consumer = consumer
        self.ends = ends
        self.buffers: dict[TopicPartition, deque[ConsumerRecord[Any, Any]]] = {
            tp: deque() for tp in ends
        }
        self.exhausted: set[TopicPartition] = set()

    async def batches(self, size: int) -> Any:
        """Lists of up to ``size`` records, in merged order, until every partition ended."""
        while True:
            await self._fill()
            batch = self._take(size)
            if not batch:
                return
            yield batch

    async def _fill(self) -> None:
        """Fetch until every partition that has not ended has a record buffered."""
        last_record = time.monotonic()
        while hungry := [
            tp for tp, b in self.buffers.items() if not b and tp not in self.exhausted
        ]:
            fetched = await self.consumer.getmany(*hungry, timeout_ms=500)
            for tp, records in fetched.items():
                end = self.ends[tp]
                self.buffers[tp].extend(r for r in records if r.offset < end)
            for tp in hungry:
                # Positions, not the last offsets seen: compaction and transaction markers
                # leave gaps.
                if await self.consumer.position(tp) >= self.ends[tp]:
                    self.exhausted.add(tp)
                    self.consumer.pause(tp)
            if any(fetched.values()):
                last_record = time.monotonic()
            elif time.monotonic() - last_record > STALL_TIMEOUT_S:
                raise TimeoutError(
                    f"no message from the broker for {STALL_TIMEOUT_S:.0f} s while rebuilding "
                    f"from partitions {sorted(tp.partition for tp in hungry)}"
                )

    def _take(self, size: int) -> list[ConsumerRecord[Any, Any]]:
        """Merged records while every partition that has not ended has one buffered."""
        batch: list[ConsumerRecord[Any, Any]] = []
        while len(batch) < size:
            heads = [(b[0].timestamp, tp.partition, tp) for tp, b in self.buffers.items() if b]
            if not heads or any(
                not b and tp not in self.exhausted for tp, b in self.buffers.items()
            ):
                break
            _, _, tp = min(heads)
            batch.append(self.buffers[tp].popleft())
        return batch


def describe(report: RebuildReport) -> Iterable[str]:
    """The summary lines ``loopwise rebuild`` prints."""
    counters = report.counters
    yield (
        f"rebuilt Redis at {report.redis} from {report.topic} up to the committed offsets of "
        f"group {report.group!r} in {report.seconds:.1f} s"
    )
    for r in report.ranges:
        gone = f"; {r.skipped:,} before them no longer retained" if r.skipped else ""
        yield f"  partition {r.partition}: offsets {r.start:,}..{r.end:,} ({r.messages:,}){gone}"
    yield (
        f"  {report.messages:,} messages: {counters['accepted']:,} accepted, "
        f"{counters['duplicates']:,} duplicates, {counters['deadlettered']:,} dead-lettered "
        f"(not sent again); {report.users:,} users, {report.catalog_items:,} catalog items"
    )
    if report.replaced_epoch is not None:
        yield f"  replaced epoch {report.replaced_epoch.describe()} (--force)"
    if report.epoch is not None:
        yield f"  new epoch {report.epoch.describe()}: start the worker as usual"
    if report.skipped:
        yield (
            f"warning: {report.skipped:,} messages the group had consumed are no longer on "
            f"{report.topic} (retention): the state holds the retained part only; keep every "
            "event (retention.ms=-1) for a full rebuild"
        )
    yield (
        "not rebuilt (Redis only): the learning loop's open decisions, outbox, stored "
        "decisions, next-best-actions and model snapshot; policies start untrained"
    )
