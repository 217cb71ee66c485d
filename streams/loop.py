"""The learning loop's stream side: reward join, next-best-actions, the log records.

Pure: runs inside a batch's plan, after the user-state fold, on what the batch
read up front (:class:`loopwise.streams.plan.Inputs`), and fills the plan's
loop part (:class:`loopwise.streams.plan.BatchPlan`); the checkpoint writes it
(``{p}`` is ``key_prefix``):

- ``{p}join:{partition}``   open decisions (shown, collecting rewards), per events partition
- ``{p}decision:{id}``      a computed decision until it is shown (or expires)
- ``{p}nba:{user_id}``      the next-best-action; ``nba:__default__`` too
- ``{p}outbox:{partition}`` closed decisions' log records, until the log has them

A batch: (1) load the open decisions of partitions seen for the first time;
(2) fold the batch's views and rewards into the join; (3) close due decisions
into log records; (4) decide for every touched user with consent, and refresh
the default. A timer tick does (3) and the default only.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from loopwise.config import Settings
from loopwise.streams.catalog import Catalog
from loopwise.streams.decisions import DecisionMaker, nba_json
from loopwise.streams.decoding import Event
from loopwise.streams.plan import BatchPlan, Inputs, Reads
from loopwise.streams.reward_join import JoinChanges, OpenDecision, RewardJoin
from loopwise.streams.user_state import UserState

log = logging.getLogger("loopwise.loop")

LATEST_DECISIONS_KEPT = 200_000  # users whose latest decision id the loop remembers


class LearningLoop:
    """Join + decisions for the partitions this worker owns."""

    def __init__(
        self, settings: Settings, maker: DecisionMaker, join: RewardJoin, catalog: Catalog
    ) -> None:
        self.settings = settings
        self.maker = maker
        self.join = join
        self.catalog = catalog
        self.partitions: set[int] = set()
        # user -> their latest decision's id, so that it expires soon once replaced (bounded:
        # a user beyond it keeps their old decisions for the full TTL, nothing worse).
        self._latest: OrderedDict[str, str] = OrderedDict()

    # ------------------------------------------------------------ ownership

    def own(self, partition: int, open_decisions: Iterable[OpenDecision]) -> None:
        """Take over a partition with its open decisions (as read from Redis)."""
        decisions = list(open_decisions)
        self.join.load(decisions)
        self.partitions.add(partition)
        log.info("owning partition %d: %d open decisions", partition, len(decisions))

    def disown(self, partitions: Iterable[int]) -> None:
        gone = set(partitions) & self.partitions
        self.join.drop([i for i, d in self.join.open.items() if d.partition in gone])
        for partition in gone:
            self.join.watermarks.pop(partition, None)
        self.partitions -= gone

    def forget_memory(self) -> None:
        """Drop the in-memory join; the next batch reloads it from Redis (after a failure)."""
        self.disown(set(self.partitions))

    # ------------------------------------------------------------------ plan

    def reads(self, events: Iterable[tuple[Event, int]], reads: Reads) -> None:
        """Add what the loop needs for these events to the batch's reads."""
        partitions: set[int] = set()
        shown: set[str] = set()
        for event, partition in events:
            partitions.add(partition)
            decision_id = event.raw.get("decision_id")
            if decision_id:
                shown.add(str(decision_id))
        reads.join_partitions = sorted(partitions - self.partitions)
        reads.decisions = sorted(shown)

    def plan(
        self,
        plan: BatchPlan,
        events: list[tuple[Event, int]],
        states: Mapping[str, UserState | None],
        inputs: Inputs,
        now_ms: int,
    ) -> None:
        """Join the batch's fresh events, close due decisions, decide for every touched user."""
        for partition, open_decisions in sorted(inputs.joins.items()):
            if partition not in self.partitions:
                self.own(partition, open_decisions)
        changes = JoinChanges()
        user_events = [(e, p) for e, p in events if e.type != "item"]
        self.join.apply(user_events, inputs.decisions, changes, now_ms)
        self.join.close_due(now_ms, changes)
        self._plan_join(plan, changes)

        # No consent: no decision, and the old one is erased (with or without a catalog).
        plan.nba_removed.extend(u for u, state in states.items() if state is None)
        actions = self.catalog.actions
        if not actions:
            return
        latest_context: dict[str, dict[str, Any]] = {}
        latest_event: dict[str, str] = {}
        for event, _ in user_events:
            latest_event[event.user_id or ""] = event.event_id
            if event.raw.get("context"):
                latest_context[event.user_id or ""] = event.raw["context"]
        decided = [(user_id, state) for user_id, state in states.items() if state is not None]
        for user_id, state in decided:
            context = latest_context.get(user_id, {})
            decision = self.maker.decide(user_id, state, context, actions, now_ms)
            plan.decisions_set[decision.decision_id] = decision.to_json()
            previous = self._remember(user_id, decision.decision_id)
            if previous is not None:
                plan.decisions_superseded.append(previous)
            plan.nba_set[user_id] = nba_json(
                decision, {"last_event_id": latest_event.get(user_id, "")}
            )
        plan.counters["decisions_made"] += len(decided)
        plan.default_nba = nba_json(self.maker.default_decision(actions, now_ms))

    def _remember(self, user_id: str, decision_id: str) -> str | None:
        latest = self._latest
        previous = latest.pop(user_id, None)
        latest[user_id] = decision_id
        if len(latest) > LATEST_DECISIONS_KEPT:
            latest.popitem(last=False)
        return previous

    def plan_tick(self, plan: BatchPlan, now_ms: int) -> None:
        """Between batches: close decisions whose wall-clock window ended; refresh the default."""
        changes = JoinChanges()
        self.join.close_due(now_ms, changes)
        self._plan_join(plan, changes)
        if self.catalog.actions:
            plan.default_nba = nba_json(self.maker.default_decision(self.catalog.actions, now_ms))

    def _plan_join(self, plan: BatchPlan, changes: JoinChanges) -> None:
        for decision_id in changes.updated:
            open_decision = self.join.open[decision_id]
            plan.join_set.setdefault(open_decision.partition, {})[decision_id] = (
                open_decision.to_json()
            )
        for open_decision in changes.closed:
            decision_id = open_decision.decision.decision_id
            plan.join_removed.setdefault(open_decision.partition, []).append(decision_id)
            plan.decisions_removed.append(decision_id)
            record = self.join.record(open_decision).to_json()
            plan.outbox.setdefault(open_decision.partition, []).append(record)
        plan.join_dropped.extend(changes.dropped)
        plan.decisions_removed.extend(changes.dropped)
        plan.owned_partitions = sorted(self.partitions)
        counts = Counter(changes.counts)
        counts["decisions_opened"] += len(changes.opened)
        counts["decisions_closed"] += len(changes.closed)
        plan.counters.update(counts)
