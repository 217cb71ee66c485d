"""What a batch reads before it runs, and the plan of everything it writes.

A batch (or a timer tick) is three steps, and only the first and the last do I/O:

1. **read** (:meth:`loopwise.streams.redis_store.RedisStore.read`): one round
   trip for everything the batch needs (:class:`Reads` → :class:`Inputs`);
2. **plan** (pure: :mod:`loopwise.streams.pipeline`, :mod:`loopwise.streams.loop`):
   the user-state fold, the reward join and the decisions fill a
   :class:`BatchPlan` with values ready to write (serialized once);
3. **commit** (:class:`loopwise.streams.checkpoint.Checkpoint`): the plan's
   dead letters, then one Redis transaction, then the propensity-log outbox,
   in the order documented there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loopwise.learners.policy import Action
from loopwise.streams.reward_join import OpenDecision
from loopwise.streams.user_state import UserState


@dataclass(slots=True)
class Reads:
    """What a batch needs from Redis."""

    event_ids: list[str] = field(default_factory=list)  # applied already?
    positions: list[int] = field(default_factory=list)  # events partitions: stored positions
    users: list[str] = field(default_factory=list)  # their state hashes
    decisions: list[str] = field(default_factory=list)  # stored decisions shown by views
    join_partitions: list[int] = field(default_factory=list)  # open decisions of new partitions
    items: list[str] = field(default_factory=list)  # catalog entries the worker does not know
    whole_catalog: bool = False  # the periodic reload


@dataclass(slots=True)
class Inputs:
    """What :class:`Reads` found (absent keys are absent here too)."""

    applied: set[str] = field(default_factory=set)
    positions: dict[int, int] = field(default_factory=dict)  # partition -> next offset to apply
    states: dict[str, UserState] = field(default_factory=dict)
    forgotten: dict[str, int] = field(default_factory=dict)  # user -> event time of its forget
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)  # stored form, parsed
    # features JSON of the item versions stored decisions refer to and the catalog lacks
    item_versions: dict[tuple[str, str], bytes | None] = field(default_factory=dict)
    joins: dict[int, list[OpenDecision]] = field(default_factory=dict)
    items: dict[str, bytes | None] = field(default_factory=dict)
    catalog: dict[bytes, bytes] | None = None


@dataclass(slots=True)
class BatchPlan:
    """Everything one batch or timer tick writes; filled by the pure core, committed by
    :class:`loopwise.streams.checkpoint.Checkpoint`."""

    # Kafka, before anything else: refused messages (original key, dead-letter record)
    deadletters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    # user state: None erases a user (no consent); a user in `replaced` starts afresh
    users: dict[str, UserState | None] = field(default_factory=dict)
    replaced: set[str] = field(default_factory=set)
    catalog: dict[str, bytes] = field(default_factory=dict)  # item_id -> features JSON
    applied_ids: list[str] = field(default_factory=list)  # idempotency marks
    # events partition -> the next offset to apply (every offset before it is in Redis)
    positions: dict[int, int] = field(default_factory=dict)
    forgotten: dict[str, int] = field(default_factory=dict)  # tombstones: user -> forget time
    counters: Counter[str] = field(default_factory=Counter)
    # the reward join, per events partition: open decisions written / removed
    join_set: dict[int, dict[str, bytes]] = field(default_factory=dict)
    join_removed: dict[int, list[str]] = field(default_factory=dict)
    join_dropped: list[str] = field(default_factory=list)  # consent withdrawn: any partition
    owned_partitions: list[int] = field(default_factory=list)
    # closed decisions' propensity-log records, per partition, for the outbox
    outbox: dict[int, list[bytes]] = field(default_factory=dict)
    # decisions: stored until shown or expired; next-best-actions
    decisions_set: dict[str, bytes] = field(default_factory=dict)
    decisions_removed: list[str] = field(default_factory=list)
    decisions_superseded: list[str] = field(default_factory=list)  # replaced in nba: expire soon
    # item versions decisions refer to, written (or their lifetime renewed) with the batch
    item_versions: list[Action] = field(default_factory=list)
    nba_set: dict[str, bytes] = field(default_factory=dict)
    nba_removed: list[str] = field(default_factory=list)
    default_nba: bytes | None = None

    def writes_redis(self) -> bool:
        """False for a tick that found nothing to do (its transaction is skipped)."""
        return bool(
            self.users
            or self.catalog
            or self.applied_ids
            or self.positions
            or self.forgotten
            or any(self.counters.values())
            or self.join_set
            or self.join_removed
            or self.join_dropped
            or self.outbox
            or self.decisions_set
            or self.decisions_removed
            or self.decisions_superseded
            or self.item_versions
            or self.nba_set
            or self.nba_removed
            or self.default_nba is not None
        )
