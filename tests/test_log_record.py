"""The propensity-log record: the bytes it writes, each rule's reason, the features a policy sees,
and the learner and the replay accepting exactly the same records (pure unit tests)."""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopwise.config import load_settings
from loopwise.learners.features import vw_adf_lines
from loopwise.learners.log_record import (
    FIELDS,
    REASONS,
    LogRecord,
    LogRecordError,
    check_record,
)
from loopwise.learners.policy import Action, BasePolicy, Example
from loopwise.replay import _chunks, _Problems, _validate
from loopwise.streams.learner import Learner
from loopwise.streams.reward_join import Decision, OpenDecision, RewardJoin, RewardRule


def _open_decision() -> OpenDecision:
    decision = Decision(
        decision_id="5f0c9a7e2b1d4c3e8a6f0b9d7c2e1a43",
        user_id="u-42",
        arm="vw",
        policy_version="vw/vw/18211",
        computed_at=1_767_225_599_000,
        context={"device": "desktop"},
        user_features={"user_id": "u-42", "views": 12, "clicks": 3, "aff:shoes": 0.8125},
        actions=[
            {"id": "item-3", "features": {"category": "bags", "price": 49.0}},
            {"id": "item-7", "features": {"category": "shoes", "price": 19.99}},
            {"id": "item-9", "features": {"category": "shoes", "price": 89.5}},
        ],
        pmf=[0.0206, 0.9588, 0.0206],
        chosen=1,
    )
    return OpenDecision(
        decision, 1_767_225_600_000, 1_767_225_600_123, {"device": "mobile", "hour": 20},
        clicks=1, purchases=1, revenue=19.990000001,
    )  # fmt: skip


def _old_record(join: RewardJoin, open_decision: OpenDecision) -> dict[str, Any]:
    """The dict RewardJoin.record built before LogRecord existed (the bytes on existing logs)."""
    d = open_decision.decision
    reward = join.rule(open_decision.clicks, open_decision.purchases, open_decision.revenue)
    return {
        "decision_id": d.decision_id,
        "timestamp": open_decision.shown_at,
        "user_id": d.user_id,
        "arm": d.arm,
        "policy_version": d.policy_version,
        "context": open_decision.context,
        "user_features": d.user_features,
        "actions": d.actions,
        "chosen": d.chosen,
        "propensity": d.pmf[d.chosen],
        "pmf": d.pmf,
        "reward": reward,
        "reward_components": {
            "clicks": open_decision.clicks,
            "purchases": open_decision.purchases,
            "revenue": round(open_decision.revenue, 6),
        },
    }


def test_the_writer_writes_the_same_bytes_as_the_old_dict_and_reads_them_back() -> None:
    join = RewardJoin(1000, RewardRule(click=1.0, purchase=2.0, revenue=0.01))
    open_decision = _open_decision()
    record = join.record(open_decision)
    old = orjson.dumps(_old_record(join, open_decision))
    assert record.to_json() == old
    assert tuple(orjson.loads(old)) == FIELDS
    back = LogRecord.from_json(old)
    assert back == record and back.to_json() == old
    assert LogRecord.from_dict(orjson.loads(old)).to_json() == old


def test_values_are_kept_as_read_and_unknown_fields_are_not() -> None:
    raw = b'{"actions":[{"id":"a"}],"chosen":0,"propensity":1,"reward":2,"future":true}'
    record = LogRecord.from_json(raw)
    assert record.propensity == 1 and type(record.propensity) is int
    assert record.context == {} and record.pmf is None and record.decision_id is None
    assert b'"future"' not in record.to_json()
    assert orjson.loads(record.to_json())["context"] == {}


GOOD: dict[str, Any] = orjson.loads(
    orjson.dumps(_old_record(RewardJoin(1000, RewardRule()), _open_decision()))
)

# One broken record per reason of check_record, in the order the rules apply.
BROKEN: list[tuple[str, dict[str, Any], str]] = [
    ("invalid_actions", {"actions": []}, "non-empty list"),
    ("invalid_actions", {"actions": "item-3"}, "non-empty list"),
    ("invalid_actions", {"actions": [{"id": "a"}, {"features": {}}]}, 'with an "id"'),
    ("invalid_context", {"context": None}, "context must be an object"),
    ("invalid_context", {"context": ["mobile"]}, "context must be an object"),
    ("missing_chosen", {"chosen": None}, "no chosen"),
    ("chosen_out_of_range", {"chosen": 3}, "chosen=3 with 3 actions"),
    ("chosen_out_of_range", {"chosen": True}, "chosen=True"),
    ("chosen_out_of_range", {"chosen": 1.0}, "chosen=1.0"),
    ("missing_propensity", {"propensity": None}, "no propensity"),
    ("invalid_propensity", {"propensity": 0.0}, "propensity=0.0 is not in (0, 1]"),
    ("invalid_propensity", {"propensity": 1.5}, "propensity=1.5"),
    ("invalid_propensity", {"propensity": "0.9588"}, "propensity='0.9588'"),
    ("invalid_propensity", {"propensity": float("nan")}, "propensity=nan"),
    ("invalid_pmf", {"pmf": [0.5, 0.5]}, "one probability per action"),
    ("invalid_pmf", {"pmf": [0.5, 0.6, -0.1]}, "one probability per action"),
    ("invalid_pmf", {"pmf": [0.0206, 0.9588, 0.03]}, "summing to 1"),
    ("propensity_pmf_mismatch", {"propensity": 0.9}, "propensity=0.9 but pmf[1]=0.9588"),
    ("missing_reward", {"reward": None}, "no reward"),
    ("invalid_reward", {"reward": float("inf")}, "reward=inf"),
    ("invalid_reward", {"reward": False}, "reward=False"),
]


@pytest.mark.parametrize(("reason", "change", "detail"), BROKEN)
def test_each_rule_refuses_with_its_reason(
    reason: str, change: dict[str, Any], detail: str
) -> None:
    record = {**GOOD, **change}
    bad = check_record(record)
    assert bad is not None and bad[0] == reason
    with pytest.raises(LogRecordError) as info:
        LogRecord.from_dict(record)
    assert info.value.reason == reason and detail in info.value.detail
    assert isinstance(info.value, ValueError) and str(info.value).startswith(f"{reason}: ")
    if all(math.isfinite(v) for v in change.values() if isinstance(v, float)):  # JSON has no NaN
        with pytest.raises(LogRecordError, match=f"^{reason}: "):
            LogRecord.from_json(orjson.dumps(record))


def test_every_reason_is_tested_and_bytes_have_their_own() -> None:
    for raw, reason in (
        (b"{not json", "invalid_json"),
        (b'{"propensity": NaN}', "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b"null", "not_an_object"),
        (None, "tombstone"),
    ):
        with pytest.raises(LogRecordError) as info:
            LogRecord.from_json(raw)
        assert info.value.reason == reason
    assert {reason for reason, _, _ in BROKEN} | {"invalid_json", "not_an_object", "tombstone"} == (
        set(REASONS)
    )
    # Absent is fine where the rules say so: context, user_features, pmf, the metadata.
    minimal = {k: GOOD[k] for k in ("actions", "chosen", "propensity", "reward")}
    assert check_record(minimal) is None
    assert check_record({**GOOD, "user_features": None, "pmf": None}) is None
    assert (
        check_record({**GOOD, "actions": [{"id": 1}, {"id": 2, "features": None}, {"id": 3}]})
        is None
    )


def test_shared_is_one_rule_for_a_missing_or_empty_user_features() -> None:
    record = LogRecord.from_dict(GOOD)
    assert record.shared() == {"user": GOOD["user_features"], "context": GOOD["context"]}
    for user_features in (None, {}):
        record.user_features = user_features
        assert record.shared() == {"user": {"user_id": "u-42"}, "context": GOOD["context"]}
    record.user_id = None
    assert record.shared()["user"] == {}
    without = LogRecord.from_dict({k: v for k, v in GOOD.items() if k != "user_features"})
    assert without.shared()["user"] == {"user_id": "u-42"}  # a user with no state
    # Not an object (the worker never writes one): valid, and counts as missing.
    odd = LogRecord.from_dict({**GOOD, "user_features": ["u-42"]})
    assert odd.shared()["user"] == {"user_id": "u-42"}


def test_action_list() -> None:
    listed = [
        {"id": 7},
        {"id": "b", "features": None},
        {"id": "c", "features": {"x": 1}},
        {"id": "d", "features": ["x"]},  # not an object: counts as none
    ]
    record = LogRecord.from_dict({**GOOD, "actions": listed, "pmf": None})
    actions = record.action_list()
    assert [(a.id, dict(a.features)) for a in actions] == [
        ("7", {}),
        ("b", {}),
        ("c", {"x": 1}),
        ("d", {}),
    ]
    assert all(isinstance(a, Action) for a in actions)


# ------------------------------------------------- the learner and the replay: the same records


class _CheckingPolicy(BasePolicy):
    """A policy that checks every learn call as real ones do (:class:`BasePolicy`), and
    featurizes it as VW would."""

    name = "vw"
    _version = 0

    def pmf(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> Any:
        raise NotImplementedError

    def _learn(self, example: Example) -> None:
        shared, actions, chosen, propensity, reward = example
        vw_adf_lines(shared, actions, (chosen, -reward, propensity))

    def snapshot(self) -> bytes:
        raise NotImplementedError


_BREAKAGE: list[tuple[str, Any]] = [
    ("propensity", 0.0), ("propensity", -0.5), ("propensity", 1.0000001), ("propensity", "0.5"),
    ("propensity", True), ("propensity", None), ("propensity", 1), ("reward", "1"),
    ("reward", None), ("reward", 3), ("chosen", -1), ("chosen", 2), ("chosen", 1.0),
    ("chosen", True), ("chosen", None), ("context", None), ("context", []), ("context", ...),
    ("actions", []), ("actions", "item-0"), ("actions", [{"id": "a"}, "b"]),
    ("actions", [{"id": "a"}, {}]), ("actions", [{"id": "a", "features": ["x"]}, {"id": "b"}]),
    ("actions", [{"id": "a", "features": None}, {"id": 2}]), ("pmf", None), ("pmf", [0.5]),
    ("pmf", [0.5, "0.5"]), ("pmf", [1.5, -0.5]), ("pmf", [0.5, 0.5 + 1e-6 + 1e-15]),
    ("pmf", [1, 0]), ("pmf", [0.5 + 1e-10, 0.5]), ("user_features", None),
    ("user_features", {}), ("user_features", []), ("user_features", "u1"), ("user_features", ...),
    ("user_id", ...), ("arm", "popularity"), ("arm", 3),
]  # fmt: skip
_NOT_RECORDS = [b"{not json", b'{"reward": NaN}', b"[1, 2]", b'"a record"', b"null", b"3"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.lists(st.sampled_from(range(len(_BREAKAGE))), max_size=3),
            st.sampled_from(range(len(_NOT_RECORDS))),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_the_learner_and_the_replay_accept_and_refuse_the_same_records(
    plan: list[list[int] | int],
) -> None:
    """Every log line goes to Learner.learn and to the replay's reader and bulk validation:
    the same lines are used, and the same reasons are counted for the others."""
    lines: list[bytes] = []
    for i, step in enumerate(plan):
        if isinstance(step, int):
            lines.append(_NOT_RECORDS[step])
            continue
        record: dict[str, Any] = {
            **GOOD,
            "decision_id": f"d{i}",
            "actions": [{"id": f"item-{i}", "features": {"category": "c"}}, {"id": "item-x"}],
            "chosen": i % 2,
            "propensity": 0.5,
            "pmf": [0.5, 0.5],
            "reward": float(i % 3 == 0),
        }
        for b in step:
            key, value = _BREAKAGE[b]
            if value is ...:
                record.pop(key, None)
            else:
                record[key] = value
        lines.append(orjson.dumps(record))

    s = load_settings(arms={"vw": 1.0}, holdout_arm="popularity")
    policies: dict[str, Any] = {"vw": _CheckingPolicy(), "popularity": _CheckingPolicy()}
    learner = Learner(s, client=None, policies=policies)  # type: ignore[arg-type]
    learned = [i for i, raw in enumerate(lines) if learner.learn([(0, i, raw)]) == 1]
    assert learner.learned == len(learned) and learner.invalid == len(lines) - len(learned)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "log.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        problems = _Problems()
        used: list[int] = []
        for items in _chunks(str(path), None, problems, 7):
            kept, _ = _validate(items, problems, str(path))
            line_of = {id(record): number for number, record in items}
            used += [int(line_of[id(record)]) - 1 for record in kept]
    assert learned == used
    assert learner.invalid_reasons == Counter(problems.counts)
    assert policies["vw"].version == len(learned)
