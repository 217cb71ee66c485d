"""The batch's pure core and its commit, rule by rule: catalog, fold, loop plan, checkpoint.

No Kafka, no Redis: the loop plans from what a batch read (``Inputs``), and the
checkpoint is checked against a recording store, for the order of its steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from loopwise.config import load_settings
from loopwise.learners.features import render_action
from loopwise.learners.policy import Action, ActionTable
from loopwise.learners.popularity import PopularityPolicy
from loopwise.streams.catalog import Catalog
from loopwise.streams.checkpoint import Checkpoint
from loopwise.streams.decisions import DecisionMaker
from loopwise.streams.decoding import Event
from loopwise.streams.loop import LearningLoop
from loopwise.streams.pipeline import drop_forgotten, fold_users, item_features
from loopwise.streams.plan import BatchPlan, Inputs, Reads
from loopwise.streams.reward_join import Decision, OpenDecision, RewardJoin, RewardRule
from loopwise.streams.user_state import StateRules, UserState

WINDOW = 1000


def ev(kind: str, ts: int, user: str | None = "u1", item: str = "i1", **raw: Any) -> Event:
    body = {"type": kind, "user_id": user, "item_id": item, "timestamp": ts, **raw}
    return Event(f"{kind}-{ts}-{user}-{item}", kind, user, item, ts, body)


def catalog_of(*items: tuple[str, dict[str, Any]]) -> Catalog:
    catalog = Catalog()
    catalog.replace({i: orjson.dumps(f) for i, f in items})
    return catalog


def loop_with(catalog: Catalog, **settings_: Any) -> LearningLoop:
    settings = load_settings(attribution_window_ms=WINDOW, **settings_)
    maker = DecisionMaker(
        {"popularity": PopularityPolicy()},
        lambda user: "popularity",
        pmf_floor=0.01,
        max_candidates=10,
        default_arm="popularity",
        rng=np.random.default_rng(0),
    )
    return LearningLoop(settings, maker, RewardJoin(WINDOW, RewardRule(default=-0.5)), catalog)


def stored_decision(decision_id: str, user: str, item: str) -> Decision:
    return Decision(
        decision_id=decision_id,
        user_id=user,
        arm="popularity",
        policy_version="popularity/popularity/0",
        computed_at=0,
        context={"device": "mobile"},
        user_features={"user_id": user},
        actions=[{"id": "i0", "features": {}}, {"id": item, "features": {}}],
        pmf=[0.4, 0.6],
        chosen=1,
    )


# ------------------------------------------------------------------ catalog


def test_catalog_keeps_an_unchanged_items_action_across_reloads() -> None:
    catalog = catalog_of(("a", {"category": "x"}), ("b", {"category": "y"}))
    a, b = catalog.actions
    render_action(a)  # derived once ...
    catalog.replace({"a": orjson.dumps({"category": "x"}), "b": orjson.dumps({"category": "z"})})
    a2, b2 = catalog.actions
    assert a2 is a and "vw" in a2.derived  # ... and kept while the item does not change
    assert b2 is not b and b2.features == {"category": "z"}
    assert catalog.category("b") == "z"


def test_catalog_reload_drops_removed_items_and_skips_inactive_ones() -> None:
    catalog = catalog_of(("a", {"category": "x"}), ("b", {"category": "y", "active": False}))
    assert [a.id for a in catalog.actions] == ["a"]
    assert catalog.category("b") == "y"  # inactive items still give their category
    version = catalog.version
    catalog.replace({"b": orjson.dumps({"category": "y"})})
    assert [a.id for a in catalog.actions] == ["b"] and catalog.category("a") is None
    assert catalog.version > version


def test_catalog_takes_a_batchs_items_at_once_and_unknown_ones_from_redis() -> None:
    catalog = catalog_of(("a", {"category": "x"}))
    events = [ev("item", 1, user=None, item="n", features={"category": ["odd"]}, active=True)]
    catalog.update(item_features(events))
    assert [a.id for a in catalog.actions] == ["a", "n"]
    assert catalog.category("n") == "['odd']"  # any JSON value becomes a hashable category
    assert catalog.unknown(["a", "n", "m", "m"]) == ["m"]
    catalog.merge({"m": orjson.dumps({"category": "w"}), "q": None})
    assert catalog.category("m") == "w" and catalog.unknown(["q"]) == ["q"]


def test_action_table_makes_one_action_per_item_version() -> None:
    table = ActionTable(max_items=2)
    first = table.get("a", {"p": 1})
    assert table.get("a", {"p": 1}) is first and table.version == 1
    assert table.intern(Action("a", {"p": 1})) is first
    second = table.get("a", {"p": 2})
    assert second is not first and table.version == 2
    fresh = Action("b", {})
    assert table.intern(fresh) is fresh
    table.get("c", {})  # past max_items it starts over
    assert len(table) == 1
    assert first.as_record() is first.as_record() == {"id": "a", "features": {"p": 1}}


# --------------------------------------------------------------------- fold


def test_fold_erases_on_withdrawn_consent_and_restarts_on_the_next_event() -> None:
    catalog = catalog_of(("i1", {"category": "x"}))
    plan = BatchPlan()
    old = UserState(views=5)
    events = [ev("view", 1), ev("view", 2, consent=False), ev("click", 3), ev("view", 4, "u2")]
    fold_users(events, {"u1": old, "u2": UserState()}, catalog, StateRules(), plan)
    u1, u2 = plan.users["u1"], plan.users["u2"]
    assert u1 is not None and (u1.views, u1.clicks) == (0, 1)  # nothing before the withdrawal
    assert plan.replaced == {"u1"} and plan.counters["no_consent"] == 1
    assert u2 is not None and u2.views == 1 and set(u2.affinities) == {"x"}


# --------------------------------------------------------------------- loop


def test_loop_reads_new_partitions_and_the_decisions_views_show() -> None:
    loop = loop_with(catalog_of(("i1", {})))
    loop.own(1, [])
    reads = Reads()
    events = [(ev("view", 1, decision_id="d2"), 0), (ev("click", 2), 1), (ev("view", 3), 2)]
    loop.reads(events, reads)
    assert reads.join_partitions == [0, 2] and reads.decisions == ["d2"]


def test_loop_plans_open_decide_and_default_then_a_tick_closes_into_the_outbox() -> None:
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})))
    shown = stored_decision("d1", "u1", "i1")
    view = ev("view", 100, decision_id="d1", propensity=0.6, context={"page": "home"})
    events = [(view, 3), (ev("view", 120, "u2", "i0"), 3)]
    states: dict[str, UserState | None] = {"u1": UserState(views=1), "u2": None}
    plan = BatchPlan()
    inputs = Inputs(decisions={"d1": orjson.loads(shown.to_json())}, joins={3: []})
    loop.plan(plan, events, states, inputs, now_ms=10_000)

    assert loop.partitions == {3}
    assert list(plan.join_set) == [3] and set(plan.join_set[3]) == {"d1"}
    assert plan.counters["decisions_opened"] == 1 and plan.counters["decisions_made"] == 1
    assert plan.nba_removed == ["u2"]  # no consent: no decision, the old one erased
    (nba,) = (orjson.loads(v) for v in plan.nba_set.values())
    assert nba["user_id"] == "u1" and nba["last_event_id"] == view.event_id
    assert nba["decision_id"] in plan.decisions_set and plan.default_nba is not None
    assert not plan.outbox

    tick = BatchPlan()
    loop.plan_tick(tick, now_ms=10_000 + WINDOW + 1)  # wall clock: the window is over
    assert tick.join_removed == {3: ["d1"]} and tick.decisions_removed == ["d1"]
    (record,) = (orjson.loads(r) for r in tick.outbox[3])
    assert record["decision_id"] == "d1" and record["reward"] == -0.5  # the default reward
    assert record["context"] == {"page": "home"} and record["propensity"] == 0.6
    assert tick.counters["decisions_closed"] == 1 and not loop.join.open


def test_a_replaced_decision_is_marked_to_expire_soon() -> None:
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})))
    first, second = BatchPlan(), BatchPlan()
    states: dict[str, UserState | None] = {"u1": UserState()}
    loop.plan(first, [(ev("view", 1), 0)], states, Inputs(joins={0: []}), now_ms=0)
    loop.plan(second, [(ev("view", 2), 0)], states, Inputs(), now_ms=0)
    assert not first.decisions_superseded
    assert second.decisions_superseded == list(first.decisions_set)


def test_a_shown_decision_gets_its_candidates_features_back_by_item_version() -> None:
    """The stored decision holds (id, version) pairs: the catalog's current versions resolve
    without Redis, an item changed since is read from its itemv key, a lost one is counted."""
    loop = loop_with(catalog_of(("i0", {"category": "a"}), ("i1", {"category": "b"})))
    plan = BatchPlan()
    loop.plan(plan, [(ev("view", 1), 0)], {"u1": UserState()}, Inputs(joins={0: []}), now_ms=0)
    [(decision_id, raw)] = plan.decisions_set.items()
    stored = orjson.loads(raw)
    assert stored["actions"] == ["i0", "i1"] and "features" not in stored
    chosen = stored["actions"][stored["chosen"]]
    view = (ev("view", 5, item=chosen, decision_id=decision_id), 0)

    shown = BatchPlan()
    inputs = Inputs(decisions={decision_id: stored})
    assert loop.missing_item_versions(inputs) == []  # both are the catalog's current versions
    loop.plan(shown, [view], {"u1": UserState()}, inputs, now_ms=0)
    opened = OpenDecision.from_json(shown.join_set[0][decision_id])
    assert opened.decision.actions == [
        {"id": "i0", "features": {"category": "a"}},
        {"id": "i1", "features": {"category": "b"}},
    ]

    loop = loop_with(catalog_of(("i0", {"category": "a"}), ("i1", {"category": "new"})))
    inputs = Inputs(decisions={decision_id: stored}, joins={0: []})
    [ref] = loop.missing_item_versions(inputs)
    assert ref == ("i1", stored["versions"][1])
    inputs.item_versions = {ref: orjson.dumps({"category": "b"})}
    resolved = BatchPlan()
    loop.plan(resolved, [view], {"u1": UserState()}, inputs, now_ms=0)
    opened = OpenDecision.from_json(resolved.join_set[0][decision_id])
    assert opened.decision.actions[1] == {"id": "i1", "features": {"category": "b"}}
    assert loop.join.record(opened).actions[1]["features"] == {"category": "b"}  # as decided

    loop = loop_with(catalog_of(("i0", {"category": "a"}), ("i1", {"category": "new"})))
    lost = BatchPlan()
    inputs = Inputs(decisions={decision_id: stored}, joins={0: []})
    loop.plan(lost, [view], {"u1": UserState()}, inputs, now_ms=0)
    assert lost.counters["decisions_unresolved"] == 1 and not lost.join_set


def test_item_versions_are_written_when_new_and_renewed_once_old() -> None:
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})))
    day = loop.settings.decision_ttl_s
    states: dict[str, UserState | None] = {"u1": UserState()}
    plan = BatchPlan()
    loop.plan(plan, [(ev("view", 1), 0)], states, Inputs(joins={0: []}), now_ms=0)
    checkpoint = Checkpoint(RecordingStore([], {}), deadletters_ignored)  # type: ignore[arg-type]
    asyncio.run(checkpoint.commit(plan))  # a committed version is marked with its write time
    assert all("written_at" in a.derived for a in plan.item_versions)

    loop = loop_with(catalog_of(("i0", {}), ("i1", {})))

    def batch(now_s: float) -> list[str]:
        plan = BatchPlan()
        loop.plan(plan, [(ev("view", int(now_s)), 0)], states, Inputs(), int(now_s * 1000))
        for action in plan.item_versions:  # committed, at the plan's time
            action.derived["written_at"] = now_s
        return [a.id for a in plan.item_versions]

    assert batch(1000.0) == ["i0", "i1"]  # new to this worker
    assert batch(1001.0) == []  # written, catalog unchanged
    loop.catalog.update({"i1": {"price": 2.0}})
    assert batch(1002.0) == ["i1"]  # a new version of i1
    assert batch(1000.0 + day / 2 + 61) == ["i0", "i1"]  # half their lifetime gone: renewed
    loop.forget_memory()  # a failed batch: its versions may not be in Redis
    loop.catalog.actions[0].derived.pop("written_at")
    assert batch(1000.0 + day / 2 + 62) == ["i0"]


def test_a_log_record_too_large_for_the_broker_is_dead_lettered_not_outboxed() -> None:
    big = {"text": "x" * 6000}
    loop = loop_with(catalog_of(("i0", big), ("i1", big)))
    loop.settings = loop.settings.model_copy(update={"max_log_record_bytes": 10_000})
    opened = OpenDecision(stored_decision("d1", "u1", "i1"), 100, 0, {}, partition=2)
    opened.decision.actions = [{"id": "i0", "features": big}, {"id": "i1", "features": big}]
    small = OpenDecision(stored_decision("d2", "u2", "i1"), 100, 0, {}, partition=2)
    loop.plan(BatchPlan(), [], {}, Inputs(joins={2: [opened, small]}), now_ms=0)
    plan = BatchPlan()
    loop.plan_tick(plan, now_ms=WINDOW + 1)
    assert [orjson.loads(r)["decision_id"] for r in plan.outbox[2]] == ["d2"]
    [(key, raw)] = plan.deadletters
    letter = orjson.loads(raw)
    assert key == b"u1" and letter["reason"] == "log_record_too_large"
    assert letter["source"]["offset"] == -1 and letter["original_size"] > 10_000
    assert "d1" in letter["detail"] and "max_log_record_bytes=10,000" in letter["detail"]
    assert plan.counters["log_records_too_large"] == 1 and plan.counters["decisions_closed"] == 2
    assert "d1" in plan.join_removed[2] and "d1" in plan.decisions_removed  # not stuck either


def test_a_forget_erases_the_user_and_their_older_events_apply_as_nothing() -> None:
    plan = BatchPlan()
    events = [
        (ev("view", 100), 0),
        (ev("forget", 200, item=""), 0),
        (ev("click", 150), 0),  # older than the forget: a late or replayed event
        (ev("view", 120, user="u2"), 1),  # forgotten earlier (tombstone at 300)
        (ev("view", 400, user="u2"), 1),  # after that forget: a new start
        (ev("click", 250), 0),
    ]
    kept = drop_forgotten(events, {"u2": 300}, plan)
    assert [(e.type, e.timestamp) for e, _ in kept] == [
        ("view", 100),
        ("forget", 200),
        ("view", 400),
        ("click", 250),
    ]
    assert plan.forgotten == {"u1": 200} and plan.counters["forgotten_events"] == 2
    catalog = catalog_of(("i1", {"category": "c"}))
    fold_users([e for e, _ in kept], {}, catalog, StateRules(), plan)
    assert plan.counters["forgets"] == 1 and "u1" in plan.replaced
    state = plan.users["u1"]
    assert state is not None and (state.views, state.clicks) == (0, 1)  # only what came after


def test_a_forgotten_users_stored_decisions_are_deleted() -> None:
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})))
    first, second = BatchPlan(), BatchPlan()
    states: dict[str, UserState | None] = {"u1": UserState()}
    loop.plan(first, [(ev("view", 1), 0)], states, Inputs(joins={0: []}), now_ms=0)
    loop.plan(second, [(ev("view", 2), 0)], states, Inputs(), now_ms=0)
    decision_ids = [*first.decisions_set, *second.decisions_set]  # the replaced one too
    plan = BatchPlan(forgotten={"u1": 5})
    loop.plan(plan, [(ev("forget", 5, item=""), 0)], {"u1": None}, Inputs(), now_ms=0)
    assert plan.decisions_removed == decision_ids and plan.nba_removed == ["u1"]
    assert not plan.decisions_set


def test_stored_decisions_per_user_stay_below_the_kept_replaced_ones_plus_the_latest() -> None:
    """Whatever the decision rate: past replaced_decisions_kept, the oldest replaced
    decision is deleted at once (not left to its TTL); other users keep theirs."""
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})), replaced_decisions_kept=2)
    stored: set[str] = set()
    made: list[str] = []
    for ts in range(1, 7):
        plan = BatchPlan()
        states: dict[str, UserState | None] = {"u1": UserState(), f"other{ts}": UserState()}
        events = [(ev("view", ts), 0), (ev("view", ts, user=f"other{ts}"), 0)]
        loop.plan(plan, events, states, Inputs(joins={0: []}), now_ms=ts)
        [mine] = [i for i, d in plan.decisions_set.items() if orjson.loads(d)["user_id"] == "u1"]
        made.append(mine)
        stored |= set(plan.decisions_set)
        stored -= set(plan.decisions_removed)
        assert plan.decisions_removed == made[:-3][-1:]  # the fourth-newest, once
        assert set(plan.decisions_superseded).isdisjoint(plan.decisions_removed)
        assert sorted(i for i in stored if i in made) == sorted(made[-3:])
    assert len(stored - set(made)) == 6  # every other user's single decision is kept


def test_with_no_replaced_decisions_kept_a_replaced_one_is_deleted_at_once() -> None:
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})), replaced_decisions_kept=0)
    first, second = BatchPlan(), BatchPlan()
    states: dict[str, UserState | None] = {"u1": UserState()}
    loop.plan(first, [(ev("view", 1), 0)], states, Inputs(joins={0: []}), now_ms=0)
    loop.plan(second, [(ev("view", 2), 0)], states, Inputs(), now_ms=0)
    assert second.decisions_removed == list(first.decisions_set)
    assert not second.decisions_superseded


def test_a_replaced_decision_is_deleted_once_its_showable_time_is_over() -> None:
    """Not left to Redis's lazy expiry: the loop deletes it when superseded_decision_ttl_s
    has passed, in a batch or a tick."""
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})))
    ttl_ms = loop.settings.superseded_decision_ttl_s * 1000
    states: dict[str, UserState | None] = {"u1": UserState()}
    first, second = BatchPlan(), BatchPlan()
    loop.plan(first, [(ev("view", 1), 0)], states, Inputs(joins={0: []}), now_ms=1_000)
    loop.plan(second, [(ev("view", 2), 0)], states, Inputs(), now_ms=2_000)
    [replaced] = first.decisions_set
    assert second.decisions_superseded == [replaced] and replaced not in second.decisions_removed
    early, due = BatchPlan(), BatchPlan()
    loop.plan_tick(early, now_ms=2_000 + ttl_ms - 1)
    assert replaced not in early.decisions_removed
    loop.plan_tick(due, now_ms=2_000 + ttl_ms)
    assert due.decisions_removed == [replaced]


def test_loop_drops_a_withdrawn_users_open_decisions_unlogged() -> None:
    loop = loop_with(catalog_of(("i1", {})))
    opened = OpenDecision(stored_decision("d1", "u1", "i1"), 100, 0, {}, partition=2)
    loop.plan(BatchPlan(), [], {}, Inputs(joins={2: [opened]}), now_ms=0)
    assert set(loop.join.open) == {"d1"}
    plan = BatchPlan()
    loop.plan(plan, [(ev("click", 150, consent=False), 2)], {"u1": None}, Inputs(), now_ms=0)
    assert plan.join_dropped == ["d1"] and plan.decisions_removed == ["d1"]
    assert plan.owned_partitions == [2] and not plan.outbox and not plan.join_set


def test_loop_without_items_decides_nothing_but_still_erases() -> None:
    loop = loop_with(Catalog())
    plan = BatchPlan()
    states: dict[str, UserState | None] = {"u1": UserState(), "u2": None}
    loop.plan(plan, [(ev("view", 1), 0)], states, Inputs(joins={0: []}), now_ms=0)
    assert not plan.decisions_set and plan.default_nba is None and plan.nba_removed == ["u2"]


def test_disown_forgets_the_partitions_open_decisions() -> None:
    loop = loop_with(catalog_of(("i1", {})))
    a = OpenDecision(stored_decision("d1", "u1", "i1"), 100, 0, {}, partition=0)
    b = OpenDecision(stored_decision("d2", "u2", "i1"), 100, 0, {}, partition=1)
    loop.plan(BatchPlan(), [], {}, Inputs(joins={0: [a], 1: [b]}), now_ms=0)
    loop.disown([1])
    assert set(loop.join.open) == {"d1"} and loop.partitions == {0}
    loop.forget_memory()
    assert not loop.join.open and not loop.partitions


# --------------------------------------------------------------- checkpoint


async def deadletters_ignored(records: list[tuple[bytes | None, bytes]]) -> None:
    pass


class RecordingStore:
    """Stands in for RedisStore's write side, recording the order of the calls."""

    def __init__(self, calls: list[str], outbox: dict[int, list[bytes]]) -> None:
        self.calls = calls
        self.outbox = outbox

    async def commit(self, plan: BatchPlan) -> None:
        self.calls.append("redis")
        for partition, records in plan.outbox.items():
            self.outbox.setdefault(partition, []).extend(records)

    async def outboxes(self, partitions: Iterable[int]) -> dict[int, list[bytes]]:
        return {p: list(self.outbox.get(p, [])) for p in sorted(partitions)}

    async def trim_outbox(self, partition: int, sent: int) -> None:
        self.calls.append(f"trim {partition}:{sent}")
        del self.outbox[partition][:sent]


def record(decision_id: str, user: str = "u1") -> bytes:
    return orjson.dumps({"decision_id": decision_id, "user_id": user})


def test_checkpoint_commits_dead_letters_then_redis_then_the_log_then_trims() -> None:
    calls: list[str] = []
    store = RecordingStore(calls, {})
    sent: list[tuple[int, bytes, bytes]] = []

    async def deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
        calls.append(f"deadletters {len(records)}")

    async def send_log(records: list[tuple[int, bytes, bytes]]) -> None:
        calls.append(f"log {len(records)}")
        sent.extend(records)

    async def tail(partition: int, n: int) -> set[str]:
        return set()

    checkpoint = Checkpoint(store, deadletters, send_log, tail)  # type: ignore[arg-type]
    plan = BatchPlan(deadletters=[(b"k", b"{}")], outbox={1: [record("d1"), record("d2", "u2")]})

    async def run() -> None:
        await checkpoint.commit(plan)
        await checkpoint.publish({0, 1})
        await checkpoint.commit(BatchPlan())  # nothing to write: no transaction

    asyncio.run(run())
    assert calls == ["deadletters 1", "redis", "log 2", "trim 1:2"]
    assert [(p, k) for p, k, _ in sent] == [(1, b"u1"), (1, b"u2")]


def test_checkpoint_skips_what_a_crash_left_on_the_log_on_the_first_publish_only() -> None:
    calls: list[str] = []
    store = RecordingStore(calls, {0: [record("d1"), record("d2"), record("d3")]})
    sent: list[bytes] = []
    tails: list[int] = []

    async def send_log(records: list[tuple[int, bytes, bytes]]) -> None:
        sent.extend(orjson.loads(v)["decision_id"] for _, _, v in records)

    async def tail(partition: int, n: int) -> set[str]:
        tails.append(n)
        return {"d1", "d2"}  # sent before the crash, not yet trimmed

    async def deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
        raise AssertionError("no dead letters here")

    checkpoint = Checkpoint(store, deadletters, send_log, tail)  # type: ignore[arg-type]

    async def run() -> None:
        await checkpoint.publish([0])
        store.outbox[0].append(record("d1"))  # the same id again later is a new record
        await checkpoint.publish([0])

    asyncio.run(run())
    assert sent == ["d3", "d1"] and tails == [3]  # the log's tail is read once per partition
    assert calls == ["trim 0:3", "trim 0:1"] and store.outbox[0] == []


# ------------------------------------------------------- errors split by kind


class FakeStore:
    """Reads nothing, records each committed plan (the Redis side of the checkpoint)."""

    def __init__(self) -> None:
        self.plans: list[BatchPlan] = []
        self.stored_positions: dict[int, int] = {}

    async def positions(self, partitions: Any) -> dict[int, int]:
        return {p: self.stored_positions[p] for p in partitions if p in self.stored_positions}

    async def read(self, reads: Reads) -> Inputs:
        return Inputs(
            joins={p: [] for p in reads.join_partitions},
            positions={p: o for p, o in self.stored_positions.items() if p in reads.positions},
        )

    async def commit(self, plan: BatchPlan) -> None:
        self.plans.append(plan)
        self.stored_positions.update(plan.positions)


class PoisonedPolicy(PopularityPolicy):
    """Fails on one user, as a bug triggered by one input would."""

    def pmf(self, shared: Any, actions: Any) -> Any:
        if shared["user"]["user_id"] == "poison":
            raise TypeError("unhashable type: 'dict'")
        return super().pmf(shared, actions)


def _pipeline_with_poison() -> tuple[Any, FakeStore, list[tuple[bytes | None, bytes]]]:
    from loopwise.streams.pipeline import Pipeline

    store = FakeStore()
    dead: list[tuple[bytes | None, bytes]] = []

    async def deadletters(records: list[tuple[bytes | None, bytes]]) -> None:
        dead.extend(records)

    loop = loop_with(catalog_of(("i1", {})))
    loop.maker.policies = {"popularity": PoisonedPolicy()}
    settings = load_settings(attribution_window_ms=WINDOW)
    pipeline = Pipeline(
        settings,
        store,
        Checkpoint(store, deadletters),
        loop.catalog,
        loop,  # type: ignore[arg-type]
    )
    return pipeline, store, dead


def _message(offset: int, user: str) -> Any:
    from loopwise.streams.pipeline import Message

    body = {
        "event_id": f"e{offset}",
        "type": "view",
        "user_id": user,
        "item_id": "i1",
        "timestamp": 1000 + offset,
    }
    return Message(user.encode(), orjson.dumps(body), "events", 0, offset)


async def _no_retry(work: Any, what: str) -> Any:
    return await work()


def test_a_message_that_fails_processing_is_isolated_and_deadlettered_alone() -> None:
    pipeline, store, dead = _pipeline_with_poison()
    users = [f"u{i}" for i in range(13)]
    users[9] = "poison"
    messages = [_message(i, u) for i, u in enumerate(users)]
    report = asyncio.run(pipeline.process_isolating(messages, _no_retry))

    assert len(dead) == 1
    record = orjson.loads(dead[0][1])
    assert record["reason"] == "processing_error" and "TypeError" in record["detail"]
    assert record["source"]["offset"] == 9 and dead[0][0] == b"poison"
    assert report.counters["consumed"] == 13 == report.counters["accepted"] + 1
    assert report.counters["deadletter:processing_error"] == 1
    committed = [u for plan in store.plans for u in plan.users]
    assert sorted(committed) == sorted(u for u in users if u != "poison")  # each good one once


def test_transient_failures_are_retried_not_isolated() -> None:
    import redis.exceptions

    pipeline, store, dead = _pipeline_with_poison()
    failures = [redis.exceptions.ConnectionError("Redis went away")] * 2
    attempts: list[int] = []

    async def flaky_read(reads: Reads) -> Inputs:
        attempts.append(1)
        if failures:
            raise failures.pop()
        return Inputs(joins={p: [] for p in reads.join_partitions})

    store.read = flaky_read  # type: ignore[method-assign]

    async def retry(work: Any, what: str) -> Any:
        from loopwise.streams.errors import is_transient

        while True:
            try:
                return await work()
            except Exception as exc:
                if not is_transient(exc):
                    raise

    report = asyncio.run(pipeline.process_isolating([_message(0, "u1")], retry))
    assert len(attempts) == 3 and not dead and report.counters["accepted"] == 1


def test_a_publication_that_fails_after_the_broker_acked_is_not_sent_twice() -> None:
    """The log acknowledged the records, then the outbox's trim failed (Redis went away):
    the retry must find them at the log's tail instead of sending them again."""
    import redis.exceptions

    from loopwise.streams.errors import retry

    class FailingTrim(RecordingStore):
        async def trim_outbox(self, partition: int, sent: int) -> None:
            if not self.calls:
                self.calls.append("trim failed")
                raise redis.exceptions.ConnectionError("Redis went away after the log acked")
            await super().trim_outbox(partition, sent)

    store = FailingTrim([], {0: [record("d1"), record("d2")]})
    log: list[bytes] = []

    async def send_log(records: list[tuple[int, bytes, bytes]]) -> None:
        log.extend(value for _, _, value in records)

    async def tail(partition: int, n: int) -> set[str]:
        return {orjson.loads(v)["decision_id"] for v in log[-n:]}

    checkpoint = Checkpoint(store, deadletters_ignored, send_log, tail)  # type: ignore[arg-type]
    for _ in range(2):  # a second, healthy publication afterwards sends nothing either
        asyncio.run(retry(lambda: checkpoint.publish([0]), "publishing the outbox"))
    assert [orjson.loads(v)["decision_id"] for v in log] == ["d1", "d2"]
    assert store.outbox[0] == []


def test_after_redis_went_back_decisions_already_logged_are_not_logged_again() -> None:
    """Redis lost its last second: d2 closed (and was logged) in that second, so Redis still
    holds it open and the join closes it again. After ``rewound``, its second record is
    dropped; the others go to the log."""
    log: list[bytes] = [record("d0"), record("d2")]  # what the log holds already
    store = RecordingStore([], {0: [record("d1"), record("d2"), record("d3")], 1: [record("d0")]})

    async def send_log(records: list[tuple[int, bytes, bytes]]) -> None:
        log.extend(value for _, _, value in records)

    async def tail(partition: int, n: int) -> set[str]:
        return set()  # the outbox's first records are new: the prefix check finds nothing

    asked: list[tuple[int, int]] = []

    async def since(partition: int, since_ms: int) -> set[str]:
        asked.append((partition, since_ms))
        return {orjson.loads(v)["decision_id"] for v in log}

    checkpoint = Checkpoint(store, deadletters_ignored, send_log, tail, since)  # type: ignore[arg-type]
    assert asyncio.run(checkpoint.rewound([0, 1])) == 2
    assert [p for p, _ in asked] == [0, 1]
    assert abs(asked[0][1] - (time.time() * 1000 - 300_000)) < 5_000
    assert asyncio.run(checkpoint.publish([0, 1])) == 2
    assert [orjson.loads(v)["decision_id"] for v in log] == ["d0", "d2", "d1", "d3"]
    assert store.outbox == {0: [], 1: []}  # the duplicates left the outbox too


# ------------------------------------------------------------ staleness budget


def test_a_user_decided_within_the_interval_waits_then_gets_one_decision_of_the_latest_state() -> (
    None
):
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})), decision_interval_ms=1000)
    first, second, third = BatchPlan(), BatchPlan(), BatchPlan()
    loop.plan(first, [(ev("view", 1), 2)], {"u1": UserState(views=1)}, Inputs(joins={2: []}), 0)
    assert list(first.nba_set) == ["u1"] and first.counters["decisions_made"] == 1
    loop.plan(second, [(ev("view", 2), 2)], {"u1": UserState(views=2)}, Inputs(), 500)
    click = ev("click", 3, context={"page": "cart"})
    loop.plan(third, [(click, 2)], {"u1": UserState(views=2, clicks=1)}, Inputs(), 900)
    for plan in (second, third):  # deferred: no decision, no nba; the default still refreshed
        assert not plan.nba_set and not plan.decisions_set and plan.default_nba is not None
        assert plan.counters["decisions_deferred"] == 1 and not plan.counters["decisions_made"]
    early, due, after = BatchPlan(), BatchPlan(), BatchPlan()
    loop.plan_tick(early, now_ms=999)
    assert not early.nba_set
    loop.plan_tick(due, now_ms=1000)
    [stored] = due.decisions_set.values()
    decision = orjson.loads(stored)
    assert decision["user_features"] == {"user_id": "u1", "views": 2, "clicks": 1, "purchases": 0}
    assert decision["context"] == {"page": "cart"} and decision["computed_at"] == 1000
    assert orjson.loads(due.nba_set["u1"])["last_event_id"] == click.event_id
    assert due.decisions_superseded == list(first.decisions_set)
    assert due.counters["decisions_made"] == 1 and not loop.waiting
    loop.plan_tick(after, now_ms=5000)
    assert not after.nba_set  # decided once, not again


def test_a_batch_decides_the_waiting_users_whose_interval_is_over_and_not_the_others() -> None:
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})), decision_interval_ms=1000)
    setup = BatchPlan()
    both: dict[str, UserState | None] = {"u1": UserState(), "u2": UserState()}
    events = [(ev("view", 1), 0), (ev("view", 1, user="u2"), 0)]
    loop.plan(setup, events, both, Inputs(joins={0: []}), now_ms=0)
    loop.plan(BatchPlan(), [(ev("view", 2), 0)], {"u1": UserState(views=2)}, Inputs(), 100)
    later = BatchPlan()  # u2's event at 1,050 decides u2; u1's wait ended at 1,000
    loop.plan(later, [(ev("view", 3, user="u2"), 0)], {"u2": UserState()}, Inputs(), 1050)
    assert sorted(later.nba_set) == ["u1", "u2"] and later.counters["decisions_made"] == 2
    assert not loop.waiting


def test_a_waiting_user_who_withdraws_consent_or_moves_away_is_not_decided() -> None:
    loop = loop_with(catalog_of(("i0", {}), ("i1", {})), decision_interval_ms=1000)
    states: dict[str, UserState | None] = {"u1": UserState(), "u2": UserState()}
    events = [(ev("view", 1), 0), (ev("view", 1, user="u2"), 1)]
    loop.plan(BatchPlan(), events, states, Inputs(joins={0: [], 1: []}), now_ms=0)
    loop.plan(BatchPlan(), events, states, Inputs(), now_ms=10)
    assert sorted(loop.waiting) == ["u1", "u2"]
    withdrawn = BatchPlan()
    loop.plan(withdrawn, [(ev("view", 2, consent=False), 0)], {"u1": None}, Inputs(), 20)
    loop.disown([1])  # u2's partition went to another worker: it decides for u2
    assert not loop.waiting
    tick = BatchPlan()
    loop.plan_tick(tick, now_ms=5000)
    assert not tick.nba_set and not tick.decisions_set
