"""The Faust app: the events agent, the learner agent and the join timer.

- ``events`` agent: takes batches without acking (:func:`loopwise.streams.batching.take_now`:
  what is there now, more only while it keeps coming), hands them to
  :class:`loopwise.streams.pipeline.Pipeline` (read → plan → commit: user state,
  reward join, next-best-actions, propensity-log outbox), retries on Redis or
  Kafka errors until the batch succeeds, and only then acks each event in
  order, so Faust commits no offset whose effects are not in Redis.
- ``learn`` task (:mod:`loopwise.streams.learning`): one worker at a time holds a lease
  in Redis and learns every partition of the propensity log, publishing versioned
  snapshots with their log offsets; every worker decides with the last published
  snapshot, reloaded when a newer one appears and before a newly assigned partition's
  first batch.
- a 1-second timer closes decisions whose wall-clock window ended while the
  stream was idle (the same read → plan → commit path, with no events); it does nothing
  while batches flow (each batch closes due decisions itself), so it never waits for them.

One agent instance each (``concurrency=1``): partitions are served in order,
which also keeps clear of faust-streaming's out-of-order commit bug (fs#606).
Batches and timer ticks take one lock, so the join state changes in one place
at a time. The deciding policies change only between batches (a reload); the
learning ones are the learner's own: one event loop, no thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Container, Mapping
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.learners.arms import ArmAssigner
from loopwise.redis_clients import redis_client
from loopwise.streams.batching import take_now
from loopwise.streams.catalog import Catalog
from loopwise.streams.checkpoint import Checkpoint
from loopwise.streams.decisions import DecisionMaker
from loopwise.streams.errors import ERRORS, PartitionGap, RedisDataLost, is_transient, retry
from loopwise.streams.learner import Learner, build_policies
from loopwise.streams.learning import Learning
from loopwise.streams.log_tail import decision_ids_at_tail, decision_ids_since, read_range
from loopwise.streams.loop import LearningLoop
from loopwise.streams.pipeline import BatchReport, Message, Pipeline
from loopwise.streams.redis_store import Epoch, RedisStore
from loopwise.streams.reward_join import RewardJoin, RewardRule
from loopwise.streams.routing import Pipelines

log = logging.getLogger("loopwise.worker")

EVENTS = PromCounter("loopwise_events_total", "consumed events by outcome", ["outcome"])
BATCH_SECONDS = Histogram("loopwise_batch_seconds", "time to apply one batch to Redis")
GAP_MESSAGES = PromCounter(
    "loopwise_gap_messages_total", "messages acked to Kafka that Redis lost, applied again"
)


def _reraise(exc: RedisDataLost) -> None:
    raise exc


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's aiokafka producer with Kafka's idempotence on (faust-streaming enables it only
    inside transactions). Without it, a produce request whose acknowledgement a broker crash
    swallowed is retried by aiokafka and written twice: a propensity-log record logged twice
    (seen in ``tests/test_loop_faults_integration.py``, broker kill -9). With it, the broker
    drops the retried copy (producer id + sequence number)."""

    # Faust's service lines (starting, creating its assignor topic) under Faust's name, not
    # this module's: the terminal shows other libraries' lines from WARNING on.
    logger = logging.getLogger("faust.producer")

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


faust_aiokafka.Transport.Producer = IdempotentProducer  # the worker's only Kafka transport


def build_app(
    settings: Settings,
    epoch: Epoch | None = None,
    on_data_lost: Callable[[RedisDataLost], None] = _reraise,
) -> faust.App:
    """A Faust app keeping ``user:{id}`` fresh and, unless disabled, the learning loop.

    With ``epoch``, every batch and timer tick checks that Redis still holds it; when it
    does not, ``on_data_lost`` is called (it stops the worker) and the batch is not acked.
    """
    # Faust makes a data folder even with in-memory tables: under state_dir, not the cwd.
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        datadir=str(settings.state_dir / "{conf.name}-data"),
        **kafka_clients.faust_broker_config(settings),  # broker and broker_credentials
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, 2 * settings.batch_size),
        broker_max_poll_records=settings.batch_size,
        # A crashed worker's partitions move to a new one after this long, not Faust's 60 s.
        broker_session_timeout=10.0,
        # On SIGTERM do not wait for unacked events: every unacked event is replayed and
        # skipped (idempotent) anyway.
        stream_wait_empty=False,
        broker_heartbeat_interval=3.0,
        # No tables, so no standbys: with Faust's default (1 standby replica) its sticky
        # assignor fills each worker up to ceil(P/N) and a third worker on 4 partitions got
        # none (2+2+0); without standbys it balances down to floor(P/N) (2+1+1).
        table_standby_replicas=0,
    )
    events_topic = _raw_topic(app, settings.events_topic)
    deadletter_topic = _raw_topic(app, settings.deadletter_topic)
    log_topic = _raw_topic(app, settings.propensity_log_topic)
    lock = asyncio.Lock()
    store = RedisStore.connect(settings, epoch)

    # force=True: send now and wait for the broker. Without it, Faust "attaches" a message
    # sent while an event is current to that event, publishing it only once the event is
    # acked, which would reorder our commit path (dead letters and log before the acks).
    async def send_deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
        pending = [
            await deadletter_topic.send(key=key, value=value, force=True) for key, value in records
        ]
        await asyncio.gather(*pending)  # wait for the broker's acknowledgement of each

    async def send_log(records: list[tuple[int, bytes, bytes]]) -> None:
        pending = [
            await log_topic.send(key=key, value=value, partition=partition, force=True)
            for partition, key, value in records
        ]
        await asyncio.gather(*pending)

    published: Learner | None = None
    catalog = Catalog()
    if settings.decisions:
        policies = build_policies(settings)
        maker = DecisionMaker(
            policies,
            ArmAssigner(settings.arms).assign,
            pmf_floor=settings.pmf_floor,
            max_candidates=settings.max_candidates,
            default_arm=settings.holdout_arm,
        )
        rule = RewardRule(
            settings.reward_click,
            settings.reward_purchase,
            settings.reward_revenue,
            settings.default_reward,
        )

        async def log_tail(partition: int, n: int) -> set[str]:
            return await decision_ids_at_tail(settings, partition, n)

        async def log_since(partition: int, since_ms: int) -> set[str]:
            return await decision_ids_since(settings, partition, since_ms)

        # The model decisions use: the published snapshot (its policies are the maker's),
        # loaded before any agent starts, then whenever a newer one is published.
        published = Learner(settings, store.client, policies, maker.popularity)
        with redis_client(settings) as sync:
            published.load_snapshot(sync.hgetall(published.key))
        maker.popularity = published.popularity

    def make_pipeline(partition: int | None) -> Pipeline:
        """The pipeline of every owned partition (None), or of one on a Redis Cluster."""
        own = store if partition is None else store.for_partition(partition)
        if not settings.decisions:
            return Pipeline(settings, own, Checkpoint(own, send_deadletters), catalog)
        checkpoint = Checkpoint(own, send_deadletters, send_log, log_tail, log_since)
        join = RewardJoin(settings.attribution_window_ms, rule)
        loop = LearningLoop(settings, maker, join, catalog)
        return Pipeline(settings, own, checkpoint, catalog, loop)

    pipelines = Pipelines(make_pipeline, per_partition=settings.redis_cluster)

    async def recover(gap: PartitionGap) -> None:
        """Read the offsets of a gap again and apply them (before the batch that found it)."""
        log.warning("%s: reading them again", gap)
        pipeline = pipelines.get(gap.partition)
        loop, checkpoint = pipeline.loop, pipeline.checkpoint
        if loop is not None:  # the log may hold decisions Redis lost the close of
            logged = await retry(
                lambda: checkpoint.rewound(loop.partitions | {gap.partition}),
                "reading the log's recent decisions",
                transient_only=False,
            )
            log.warning("%d decisions logged in the last 5 minutes: none is logged twice", logged)
        recovered = 0
        async for records in read_range(
            settings, gap.topic, gap.partition, gap.start, gap.end, settings.batch_size
        ):
            chunk = [Message(k, v, gap.topic, gap.partition, o) for k, v, o in records]
            pipeline.skip_to(gap.partition, chunk[0].offset)
            await pipeline.process_isolating(chunk, retry)
            await retry(pipeline.publish, "publishing the outbox", transient_only=False)
            recovered += len(chunk)
        pipeline.skip_to(gap.partition, gap.end)  # the rest held no message
        GAP_MESSAGES.inc(recovered)
        log.warning(
            "%s/%d: %d messages of offsets %d-%d applied again",
            gap.topic,
            gap.partition,
            recovered,
            gap.start,
            gap.end - 1,
        )

    async def process(messages: list[Message]) -> BatchReport:
        report = BatchReport()
        for pipeline, part in pipelines.split(messages):
            report.add(await process_part(pipeline, part))
        return report

    async def process_part(pipeline: Pipeline, messages: list[Message]) -> BatchReport:
        while True:
            try:
                return await pipeline.process_isolating(messages, retry)
            except PartitionGap as found:
                # Kafka or Redis failing meanwhile: read the gap again from its start (what
                # was applied of it lies below the position now, and is skipped).
                again = functools.partial(recover, found)
                await retry(again, "reading a gap again", transient_only=False)

    async def publish() -> int:
        return sum([await pipeline.publish() for pipeline in pipelines.all()])

    last_batch = [float("-inf")]  # when the last batch ended (perf_counter)

    @app.agent(events_topic, concurrency=1)
    async def events(stream: Any) -> None:
        batches = take_now(stream, settings.batch_size, 1.0, settings.batch_within_s)
        async for taken in batches:
            started = time.perf_counter()
            async with lock:
                # A batch taken before a rebalance may hold messages of partitions revoked
                # meanwhile (Faust clears its queues on revocation, not what an agent holds):
                # their new owner processes them; applying them here too would make two
                # workers own one partition's join and outbox, and log decisions twice.
                batch = owned_only(taken, owned_now)
                if not batch:
                    continue
                messages = [
                    Message(m.key, m.value, m.topic, m.partition, m.offset)
                    for m in (event.message for event in batch)
                ]
                try:
                    report = await process(messages)
                except RedisDataLost as exc:
                    on_data_lost(exc)
                    return  # the worker stops; this batch is never acked
                await retry(publish, "publishing the outbox", transient_only=False)
            last_batch[0] = time.perf_counter()
            BATCH_SECONDS.observe(last_batch[0] - started)
            for outcome in ("accepted", "duplicates", "deadlettered"):
                EVENTS.labels(outcome).inc(report.counters[outcome])
            for event in batch:
                await stream.ack(event)

    # The partitions this worker owns now, by the rebalance signals: a revoked partition
    # leaves at once (the consumer's own assignment changes only with the next one).
    owned_now: set[tuple[str, int]] = set()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked_owned(app: faust.App, revoked: Any, **_: Any) -> None:
        owned_now.difference_update((tp.topic, tp.partition) for tp in revoked)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app: faust.App, assigned: Any, **_: Any) -> None:
        owned_now.update((tp.topic, tp.partition) for tp in assigned)
        owned = sorted(tp.partition for tp in assigned if tp.topic == settings.events_topic)
        log.info("events partitions assigned to this worker: %s", owned)

    if published is not None:
        the_maker, the_published = maker, published

        def share_popularity() -> None:  # a loaded snapshot brings the pre-filter's counts
            the_maker.popularity = the_published.popularity

        def new_learner() -> Learner:  # learning policies of its own, not the deciding ones
            return Learner(settings, store.client, build_policies(settings))

        learning = Learning(settings, the_published, new_learner, share_popularity)

        @app.task
        async def learn() -> None:
            await learning.run()

        @app.on_partitions_assigned.connect  # type: ignore[arg-type]
        async def reload_on_assigned(app: faust.App, assigned: Any, **_: Any) -> None:
            # A partition's users keep their policy versions: the newest model first.
            try:
                await learning.reload_if_newer()
            except Exception as exc:
                log.error("reloading the model snapshot failed: %s", exc, exc_info=exc)

        @app.timer(1.0)
        async def close_idle_decisions() -> None:
            # While batches flow, each one closes due decisions and refreshes the default:
            # the timer stays out of their way instead of queueing for the lock.
            if lock.locked() or time.perf_counter() - last_batch[0] < 1.0:
                return
            async with lock:  # never retried inside the lock: the next tick tries again
                try:
                    for pipeline in pipelines.all():
                        await pipeline.tick()
                        await pipeline.publish()
                except RedisDataLost as exc:
                    on_data_lost(exc)
                except Exception as exc:
                    ERRORS.labels("transient" if is_transient(exc) else "timer").inc()
                    log.error("timer tick failed; the next one tries again", exc_info=exc)

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def on_revoked(app: faust.App, revoked: Any, **_: Any) -> None:
            gone = {tp.partition for tp in revoked if tp.topic == settings.events_topic}
            async with lock:
                pipelines.disown(gone)

    else:

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def on_revoked_state_only(app: faust.App, revoked: Any, **_: Any) -> None:
            gone = {tp.partition for tp in revoked if tp.topic == settings.events_topic}
            async with lock:
                pipelines.disown(gone)

    return app


def owned_only(batch: list[Any], owned: Container[tuple[str, int]]) -> list[Any]:
    """The events of ``batch`` whose (topic, partition) is ``owned``; the others are left
    unacked to the worker that owns their partition now (logged)."""
    kept = [e for e in batch if (e.message.topic, e.message.partition) in owned]
    if len(kept) < len(batch):
        gone = sorted({e.message.partition for e in batch} - {e.message.partition for e in kept})
        log.info(
            "%d events of partitions %s revoked while their batch waited: left to their new owner",
            len(batch) - len(kept),
            gone,
        )
    return kept


def _raw_topic(app: faust.App, name: str) -> Any:
    """A topic of bytes in, bytes out: decoding is ours (``streams.decoding``), not Faust's."""
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
