"""The reward join, rule by rule: open, attribute, close by watermark or wall clock, log once."""

from __future__ import annotations

from typing import Any

from loopwise.streams.decoding import Event
from loopwise.streams.reward_join import Decision, JoinChanges, OpenDecision, RewardJoin, RewardRule

WINDOW = 1000


def decision(decision_id: str = "d1", user: str = "u1", item: str = "i2") -> Decision:
    return Decision(
        decision_id=decision_id,
        user_id=user,
        arm="vw",
        policy_version="vw/vw/3",
        computed_at=0,
        context={"device": "mobile"},
        user_features={"user_id": user},
        actions=[{"id": "i1", "features": {}}, {"id": item, "features": {"category": "c"}}],
        pmf=[0.25, 0.75],
        chosen=1,
    )


def ev(kind: str, ts: int, item: str = "i2", user: str = "u1", **raw: Any) -> tuple[Event, int]:
    body = {"type": kind, "user_id": user, "item_id": item, "timestamp": ts, **raw}
    return Event(f"{kind}{ts}{user}{item}", kind, user, item, ts, body), 0


def run(
    join: RewardJoin, events: list[tuple[Event, int]], known: dict[str, Decision], now: int = 0
):
    changes = JoinChanges()
    join.apply(events, known, changes, now)
    join.close_due(now, changes)
    return changes


def test_view_opens_click_rewards_watermark_closes() -> None:
    join = RewardJoin(WINDOW, RewardRule())
    d = decision()
    c = run(join, [ev("view", 100, decision_id="d1", propensity=0.75)], {"d1": d})
    assert c.opened == ["d1"] and not c.closed
    c = run(join, [ev("click", 300, decision_id="d1")], {})
    assert c.counts == {"joined_rewards": 1}
    c = run(join, [ev("view", 1101, item="i9")], {})  # watermark passes 100 + 1000
    assert [o.decision.decision_id for o in c.closed] == ["d1"]
    record = join.record(c.closed[0])
    assert record.reward == 1.0
    assert record.propensity == record.pmf[record.chosen] == 0.75
    assert record.context == {"device": "mobile"}  # the view had none: the decision's
    assert not join.open


def test_reward_without_decision_id_goes_to_latest_view_of_that_item() -> None:
    join = RewardJoin(WINDOW, RewardRule(click=1, purchase=2, revenue=0.5))
    run(join, [ev("view", 100, decision_id="d1", propensity=0.75)], {"d1": decision()})
    c = run(join, [ev("purchase", 200, price=4.0, quantity=2), ev("click", 150, item="other")], {})
    assert c.counts == {"joined_rewards": 1, "unattributed_rewards": 1}
    (closed,) = run(join, [], {}, now=100 + WINDOW + 1).closed  # wall clock closes it
    assert join.record(closed).reward == 2 + 0.5 * 8.0
    assert join.record(closed).reward_components == {"clicks": 0, "purchases": 1, "revenue": 8.0}


def test_repeated_view_late_reward_unknown_and_mismatched_views() -> None:
    join = RewardJoin(WINDOW, RewardRule(default=-0.1))
    known = {"d1": decision(), "d2": decision("d2", item="i7")}
    c = run(
        join,
        [
            ev("view", 100, decision_id="d1", propensity=0.75),
            ev("view", 120, decision_id="d1", propensity=0.75),  # same impression again
            ev("view", 130, decision_id="nope", propensity=0.5),
            ev("view", 140, decision_id="d2", propensity=0.5),  # shows i2, d2 chose i7
            ev("click", 100 + WINDOW + 5, decision_id="d1"),  # outside the window
        ],
        known,
    )
    assert c.counts == {
        "repeated_views": 1,
        "unknown_decisions": 1,
        "mismatched_views": 1,
        "late_rewards": 1,
    }
    assert [join.record(o).reward for o in c.closed] == [-0.1]  # default reward


def test_withdrawn_consent_drops_open_decisions_unlogged() -> None:
    join = RewardJoin(WINDOW, RewardRule())
    run(join, [ev("view", 100, decision_id="d1", propensity=0.75)], {"d1": decision()})
    c = run(join, [ev("click", 150, consent=False)], {})
    assert c.dropped == ["d1"] and not c.closed and not join.open


def test_open_decisions_survive_a_round_trip_through_json() -> None:
    join = RewardJoin(WINDOW, RewardRule())
    run(join, [ev("view", 100, decision_id="d1", propensity=0.75)], {"d1": decision()})
    run(join, [ev("click", 200)], {})
    saved = [o.to_json() for o in join.open.values()]
    restored = RewardJoin(WINDOW, RewardRule())
    restored.load(OpenDecision.from_json(raw) for raw in saved)
    c = run(restored, [ev("click", 300)], {})  # still attributed by item after the restart
    assert c.counts == {"joined_rewards": 1}
    (closed,) = run(restored, [ev("view", 5000, item="x")], {}).closed
    assert closed.clicks == 2 and restored.record(closed).reward == 1.0


def test_a_stored_decision_names_its_candidates_by_item_version() -> None:
    """decision:{id} holds (item id, version) pairs, not features; resolving them gives the
    decision back; an unknown version makes it unknown; the old form still reads."""
    from dataclasses import asdict

    import orjson

    from loopwise.learners.policy import item_version

    d = decision()
    stored = orjson.loads(d.to_json())
    assert stored["actions"] == [a["id"] for a in d.actions]
    assert stored["versions"] == [item_version(a["features"]) for a in d.actions]
    assert Decision.references(stored) == list(
        zip(stored["actions"], stored["versions"], strict=True)
    )
    by_ref = {(a["id"], item_version(a["features"])): a for a in d.actions}
    again = Decision.from_stored(stored, lambda i, v: by_ref.get((i, v)))
    assert again is not None and again.actions == d.actions and again.pmf == d.pmf
    assert Decision.from_stored(stored, lambda i, v: None) is None
    old_form = asdict(d)  # stored before decisions held references: features inline
    assert (
        Decision.references(old_form) == []
        and Decision.from_stored(old_form, lambda i, v: None) == d
    )


def test_json_of_open_decisions_is_the_dataclass_fields_in_order() -> None:
    """to_json (orjson's native dataclass support) writes exactly what asdict() holds."""
    from dataclasses import asdict

    import orjson

    d = decision()
    opened = OpenDecision(d, shown_at=5, opened_wall_ms=6, context={"device": "web"}, clicks=2)
    assert opened.to_json() == orjson.dumps(asdict(opened))
    assert OpenDecision.from_json(opened.to_json()) == opened


def test_a_partition_running_ahead_closes_nothing_on_the_others() -> None:
    join = RewardJoin(WINDOW, RewardRule())
    view, _ = ev("view", 100, decision_id="d1", propensity=0.75)
    run(join, [(view, 0)], {"d1": decision()})
    # Another user's events on partition 1, far ahead (catch-up, or a producer's clock).
    far, _ = ev("click", 10**9, user="u2", item="i7")
    c = run(join, [(far, 1)], {})
    assert not c.closed and set(join.open) == {"d1"}
    click, _ = ev("click", 150)
    c = run(join, [(click, 0)], {})
    assert c.counts.get("joined_rewards") == 1  # still open: its click joins it
    c = run(join, [(ev("view", 100 + WINDOW + 1, item="i9")[0], 0)], {})  # its own partition
    assert [o.decision.decision_id for o in c.closed] == ["d1"]
    assert join.record(c.closed[0]).reward == 1.0


def test_a_forget_does_not_move_the_watermark() -> None:
    """A forget is dated when it was asked for: during a catch-up it must not close the
    partition's open decisions early."""
    join = RewardJoin(WINDOW, RewardRule())
    run(join, [ev("view", 100, decision_id="d1", propensity=0.75)], {"d1": decision()})
    forget = Event("f1", "forget", "u9", "", 10_000_000, {"type": "forget"}), 0
    changes = run(join, [forget], {})
    assert not changes.closed and set(join.open) == {"d1"}


def test_closing_takes_exactly_what_a_scan_of_every_open_decision_would_in_its_order() -> None:
    """The join keeps due times in heaps; the decisions it closes, and their order, are the
    ones a scan of all open decisions finds (sorted by view time, then opening order)."""
    import random

    rng = random.Random(5)
    join = RewardJoin(WINDOW, RewardRule(1.0, 0.0, 0.0, 0.0))
    reference: dict[str, OpenDecision] = {}
    order: list[str] = []
    for step in range(300):
        batch = []
        for k in range(rng.randrange(0, 6)):
            d = decision(f"d{step}-{k}", user=f"u{rng.randrange(50)}")
            batch.append(
                OpenDecision(
                    d,
                    shown_at=rng.randrange(step * 10, step * 10 + 400),
                    opened_wall_ms=step * 20 + rng.randrange(30),
                    context={},
                    partition=rng.randrange(3),
                )
            )
        join.load(batch)
        for o in sorted(batch, key=lambda o: o.shown_at):
            reference[o.decision.decision_id] = o
            order.append(o.decision.decision_id)
        if rng.random() < 0.1 and reference:  # consent withdrawn: dropped, never closed
            gone = rng.choice(list(reference))
            join.drop([gone])
            del reference[gone]
        for p in range(3):
            join.watermarks[p] = max(join.watermarks.get(p, 0), step * 10 + rng.randrange(200))
        now = step * 20
        expected = [
            o
            for i in order
            if (o := reference.get(i)) is not None
            and (
                join.watermarks.get(o.partition, 0) > o.shown_at + WINDOW
                or now > o.opened_wall_ms + WINDOW
            )
        ]
        expected.sort(key=lambda o: o.shown_at)
        changes = JoinChanges()
        join.close_due(now, changes)
        assert [o.decision.decision_id for o in changes.closed] == [
            o.decision.decision_id for o in expected
        ], step
        for o in expected:
            del reference[o.decision.decision_id]
    assert set(join.open) == set(reference)
