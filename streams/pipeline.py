"""One batch of consumed messages, from bytes to a committed plan.

The steps of a batch, in order (the caller acks the offsets only after
:meth:`Pipeline.process` and :meth:`Pipeline.publish` returned, so a crash
anywhere replays the batch):

1. decode and validate every message (pure, :func:`triage`); a refused one
   becomes a dead-letter record; repeats within the batch are dropped;
2. read, in one round trip, everything the batch needs: which events were
   applied already (idempotency keys), the touched users' hashes, unknown
   items' catalog entries (and the whole catalog when its reload is due), the
   decisions the batch's views show, the open decisions of newly owned
   partitions (:meth:`loopwise.streams.redis_store.RedisStore.read`);
3. plan (pure, :func:`fold_users` and :meth:`loopwise.streams.loop.LearningLoop.plan`):
   drop the applied events, fold the fresh ones into the states, join views
   and rewards, close due decisions, decide for every touched user;
4. commit the plan (:class:`loopwise.streams.checkpoint.Checkpoint`): dead
   letters, then one Redis transaction, then the propensity-log outbox.

A timer tick (:meth:`Pipeline.tick`) is steps 2-4 with no events: it closes
decisions whose wall-clock window ended and refreshes ``nba:__default__``.
A replayed batch counts its applied events as duplicates; nothing is applied
twice. Two marks say what was applied, both in the batch's transaction: each events
partition's position (the next offset to apply: a redelivered message is recognised by its
offset, for ever, at the cost of one hash field per partition) and each applied
``event_id`` (an event its producer sent twice, at another offset, is recognised within
``dedupe_window_s``).

Errors split by kind (:mod:`loopwise.streams.errors`): a transient failure is
retried with backoff; any other failure of a batch is the input's, and
:meth:`Pipeline.process_isolating` bisects the batch until the message that
causes it stands alone, then dead-letters it (``processing_error``) and goes on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import orjson

from loopwise.config import Settings
from loopwise.pseudonyms import new_token, pseudonymize
from loopwise.streams.catalog import Catalog
from loopwise.streams.checkpoint import Checkpoint
from loopwise.streams.deadletter import Source, deadletter_record
from loopwise.streams.decoding import MAX_TIMESTAMP_MS, Event, Rejection, decode
from loopwise.streams.errors import ERRORS, PartitionGap, RedisDataLost
from loopwise.streams.loop import LearningLoop
from loopwise.streams.plan import BatchPlan, Inputs, Reads
from loopwise.streams.redis_store import RedisStore
from loopwise.streams.user_state import StateRules, UserState, apply_event, group_by_user

log = logging.getLogger("loopwise.pipeline")

Retry = Callable[[Callable[[], Awaitable["BatchReport"]], str], Awaitable["BatchReport"]]


@dataclass(frozen=True, slots=True)
class Message:
    """A consumed Kafka record, whatever client read it."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class BatchReport:
    """What one batch did; the counters are also added to ``{prefix}stats``."""

    counters: Counter[str] = field(default_factory=Counter)
    accepted: list[Event] = field(default_factory=list)
    touched_users: set[str] = field(default_factory=set)

    def add(self, other: BatchReport) -> BatchReport:
        self.counters.update(other.counters)
        self.accepted.extend(other.accepted)
        self.touched_users |= other.touched_users
        return self


@dataclass(slots=True)
class Triage:
    events: list[Event]
    partitions: list[int]  # of each event
    deadletters: list[tuple[bytes | None, bytes]]
    counters: Counter[str]


def triage(
    messages: Sequence[Message], max_bytes: int, max_timestamp_ms: int = MAX_TIMESTAMP_MS
) -> Triage:
    """Step 1: decode, validate (events dated after ``max_timestamp_ms`` are refused), drop
    in-batch repeats."""
    counters: Counter[str] = Counter(consumed=len(messages))
    events: list[Event] = []
    partitions: list[int] = []
    deadletters: list[tuple[bytes | None, bytes]] = []
    seen: set[str] = set()
    for message in messages:
        result = decode(message.value, max_bytes, max_timestamp_ms)
        if isinstance(result, Rejection):
            source = Source(message.topic, message.partition, message.offset)
            deadletters.append((message.key, deadletter_record(result, source, message.value)))
            counters["deadlettered"] += 1
            counters["deadletter:" + result.reason] += 1
        elif result.event_id in seen:
            counters["duplicates"] += 1
        else:
            seen.add(result.event_id)
            events.append(result)
            partitions.append(message.partition)
    return Triage(events, partitions, deadletters, counters)


def item_features(events: Sequence[Event]) -> dict[str, dict[str, object]]:
    """The catalog entries of a batch's item events: features plus the ``active`` flag."""
    return {
        e.item_id: {**e.raw["features"], "active": e.raw.get("active", True)}
        for e in events
        if e.type == "item"
    }


def drop_forgotten(
    events: list[tuple[Event, int]], tombstones: dict[str, int], plan: BatchPlan
) -> list[tuple[Event, int]]:
    """Step 3's first rule (pure): a forgotten user's events dated at or before their
    ``forget`` are applied as nothing (counted ``forgotten_events``), so a replayed or late
    old event cannot re-create them; a batch's own ``forget`` events add tombstones
    (``plan.forgotten``)."""
    latest = dict(tombstones)
    kept = []
    for event, partition in events:
        user = event.user_id
        if event.type == "forget" and user is not None:
            latest[user] = max(latest.get(user, 0), event.timestamp)
            plan.forgotten[user] = latest[user]
        elif user is not None and event.type != "item" and event.timestamp <= latest.get(user, -1):
            plan.counters["forgotten_events"] += 1
            continue
        kept.append((event, partition))
    return kept


def fold_users(
    events: Sequence[Event],
    states: dict[str, UserState],
    catalog: Catalog,
    rules: StateRules,
    plan: BatchPlan,
    tokens: bool = False,
) -> None:
    """Step 3's fold (pure): the fresh events into the users' states, into ``plan.users``.

    An event without consent erases the user (``None``) and stores nothing of it; a
    user who then sends a consented event starts afresh (``plan.replaced``). With
    ``tokens`` (pseudonymization), a state without a token gets a new one.
    """
    category = catalog.category
    for user_id, user_events in group_by_user(events).items():
        state: UserState | None = states.get(user_id) or UserState()
        for event in user_events:
            if not event.consent:
                plan.counters["forgets" if event.type == "forget" else "no_consent"] += 1
                state = None  # erase what we had and store nothing of this event
                continue
            if state is None:
                state = UserState()
                plan.replaced.add(user_id)
            apply_event(state, event, category(event.item_id), rules)
        if tokens and state is not None and state.token is None:
            state.token = new_token()
        plan.users[user_id] = state


class Pipeline:
    """Runs batches and ticks through read → plan → commit; shared by the Faust worker and
    the benchmarks. Without a :class:`LearningLoop` it keeps user state only."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        checkpoint: Checkpoint,
        catalog: Catalog,
        loop: LearningLoop | None = None,
    ):
        self.settings = settings
        self.store = store
        self.checkpoint = checkpoint
        self.catalog = catalog
        self.loop = loop
        self.rules = StateRules(
            recent_items=settings.recent_items,
            affinity_half_life_ms=settings.affinity_half_life_ms,
            affinity_weights=dict(settings.affinity_weights),
        )
        key = settings.pseudonym_key
        self.pseudonym_key = None if key is None else key.get_secret_value().encode()
        # Each partition's position (next offset to apply) as committed in Redis; read on the
        # first batch of a partition, advanced by each commit, dropped on any failure.
        self.held: dict[int, int] = {}
        # The offset each partition's messages are applied from: ``held``, or beyond it
        # where the log holds no message (:meth:`skip_to`).
        self.positions: dict[int, int] = {}

    def skip_to(self, partition: int, offset: int) -> None:
        """Offsets before ``offset`` of ``partition`` are accounted for (read again after a
        :class:`PartitionGap`: the log holds no message there, e.g. transaction markers)."""
        self.positions[partition] = max(offset, self.positions.get(partition, -1))

    def disown(self, partitions: set[int]) -> None:
        """Forget the positions of partitions this worker no longer owns."""
        for partition in partitions:
            self.positions.pop(partition, None)
            self.held.pop(partition, None)

    async def _load_positions(self, messages: Sequence[Message]) -> None:
        """The positions of the batch's partitions this worker has not loaded yet. Raises
        :class:`PartitionGap` where the batch begins beyond the position Redis holds (with
        ``recover_gaps``): offsets acked to Kafka that Redis lost, for the caller to read
        again and apply first."""
        unknown = {m.partition for m in messages} - self.held.keys()
        if not unknown:
            return
        stored = await self.store.positions(unknown)
        for partition in unknown:
            held = self.held[partition] = stored.get(partition, -1)
            self.positions[partition] = max(held, self.positions.get(partition, -1))
        if self.settings.recover_gaps:
            self._check_gaps(messages, {p: self.positions[p] for p in stored})

    def _drop_positions(self) -> None:
        self.positions.clear()
        self.held.clear()

    def _committed(self, positions: dict[int, int]) -> None:
        self.held.update(positions)
        self.positions.update(positions)

    def _went_back(self, messages: Sequence[Message], stored: dict[int, int]) -> None:
        """Raises :class:`PartitionGap` when Redis holds a partition up to an offset before
        the one this worker committed there: it lost writes while the worker ran (a restart
        from an AOF that missed its last second). Nothing of the batch is written; the
        caller reads the lost offsets again."""
        behind = {
            p: stored[p]
            for p in {m.partition for m in messages}
            if p in stored and stored[p] < self.held[p]
        }
        if behind and self.settings.recover_gaps:
            self._check_gaps(messages, behind)

    def _check_gaps(self, messages: Sequence[Message], stored: dict[int, int]) -> None:
        first: dict[int, int] = {}
        for m in messages:
            first.setdefault(m.partition, m.offset)
        for partition, start in sorted(stored.items()):
            if first[partition] > start:
                raise PartitionGap(self.settings.events_topic, partition, start, first[partition])

    async def process(self, messages: Sequence[Message]) -> BatchReport:
        """Steps 1-4 up to the Redis transaction; on failure nothing of the batch is in Redis,
        so retry it. Then call :meth:`publish`."""
        try:
            return await self._process(messages)
        except Exception:
            if self.loop is not None:
                self.loop.forget_memory()  # its in-memory join ran ahead of Redis
            self._drop_positions()  # did the transaction land? Redis says, next time
            raise

    async def process_isolating(self, messages: Sequence[Message], retry: Retry) -> BatchReport:
        """:meth:`process`, with ``retry`` for transient failures; a failure of any other kind
        is the input's: the batch is bisected (halves in order) until the message that fails
        alone, twice, is dead-lettered with reason ``processing_error``."""
        what = f"batch of {len(messages)} messages"
        try:
            return await retry(lambda: self.process(messages), what)
        except (RedisDataLost, PartitionGap):
            raise  # not the input's: no message is to blame
        except Exception as exc:
            ERRORS.labels("input").inc()
            if len(messages) > 1:
                log.error("%s failed; isolating the message that causes it", what, exc_info=exc)
                half = len(messages) // 2
                report = await self.process_isolating(messages[:half], retry)
                return report.add(await self.process_isolating(messages[half:], retry))
            try:  # alone: once more, in case it was not the message's fault after all
                return await retry(lambda: self.process(messages), what)
            except (RedisDataLost, PartitionGap):
                raise
            except Exception as again:
                return await self._deadletter_failure(messages[0], again, retry)

    async def _deadletter_failure(
        self, message: Message, exc: Exception, retry: Retry
    ) -> BatchReport:
        where = f"{message.topic}/{message.partition}@{message.offset}"
        log.error("message %s fails to process: dead-lettered", where, exc_info=exc)
        detail = f"{type(exc).__name__}: {exc}"
        source = Source(message.topic, message.partition, message.offset)
        record = deadletter_record(
            Rejection("processing_error", None, detail), source, message.value
        )
        counters = Counter({"consumed": 1, "deadlettered": 1, "deadletter:processing_error": 1})
        plan = BatchPlan(deadletters=[(message.key, record)], counters=counters)
        position = max(message.offset + 1, self.positions.get(message.partition, -1))
        plan.positions = {message.partition: position}

        async def commit() -> BatchReport:
            try:
                await self.checkpoint.commit(plan)
            except Exception:
                self._drop_positions()
                raise
            self._committed(plan.positions)
            return BatchReport(counters)

        return await retry(commit, f"dead letter of {where}")

    async def tick(self, now_ms: int | None = None) -> BatchPlan:
        """A timer tick: close decisions due by wall clock, refresh the default; then
        call :meth:`publish`."""
        plan = BatchPlan()
        if self.loop is None:
            return plan
        try:
            inputs = await self.store.read(Reads(whole_catalog=self.catalog.refresh_due()))
            self._take_catalog(inputs)
            self.loop.plan_tick(plan, int(time.time() * 1000) if now_ms is None else now_ms)
            await self.checkpoint.commit(plan)
        except Exception:
            self.loop.forget_memory()  # reload the join from Redis, as it was before this tick
            raise
        return plan

    async def publish(self) -> int:
        """Steps 3-4 of the checkpoint: the owned partitions' outboxes to the log."""
        if self.loop is None:
            return 0
        return await self.checkpoint.publish(self.loop.partitions)

    async def _process(self, messages: Sequence[Message]) -> BatchReport:
        settings = self.settings
        latest = int(time.time() * 1000) + settings.max_future_skew_ms
        await self._load_positions(messages)
        positions = self.positions
        # Redeliveries (offsets before the partition's position) are duplicates: not decoded,
        # not dead-lettered again.
        new_messages = [m for m in messages if m.offset >= positions[m.partition]]
        batch = triage(new_messages, settings.max_event_bytes, latest)
        if self.pseudonym_key is not None:
            key = self.pseudonym_key
            batch.events = [pseudonymize(e, key) for e in batch.events]
        redelivered = len(messages) - len(new_messages)
        if redelivered:
            batch.counters.update(consumed=redelivered, duplicates=redelivered)
            batch.counters["redelivered"] += redelivered
        events = batch.events
        reads = Reads(
            event_ids=[e.event_id for e in events],
            positions=sorted({m.partition for m in messages}),
            users=sorted({e.user_id for e in events if e.user_id is not None and e.type != "item"}),
            items=self.catalog.unknown(
                e.item_id for e in events if e.type not in ("item", "forget")
            ),
            whole_catalog=self.catalog.refresh_due(),
        )
        with_partitions = list(zip(events, batch.partitions, strict=True))
        if self.loop is not None:
            self.loop.reads(with_partitions, reads)
        inputs = await self.store.read(reads)
        self._went_back(messages, inputs.positions)
        self._take_catalog(inputs)
        if self.loop is not None and inputs.decisions:
            missing = self.loop.missing_item_versions(inputs)
            if missing:  # items changed since those decisions: a second, rare round trip
                inputs.item_versions = dict(await self.store.item_versions(missing))

        plan = BatchPlan(deadletters=batch.deadletters, counters=batch.counters)
        for m in new_messages:  # redelivered ones lie below the position: it never goes back
            if m.offset >= plan.positions.get(m.partition, -1):
                plan.positions[m.partition] = m.offset + 1
        applied = inputs.applied
        new = [(e, p) for e, p in with_partitions if e.event_id not in applied]
        plan.counters["duplicates"] += len(events) - len(new)
        plan.counters["accepted"] += len(new)
        plan.applied_ids = [e.event_id for e, _ in new]
        fresh_with_partition = drop_forgotten(new, inputs.forgotten, plan)
        fresh = [e for e, _ in fresh_with_partition]

        items = item_features(fresh)
        self.catalog.update(items)
        plan.catalog = {i: orjson.dumps(f) for i, f in items.items()}
        tokens = self.pseudonym_key is not None
        fold_users(fresh, inputs.states, self.catalog, self.rules, plan, tokens)
        if self.loop is not None:
            now_ms = int(time.time() * 1000)
            self.loop.plan(plan, fresh_with_partition, plan.users, inputs, now_ms)
        plan.counters["batches"] += 1
        await self.checkpoint.commit(plan)
        self._committed(plan.positions)
        return BatchReport(plan.counters, fresh, set(plan.users))

    def _take_catalog(self, inputs: Inputs) -> None:
        if inputs.catalog is not None:
            self.catalog.replace(inputs.catalog)
        if inputs.items:
            self.catalog.merge(inputs.items)
