"""Which :class:`loopwise.streams.pipeline.Pipeline` runs which messages.

On one Redis (the default) one pipeline serves every partition the worker owns, and a
batch of several partitions is one transaction. On a Redis Cluster (``redis_cluster``) a
transaction must stay in one hash slot, so every owned events partition gets a pipeline of
its own (its store tags the partition's keys, its learning loop holds the partition's
join), and a batch is split by partition, in order: each part is read, planned and
committed on its own, with its partition's position, so a crash between two parts
replays only what its partition had not committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from loopwise.streams.pipeline import Message, Pipeline


class Pipelines:
    """The worker's pipelines: one shared (``per_partition`` false) or one per partition,
    made by ``make`` (``None``: the shared one; else the partition)."""

    def __init__(self, make: Callable[[int | None], Pipeline], per_partition: bool) -> None:
        self.make = make
        self.per_partition = per_partition
        self.shared = None if per_partition else make(None)
        self.by_partition: dict[int, Pipeline] = {}

    def get(self, partition: int) -> Pipeline:
        """The pipeline of ``partition`` (made on first use)."""
        if self.shared is not None:
            return self.shared
        pipeline = self.by_partition.get(partition)
        if pipeline is None:
            pipeline = self.by_partition[partition] = self.make(partition)
        return pipeline

    def split(self, messages: Sequence[Message]) -> list[tuple[Pipeline, list[Message]]]:
        """The batch as (pipeline, its messages in order): one part, or one per partition
        in the order partitions first appear."""
        if self.shared is not None:
            return [(self.shared, list(messages))]
        parts: dict[int, list[Message]] = {}
        for message in messages:
            parts.setdefault(message.partition, []).append(message)
        return [(self.get(p), part) for p, part in parts.items()]

    def all(self) -> list[Pipeline]:
        if self.shared is not None:
            return [self.shared]
        return [self.by_partition[p] for p in sorted(self.by_partition)]

    def disown(self, partitions: Iterable[int]) -> None:
        """Partitions moved to another worker: their join, outbox checks and positions are
        forgotten (a partition's own pipeline goes with it)."""
        gone = set(partitions)
        if self.shared is not None:
            owners = [self.shared]
        else:
            owners = [self.by_partition.pop(p) for p in sorted(gone & self.by_partition.keys())]
        for pipeline in owners:
            if pipeline.loop is not None:
                pipeline.loop.disown(gone)
            pipeline.checkpoint.disown(gone)
            pipeline.disown(gone)
