"""The reward join: a shown decision ⨝ the clicks and purchases that follow it.

A ``view`` carrying a known ``decision_id`` opens the decision (the impression);
``click`` and ``purchase`` events within the attribution window add to its
reward: those carrying the ``decision_id``, and those without one, which go to
the user's latest open decision that showed the same item. A decision closes
once the watermark of its own events partition (the largest event time seen
on that partition, as Kafka Streams' stream time) passes ``shown_at + window``,
or at the latest ``window`` of wall-clock time after it opened, so that an idle
stream holds nothing open; with no reward it gets the default reward. Each
closed decision becomes one propensity-log record. Watermarks are per
partition so that one partition running ahead (catch-up, a producer's clock)
closes nothing on the others; events dated too far ahead of the wall clock
never get here (``max_future_skew_ms``, :func:`loopwise.streams.decoding.decode`).

A second view of an open decision is the same impression shown again and
changes nothing; a view of a closed or unknown decision opens nothing. Rewards
for a closed decision are late and ignored. Redelivered events never reach this
module (the pipeline drops applied event_ids first), so no reward counts twice.

Pure and synchronous: the pipeline persists :class:`OpenDecision` records in
Redis with each batch and reloads them after a restart.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from loopwise.learners.log_record import LogRecord
from loopwise.learners.policy import item_version
from loopwise.streams.decoding import Event


@dataclass(frozen=True, slots=True)
class RewardRule:
    """reward = click·[clicks ≥ 1] + purchase·[purchases ≥ 1] + revenue·Σ price·quantity.

    With no click and no purchase in the window the decision gets ``default``
    (Azure Personalizer's "default reward").
    """

    click: float = 1.0
    purchase: float = 0.0
    revenue: float = 0.0
    default: float = 0.0

    def __call__(self, clicks: int, purchases: int, revenue: float) -> float:
        if not clicks and not purchases:
            return self.default
        return self.click * (clicks > 0) + self.purchase * (purchases > 0) + self.revenue * revenue


@dataclass(slots=True)
class Decision:
    """A next-best-action as computed by the worker (stored until shown or expired)."""

    decision_id: str
    user_id: str
    arm: str
    policy_version: str
    computed_at: int
    context: dict[str, Any]
    user_features: dict[str, Any]
    actions: list[dict[str, Any]]  # [{"id", "features"}]
    pmf: list[float]
    chosen: int
    # each action's item version (loopwise.learners.policy.item_version of its features)
    versions: list[str] = field(default_factory=list)
    # with pseudonymization: the user's token, the user_id of the log record
    subject: str = ""

    @property
    def item_id(self) -> str:
        return str(self.actions[self.chosen]["id"])

    def to_json(self) -> bytes:
        """The stored form (``decision:{id}``): the candidates by reference, ``actions`` their
        ids and ``versions`` their item versions, whose features are in ``itemv:`` keys, so a
        decision does not copy every candidate's features."""
        actions = self.actions
        versions = self.versions
        if len(versions) != len(actions):
            versions = [item_version(a["features"]) for a in actions]
        stored = {
            "decision_id": self.decision_id,
            "user_id": self.user_id,
            "arm": self.arm,
            "policy_version": self.policy_version,
            "computed_at": self.computed_at,
            "context": self.context,
            "user_features": self.user_features,
            "actions": [a["id"] for a in actions],
            "versions": versions,
            "pmf": self.pmf,
            "chosen": self.chosen,
        }
        if self.subject:
            stored["subject"] = self.subject
        return orjson.dumps(stored)

    @staticmethod
    def references(stored: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The (item id, version) pairs a stored decision refers to (none in the old form)."""
        actions = stored.get("actions") or []
        if actions and isinstance(actions[0], dict):
            return []
        return list(zip(actions, stored.get("versions") or [], strict=True))

    @classmethod
    def from_stored(
        cls, stored: Mapping[str, Any], resolve: Callable[[str, str], dict[str, Any] | None]
    ) -> Decision | None:
        """The decision of a stored form (:meth:`to_json`, parsed); ``resolve(item_id, version)``
        gives an action's ``{"id", "features"}`` record. None when a version is unknown."""
        refs = cls.references(stored)
        if not refs:  # stored before decisions held references: the features are inline
            return cls(**stored)
        records = [resolve(item_id, version) for item_id, version in refs]
        if any(record is None for record in records):
            return None
        return cls(**{**stored, "actions": records})


@dataclass(slots=True)
class OpenDecision:
    """A shown decision collecting rewards."""

    decision: Decision
    shown_at: int  # event time of the view
    opened_wall_ms: int
    context: dict[str, Any]  # the request context of the view
    partition: int = 0  # of the events topic: where this decision's state and log record live
    clicks: int = 0
    purchases: int = 0
    revenue: float = 0.0

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # the nested Decision too

    @classmethod
    def from_json(cls, raw: bytes | str) -> OpenDecision:
        fields = orjson.loads(raw)
        fields["decision"] = Decision(**fields["decision"])
        return cls(**fields)


@dataclass(slots=True)
class JoinChanges:
    """What one batch did to the join, for the Redis transaction and the counters."""

    opened: list[str] = field(default_factory=list)
    updated: set[str] = field(default_factory=set)
    closed: list[OpenDecision] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


class RewardJoin:
    """Open decisions of the partitions this worker owns, with their rewards so far."""

    def __init__(self, window_ms: int, rule: RewardRule) -> None:
        self.window_ms = window_ms
        self.rule = rule
        self.open: dict[str, OpenDecision] = {}
        self.watermarks: dict[int, int] = {}  # events partition -> largest event time seen
        # (user_id, item_id) -> decision_id of the latest open decision showing that item
        self._latest_view: dict[tuple[str, str], str] = {}
        # When each open decision falls due, so that closing looks at the due ones only:
        # (wall-clock end, seq, id), and per partition (event-time end, seq, id). Entries of
        # decisions no longer open are skipped when they come up.
        self._wall_ends: list[tuple[int, int, str]] = []
        self._time_ends: dict[int, list[tuple[int, int, str]]] = {}
        self._seq = 0

    def load(self, decisions: Iterable[OpenDecision]) -> None:
        """Add decisions restored from Redis (after a restart or a rebalance)."""
        for open_decision in sorted(decisions, key=lambda d: d.shown_at):
            self._track(open_decision)

    def drop(self, decision_ids: Iterable[str]) -> None:
        """Forget decisions of partitions this worker no longer owns."""
        for decision_id in decision_ids:
            open_decision = self.open.pop(decision_id, None)
            if open_decision is not None:
                key = (open_decision.decision.user_id, open_decision.decision.item_id)
                if self._latest_view.get(key) == decision_id:
                    del self._latest_view[key]

    def disown(self, partitions: set[int]) -> None:
        """Forget the open decisions, watermarks and due times of ``partitions``."""
        self.drop([i for i, d in self.open.items() if d.partition in partitions])
        for partition in partitions:
            self.watermarks.pop(partition, None)
            self._time_ends.pop(partition, None)

    def apply(
        self,
        events: Iterable[tuple[Event, int]],
        decisions: Mapping[str, Decision],
        changes: JoinChanges,
        now_wall_ms: int,
    ) -> None:
        """Fold a batch's user events (with their partitions, in order) into the join.

        ``decisions`` maps the decision_ids of the batch's views to the stored
        decisions (absent: unknown or already closed). An event without
        consent drops the user's open decisions.
        """
        watermarks = self.watermarks
        for event, partition in events:
            # A forget is dated when it was asked for, not in the stream's event time: during
            # a catch-up it must not close the partition's decisions early.
            if event.timestamp > watermarks.get(partition, 0) and event.type != "forget":
                watermarks[partition] = event.timestamp
            if not event.consent:
                assert event.user_id is not None
                self.drop_user(event.user_id, changes)
            elif event.type == "view":
                self._on_view(event, decisions, changes, now_wall_ms, partition)
            elif event.type in ("click", "purchase"):
                self._on_reward(event, changes)

    def drop_user(self, user_id: str, changes: JoinChanges) -> None:
        """A user withdrew consent: their open decisions are dropped, not logged nor learned."""
        ids = [i for i, d in self.open.items() if d.decision.user_id == user_id]
        self.drop(ids)
        for decision_id in ids:
            changes.updated.discard(decision_id)
            changes.dropped.append(decision_id)
            changes.count("dropped_no_consent")

    def _on_view(
        self,
        event: Event,
        decisions: Mapping[str, Decision],
        changes: JoinChanges,
        now_wall_ms: int,
        partition: int,
    ) -> None:
        decision_id = event.raw.get("decision_id")
        if decision_id is None:
            return
        if decision_id in self.open:
            changes.count("repeated_views")
            return
        decision = decisions.get(decision_id)
        if decision is not None and decision.user_id == "__default__":
            changes.count("default_views")  # the shared non-personalized decision: not logged
            return
        if decision is None or decision.user_id != event.user_id:
            changes.count("unknown_decisions")
            return
        if decision.item_id != event.item_id:
            # Not the item the policy chose: no valid propensity, so no decision to log.
            changes.count("mismatched_views")
            return
        context = event.raw.get("context") or decision.context
        open_decision = OpenDecision(
            decision, event.timestamp, now_wall_ms, dict(context), partition
        )
        self._track(open_decision)
        changes.opened.append(decision_id)
        changes.updated.add(decision_id)

    def _on_reward(self, event: Event, changes: JoinChanges) -> None:
        assert event.user_id is not None
        decision_id = event.raw.get("decision_id") or self._latest_view.get(
            (event.user_id, event.item_id)
        )
        open_decision = self.open.get(decision_id) if decision_id else None
        if open_decision is None or open_decision.decision.user_id != event.user_id:
            changes.count("unattributed_rewards")
            return
        if not 0 <= event.timestamp - open_decision.shown_at <= self.window_ms:
            changes.count("late_rewards")
            return
        if event.type == "click":
            open_decision.clicks += 1
        else:
            open_decision.purchases += 1
            price = float(event.raw.get("price") or 0.0)
            open_decision.revenue += price * int(event.raw.get("quantity") or 1)
        changes.updated.add(open_decision.decision.decision_id)
        changes.count("joined_rewards")

    def close_due(self, now_wall_ms: int, changes: JoinChanges) -> None:
        """Close every decision whose window ended in its partition's event time or in
        wall-clock time."""
        found: dict[str, int] = {}  # decision_id -> seq (the order in which it was opened)
        self._pop_due(self._wall_ends, now_wall_ms, found)
        for partition, ends in self._time_ends.items():
            self._pop_due(ends, self.watermarks.get(partition, 0), found)
        due = [self.open[i] for i in found]
        due.sort(key=lambda d: (d.shown_at, found[d.decision.decision_id]))
        for open_decision in due:
            decision_id = open_decision.decision.decision_id
            self.drop([decision_id])
            changes.updated.discard(decision_id)
            changes.closed.append(open_decision)

    def record(self, open_decision: OpenDecision) -> LogRecord:
        """The propensity-log record of a closed decision (serialize it with ``to_json()``)."""
        d = open_decision.decision
        reward = self.rule(open_decision.clicks, open_decision.purchases, open_decision.revenue)
        return LogRecord(
            decision_id=d.decision_id,
            timestamp=open_decision.shown_at,
            user_id=d.subject or d.user_id,
            arm=d.arm,
            policy_version=d.policy_version,
            context=open_decision.context,
            user_features=d.user_features,
            actions=d.actions,
            chosen=d.chosen,
            propensity=d.pmf[d.chosen],
            pmf=d.pmf,
            reward=reward,
            reward_components={
                "clicks": open_decision.clicks,
                "purchases": open_decision.purchases,
                "revenue": round(open_decision.revenue, 6),
            },
        )

    def _pop_due(self, ends: list[tuple[int, int, str]], now: int, found: dict[str, int]) -> None:
        """Move the decisions of ``ends`` (a heap) that ended before ``now`` into ``found``."""
        while ends and ends[0][0] < now:
            _, seq, decision_id = heapq.heappop(ends)
            if decision_id in self.open:
                found.setdefault(decision_id, seq)

    def _track(self, open_decision: OpenDecision) -> None:
        decision = open_decision.decision
        self._seq += 1
        window, seq, decision_id = self.window_ms, self._seq, decision.decision_id
        heapq.heappush(self._wall_ends, (open_decision.opened_wall_ms + window, seq, decision_id))
        ends = self._time_ends.setdefault(open_decision.partition, [])
        heapq.heappush(ends, (open_decision.shown_at + window, seq, decision_id))
        self.open[decision.decision_id] = open_decision
        self._latest_view[(decision.user_id, decision.item_id)] = decision.decision_id
