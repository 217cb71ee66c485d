"""The learning loop's stream side: reward join, next-best-actions, the log records.

Pure: runs inside a batch's plan, after the user-state fold, on what the batch
read up front (:class:`loopwise.streams.plan.Inputs`), and fills the plan's
loop part (:class:`loopwise.streams.plan.BatchPlan`); the checkpoint writes it
(``{p}`` is ``key_prefix``):

- ``{p}join:{partition}``   open decisions (shown, collecting rewards), per events partition
- ``{p}decision:{id}``      a computed decision until it is shown (or expires); its
  candidates by (item id, version), so it does not copy their features
- ``{p}itemv:{id}:{version}`` the features of an item version decisions refer to
- ``{p}nba:{user_id}``      the next-best-action; ``nba:__default__`` too
- ``{p}outbox:{partition}`` closed decisions' log records, until the log has them

A batch: (1) load the open decisions of partitions seen for the first time;
(2) fold the batch's views and rewards into the join; (3) close due decisions
into log records; (4) decide for every touched user with consent, and refresh
the default. A timer tick does (3) and the default only.

With ``decision_interval_ms`` (a staleness budget; 0, off, by default) a user
decided less than that long ago is not decided again at once: the user's latest
state waits in memory and is decided when the interval is over, by a batch or a
tick, so a busy user costs one decision per interval however many events they
send. A crash loses the waiting users' re-decision (their ``nba:`` stays the
previous decision until their next event), nothing else.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from loopwise.config import Settings
from loopwise.learners.policy import Action
from loopwise.streams.catalog import Catalog
from loopwise.streams.deadletter import Source, deadletter_record
from loopwise.streams.decisions import DecisionMaker, nba_json
from loopwise.streams.decoding import Event, Rejection
from loopwise.streams.plan import BatchPlan, Inputs, Reads
from loopwise.streams.reward_join import Decision, JoinChanges, OpenDecision, RewardJoin
from loopwise.streams.user_state import UserState

log = logging.getLogger("loopwise.loop")

LATEST_DECISIONS_KEPT = 200_000  # users whose recent decision ids the loop remembers
REPLACED_KEPT = 1_000_000  # replaced decisions the loop deletes itself when due


@dataclass(slots=True)
class Recent:
    """A user's recent decisions: their ids, oldest first, the latest last, and when the
    latest was made (the staleness budget's clock)."""

    ids: list[str]
    decided_ms: int


@dataclass(slots=True)
class Waiting:
    """A user whose re-decision waits for the staleness budget (``decision_interval_ms``)."""

    state: UserState
    context: dict[str, Any]
    last_event_id: str
    partition: int
    due_ms: int


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
        # user -> their recent decisions: a replaced one expires soon, and past
        # ``replaced_decisions_kept`` it is deleted at once (bounded: a user beyond it keeps
        # their old decisions for the full TTL and is decided at once, nothing worse).
        self._recent: OrderedDict[str, Recent] = OrderedDict()
        # Replaced decisions, oldest first, with the wall-clock ms at which they are deleted:
        # their TTL would remove them too, but Redis reclaims expired keys lazily (by
        # sampling), so at ~1,000 replaced decisions a second many linger past their TTL.
        self._replaced: deque[tuple[int, str]] = deque()
        # When the catalog's item versions were last checked for writing (see _item_versions).
        self._versions_checked: tuple[int, float] = (-1, float("-inf"))
        # The staleness budget: the users whose re-decision waits, by user.
        self.waiting: dict[str, Waiting] = {}

    # ------------------------------------------------------------ ownership

    def own(self, partition: int, open_decisions: Iterable[OpenDecision]) -> None:
        """Take over a partition with its open decisions (as read from Redis)."""
        decisions = list(open_decisions)
        self.join.load(decisions)
        self.partitions.add(partition)
        log.info("owning partition %d: %d open decisions", partition, len(decisions))

    def disown(self, partitions: Iterable[int]) -> None:
        gone = set(partitions) & self.partitions
        self.join.disown(gone)
        self.partitions -= gone
        for user_id in [u for u, w in self.waiting.items() if w.partition in gone]:
            del self.waiting[user_id]  # their new owner decides for them

    def forget_memory(self) -> None:
        """Drop the in-memory join; the next batch reloads it from Redis (after a failure)."""
        self.disown(set(self.partitions))
        self._versions_checked = (-1, float("-inf"))  # the failed plan's may not be written

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
        decisions = self._stored_decisions(inputs, changes)
        self.join.apply(user_events, decisions, changes, now_ms)
        self.join.close_due(now_ms, changes)
        self._plan_join(plan, changes)

        # No consent: no decision, and the old one is erased (with or without a catalog).
        plan.nba_removed.extend(u for u, state in states.items() if state is None)
        for user_id in plan.forgotten:  # and a forgotten user's stored decisions too
            recent = self._recent.pop(user_id, None)
            if recent is not None:
                plan.decisions_removed.extend(recent.ids)
        for user_id, state in states.items():
            if state is None:  # no consent, or forgotten: nothing waits for them either
                self.waiting.pop(user_id, None)
        actions = self.catalog.actions
        if not actions:
            return
        latest: dict[str, tuple[str, int]] = {}  # user -> (latest event id, its partition)
        latest_context: dict[str, dict[str, Any]] = {}
        for event, partition in user_events:
            latest[event.user_id or ""] = (event.event_id, partition)
            if event.raw.get("context"):
                latest_context[event.user_id or ""] = event.raw["context"]
        interval = self.settings.decision_interval_ms
        for user_id, state in states.items():
            if state is None:
                continue
            waiting = self.waiting.pop(user_id, None)
            context = latest_context.get(user_id) or (waiting.context if waiting else {})
            event_id, partition = latest.get(user_id, ("", 0))
            recent = self._recent.get(user_id)
            if interval and recent is not None and now_ms - recent.decided_ms < interval:
                self.waiting[user_id] = Waiting(
                    state, context, event_id, partition, recent.decided_ms + interval
                )
                plan.counters["decisions_deferred"] += 1
                continue
            self._decide(plan, user_id, state, context, event_id, actions, now_ms)
        self._decide_waiting(plan, actions, now_ms)
        self._delete_replaced(plan, now_ms)
        if plan.decisions_set:
            self._item_versions(plan, actions, now_ms / 1000)
        plan.default_nba = nba_json(self.maker.default_decision(actions, now_ms))

    def _decide(
        self,
        plan: BatchPlan,
        user_id: str,
        state: UserState,
        context: dict[str, Any],
        last_event_id: str,
        actions: list[Action],
        now_ms: int,
    ) -> None:
        """Decide for one user: the decision stored, ``nba:`` set, the replaced one retired."""
        decision = self.maker.decide(user_id, state, context, actions, now_ms, subject=state.token)
        plan.decisions_set[decision.decision_id] = decision.to_json()
        previous, dropped = self._remember(user_id, decision.decision_id, now_ms)
        if dropped is not None:
            plan.decisions_removed.append(dropped)
        if previous is not None and previous != dropped:
            plan.decisions_superseded.append(previous)
            replaced_ttl_ms = self.settings.superseded_decision_ttl_s * 1000
            self._replaced.append((now_ms + replaced_ttl_ms, previous))
        plan.nba_set[user_id] = nba_json(decision, {"last_event_id": last_event_id})
        plan.counters["decisions_made"] += 1

    def _decide_waiting(self, plan: BatchPlan, actions: list[Action], now_ms: int) -> None:
        """Decide for the waiting users whose interval is over."""
        due = [u for u, w in self.waiting.items() if w.due_ms <= now_ms]
        for user_id in due:
            w = self.waiting.pop(user_id)
            self._decide(plan, user_id, w.state, w.context, w.last_event_id, actions, now_ms)

    def missing_item_versions(self, inputs: Inputs) -> list[tuple[str, str]]:
        """The item versions the batch's stored decisions refer to that the catalog does not
        hold (items changed since): to read from Redis before planning."""
        record = self.catalog.record
        return sorted(
            {
                ref
                for stored in inputs.decisions.values()
                for ref in Decision.references(stored)
                if record(*ref) is None
            }
        )

    def _stored_decisions(self, inputs: Inputs, changes: JoinChanges) -> dict[str, Decision]:
        """The batch's stored decisions with their candidates' features, from the catalog or
        from the item versions read. One whose versions are gone is unknown (counted)."""
        fetched: dict[tuple[str, str], dict[str, Any] | None] = {}
        catalog_record = self.catalog.record

        def resolve(item_id: str, version: str) -> dict[str, Any] | None:
            record = catalog_record(item_id, version)
            if record is not None:
                return record
            ref = (item_id, version)
            if ref not in fetched:
                raw = inputs.item_versions.get(ref)
                fetched[ref] = (
                    None if raw is None else {"id": item_id, "features": orjson.loads(raw)}
                )
            return fetched[ref]

        decisions = {}
        for decision_id, stored in inputs.decisions.items():
            decision = Decision.from_stored(stored, resolve)
            if decision is None:
                changes.count("decisions_unresolved")
                log.warning("decision %s refers to item versions no longer stored", decision_id)
                continue
            decisions[decision_id] = decision
        return decisions

    def _item_versions(self, plan: BatchPlan, actions: list[Action], now_s: float) -> None:
        """Stored decisions name their candidates by item version; the ``itemv:`` keys hold
        the versions' features for twice a decision's lifetime, written when a version is new
        to this worker and again once it is older than half a lifetime (so every decision's
        versions outlive it). Checked when the catalog changed, else at most every minute."""
        ttl = self.settings.decision_ttl_s
        version, checked_at = self._versions_checked
        if version == self.catalog.version and now_s - checked_at < min(60.0, ttl / 4):
            return
        self._versions_checked = (self.catalog.version, now_s)
        due = now_s - ttl / 2
        plan.item_versions = [
            a for a in actions if a.derived.get("written_at", float("-inf")) <= due
        ]

    def _too_large(self, plan: BatchPlan, open_decision: OpenDecision, record: bytes) -> None:
        """A record the broker would refuse would block its outbox for good: it goes to the
        dead-letter topic instead (``source``: the log partition it was for, offset -1)."""
        decision = open_decision.decision
        limit = self.settings.max_log_record_bytes
        detail = (
            f"log record of decision {decision.decision_id} (user "
            f"{decision.subject or decision.user_id}) is "
            f"{len(record):,} bytes > max_log_record_bytes={limit:,}: not logged"
        )
        log.error("%s; dead-lettered (its candidates' features are too large)", detail)
        source = Source(self.settings.propensity_log_topic, open_decision.partition, -1)
        rejection = Rejection("log_record_too_large", "actions", detail)
        plan.deadletters.append(
            (
                (decision.subject or decision.user_id).encode(),
                deadletter_record(rejection, source, record),
            )
        )
        plan.counters["log_records_too_large"] += 1

    def _delete_replaced(self, plan: BatchPlan, now_ms: int) -> None:
        """Delete the replaced decisions whose showable time is over (bounded: past
        ``REPLACED_KEPT`` the oldest are left to their TTL)."""
        replaced = self._replaced
        while len(replaced) > REPLACED_KEPT:
            replaced.popleft()
        while replaced and replaced[0][0] <= now_ms:
            plan.decisions_removed.append(replaced.popleft()[1])

    def _remember(
        self, user_id: str, decision_id: str, now_ms: int
    ) -> tuple[str | None, str | None]:
        """Note the user's new latest decision: (the one it replaces, the oldest replaced one
        past ``replaced_decisions_kept``, deleted at once), each None when there is none.

        So stored decisions stay below (1 + replaced_decisions_kept) per user whatever the
        decision rate: without the cap they were the rate times the replaced decisions' TTL
        (a 20-minute soak at 1,000 events/s: Redis grew with the rate, by +13 MB/min)."""
        recent = self._recent.pop(user_id, None) or Recent([], now_ms)
        self._recent[user_id] = recent  # the most recently decided user last
        ids = recent.ids
        previous = ids[-1] if ids else None
        ids.append(decision_id)
        recent.decided_ms = now_ms
        dropped = ids.pop(0) if len(ids) > 1 + self.settings.replaced_decisions_kept else None
        if len(self._recent) > LATEST_DECISIONS_KEPT:
            self._recent.popitem(last=False)
        return previous, dropped

    def plan_tick(self, plan: BatchPlan, now_ms: int) -> None:
        """Between batches: close decisions whose wall-clock window ended; decide for the
        waiting users whose interval is over; refresh the default."""
        changes = JoinChanges()
        self.join.close_due(now_ms, changes)
        self._plan_join(plan, changes)
        actions = self.catalog.actions
        if actions:
            self._decide_waiting(plan, actions, now_ms)
            if plan.decisions_set:
                self._item_versions(plan, actions, now_ms / 1000)
        self._delete_replaced(plan, now_ms)
        if actions:
            plan.default_nba = nba_json(self.maker.default_decision(actions, now_ms))

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
            if len(record) > self.settings.max_log_record_bytes:
                self._too_large(plan, open_decision, record)
                continue
            plan.outbox.setdefault(open_decision.partition, []).append(record)
        plan.join_dropped.extend(changes.dropped)
        plan.decisions_removed.extend(changes.dropped)
        plan.owned_partitions = sorted(self.partitions)
        counts = Counter(changes.counts)
        counts["decisions_opened"] += len(changes.opened)
        counts["decisions_closed"] += len(changes.closed)
        plan.counters.update(counts)
