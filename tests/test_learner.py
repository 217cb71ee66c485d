"""The learner's rules (streams/learner.py), without Kafka or Redis.

Records are fed as the propensity log holds them: (partition, offset, JSON bytes) in the
shape of ``RewardJoin.record``. Policies are fakes that record their ``learn`` calls, except
where a snapshot must restore (``restore`` only rebuilds registered policies); Redis is a
fake async client that keeps hashes as redis-py returns them (bytes keys and values).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from itertools import count
from typing import Any

import numpy as np
import orjson
import pytest

from loopwise.config import Settings, load_settings
from loopwise.learners.policy import Action, BasePolicy, Example, FloatArray
from loopwise.learners.popularity import PopularityPolicy
from loopwise.learners.vw_policy import VWPolicy
from loopwise.streams.decisions import DecisionMaker
from loopwise.streams.learner import Learner

HOLDOUT = "popularity"
ITEMS = ("a", "b", "c", "d")
_decision_ids = count()


def log_record(
    arm: str = "vw",
    chosen: int = 0,
    reward: float = 0.0,
    items: Sequence[str] = ITEMS,
    user: str = "u1",
) -> bytes:
    """One propensity-log record as the worker writes it (``RewardJoin.record``)."""
    pmf = [1.0 / len(items)] * len(items)
    return orjson.dumps(
        {
            "decision_id": f"d{next(_decision_ids)}",
            "timestamp": 1_700_000_000_000,
            "user_id": user,
            "arm": arm,
            "policy_version": f"{arm}/{arm}/0",
            "context": {"device": "mobile", "hour": 9},
            "user_features": {"user_id": user, "views": 3, "aff:c1": 1.0},
            "actions": [{"id": item, "features": {"category": "c1"}} for item in items],
            "chosen": chosen,
            "propensity": pmf[chosen],
            "pmf": pmf,
            "reward": reward,
            "reward_components": {"clicks": int(reward > 0), "purchases": 0, "revenue": 0.0},
        }
    )


class RecordingPolicy(BasePolicy):
    """A policy that records its learn calls: (user_id, item ids, chosen, propensity, reward)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, list[str], int, float, float]] = []
        self._version = 0

    def pmf(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> FloatArray:
        return np.full(len(actions), 1.0 / len(actions))

    def _learn(self, example: Example) -> None:
        shared, actions, chosen, propensity, reward = example
        ids = [action.id for action in actions]
        self.calls.append((shared["user"]["user_id"], ids, chosen, propensity, reward))

    def snapshot(self) -> bytes:
        return f"{self.name}@{self.version}".encode()


class FakeRedis:
    """The two calls the learner makes, on hashes kept as redis-py returns them."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {}

    async def hset(self, key: str, mapping: Mapping[str, Any]) -> int:
        stored = self.hashes.setdefault(key, {})
        for field, value in mapping.items():
            stored[field.encode()] = value if isinstance(value, bytes) else str(value).encode()
        return len(mapping)

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.hashes.get(key, {}))


def learner_settings(**overrides: Any) -> Settings:
    return load_settings(
        arms={"vw": 0.9, HOLDOUT: 0.1}, holdout_arm=HOLDOUT, key_prefix="t:", **overrides
    )


def recording_learner(client: Any = None, **overrides: Any) -> Learner:
    policies: dict[str, Any] = {"vw": RecordingPolicy("vw"), HOLDOUT: RecordingPolicy(HOLDOUT)}
    return Learner(learner_settings(**overrides), client, policies)


def calls(learner: Learner, arm: str) -> list[tuple[str, list[str], int, float, float]]:
    policy = learner.policies[arm]
    assert isinstance(policy, RecordingPolicy)
    return policy.calls


# ------------------------------------------------------------------ offsets


def test_offsets_advance_per_partition_to_the_next_record_to_learn() -> None:
    learner = recording_learner()
    records = [(0, 0, log_record()), (1, 0, log_record()), (0, 1, log_record())]
    assert learner.learn(records) == 3
    assert learner.learn([(1, 7, log_record())]) == 1  # a gap (compacted/aborted) is fine
    assert learner.offsets == {0: 2, 1: 8}
    assert learner.learned == 4 and learner.skipped == 0


def test_records_below_the_restored_offsets_are_skipped_and_counted() -> None:
    learner = recording_learner()
    learner.offsets = {0: 2, 1: 1}  # as restored from a snapshot
    records = [(0, 0, log_record(user="old")), (0, 1, log_record(user="old"))]
    records += [(1, 0, log_record(user="old")), (0, 2, log_record(user="new"))]
    records += [(1, 1, log_record(user="new")), (2, 0, log_record(user="new"))]
    assert learner.learn(records) == 3
    assert learner.skipped == 3 and learner.learned == 3
    assert learner.offsets == {0: 3, 1: 2, 2: 1}
    assert [call[0] for call in calls(learner, "vw")] == ["new", "new", "new"]
    # A redelivered batch (Kafka's at-least-once) is not learned twice.
    assert learner.learn(records) == 0
    assert learner.skipped == 9 and learner.versions()["vw"] == 3


# ------------------------------------------------------------------ who learns what


def test_every_policy_learns_every_record_except_the_holdout_learns_only_its_own_arm() -> None:
    learner = recording_learner()
    arms = ["vw", HOLDOUT, "vw", "linucb", HOLDOUT]
    records = [(0, i, log_record(arm=arm, user=f"u{i}")) for i, arm in enumerate(arms)]
    assert learner.learn(records) == 5
    assert [call[0] for call in calls(learner, "vw")] == ["u0", "u1", "u2", "u3", "u4"]
    assert [call[0] for call in calls(learner, HOLDOUT)] == ["u1", "u4"]


def test_a_policy_learns_the_logged_example_as_it_was_logged() -> None:
    learner = recording_learner()
    learner.learn([(0, 0, log_record(chosen=2, reward=1.5, user="u9"))])
    assert calls(learner, "vw") == [("u9", list(ITEMS), 2, 0.25, 1.5)]


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        orjson.dumps({"arm": "vw", "context": {}}),  # no actions, chosen, propensity, reward
        log_record().replace(b'"chosen":0', b'"chosen":"first"'),
        log_record().replace(b'"reward":0.0', b'"reward":null'),
    ],
    ids=["not-json", "missing-fields", "chosen-not-a-number", "reward-null"],
)
def test_an_unparseable_record_is_not_learned_and_the_learner_moves_on(value: bytes) -> None:
    learner = recording_learner()
    records = [(0, 0, log_record(user="before")), (0, 1, value), (0, 2, log_record(user="after"))]
    assert learner.learn(records) == 2
    assert [call[0] for call in calls(learner, "vw")] == ["before", "after"]
    assert learner.offsets == {0: 3}  # not read again after a restart
    assert learner.learned == 2 and learner.monitor_summary()["vw"]["n"] == 2


@pytest.mark.parametrize(
    ("field", "bad", "reason"),
    [
        (b"", b"[1, 2]", "not_an_object"),
        (b'"chosen":0', b'"chosen":9', "chosen_out_of_range"),
        (b'"propensity":0.25', b'"propensity":0.0', "invalid_propensity"),
    ],
    ids=["not-an-object", "chosen-out-of-range", "propensity-zero"],
)
def test_an_impossible_record_is_not_learned_and_the_learner_moves_on(
    field: bytes, bad: bytes, reason: str
) -> None:
    """The log record's rules (replay's) refuse it when parsing, before any policy sees it."""
    value = log_record().replace(field, bad) if field else bad
    learner = recording_learner()
    assert learner.learn([(0, 0, value), (0, 1, log_record(user="after"))]) == 1
    assert [call[0] for call in calls(learner, "vw")] == ["after"]
    assert learner.invalid == 1 and learner.invalid_reasons == {reason: 1}


# ------------------------------------------------------------------ popularity (pre-filter)


def test_popularity_counts_rewards_of_every_learned_record_for_the_prefilter() -> None:
    """The learner feeds DecisionMaker.popularity (the same object); the pre-filter ranks by
    the reward decayed by 0.999 per learned example, as the learner's dict used to."""
    items = [f"i{j}" for j in range(30)]
    maker = DecisionMaker(
        {HOLDOUT: PopularityPolicy()},
        lambda user: HOLDOUT,
        pmf_floor=0.01,
        max_candidates=8,
        default_arm=HOLDOUT,
    )
    learner = Learner(learner_settings(), None, {}, maker.popularity)  # type: ignore[arg-type]
    assert learner.popularity is maker.popularity

    rng = np.random.default_rng(3)
    reference: dict[str, float] = {}  # reward * 0.999 ** -n: the old lazily decayed dict
    records = []
    for n in range(1, 3_001):
        chosen = int(rng.integers(len(items)))
        reward = float(rng.random() < (chosen % 5) / 10)
        arm = HOLDOUT if n % 7 == 0 else "vw"  # the holdout's records count too
        records.append((0, n, log_record(arm=arm, chosen=chosen, reward=reward, items=items)))
        if reward > 0:
            reference[items[chosen]] = reference.get(items[chosen], 0.0) + reward * 0.999**-n
    records.append((0, 0, log_record(chosen=1, reward=5.0, items=items)))  # below the offset
    records.append((0, 3_001, b"not json"))
    learner.learn(records)

    top = max(reference.values())
    for item in items:
        relative = maker.popularity.score(item) / maker.popularity.max_score()
        assert relative == pytest.approx(reference.get(item, 0.0) / top, rel=1e-9, abs=1e-12)
    actions = [Action(item, {"category": f"c{j % 3}"}) for j, item in enumerate(items)]
    for user in ({"user_id": "u"}, {"user_id": "u", "aff:c1": 0.7, "aff:c2": 0.3}):

        def score(a: Action, user: dict[str, Any] = user) -> float:
            affinity = float(user.get("aff:" + str(a.features["category"]), 0.0))
            return reference.get(a.id, 0.0) / top + affinity

        expected = sorted(actions, key=score, reverse=True)[:8]
        assert maker.candidates(actions, user) == expected


def test_a_negative_reward_counts_as_no_reward_for_popularity() -> None:
    learner = recording_learner()
    learner.learn([(0, 0, log_record(chosen=0, reward=-1.0)), (0, 1, log_record(chosen=1))])
    learner.learn([(0, 2, log_record(chosen=2, reward=1.0))])
    assert learner.popularity.score("a") == 0.0 and learner.popularity.score("b") == 0.0
    assert learner.popularity.top(1)[0][0] == "c"


# ------------------------------------------------------------------ reward monitor


def test_the_reward_monitor_counts_each_arm_apart() -> None:
    learner = recording_learner()
    rewards = [("vw", 1.0), (HOLDOUT, 0.0), ("vw", 0.0), ("vw", 1.0), (HOLDOUT, 1.0), ("vw", 1.0)]
    learner.learn([(0, i, log_record(arm=arm, reward=r)) for i, (arm, r) in enumerate(rewards)])
    summary = learner.monitor_summary()
    assert list(summary) == sorted(["vw", HOLDOUT])
    assert summary["vw"]["n"] == 4 and summary["vw"]["mean"] == pytest.approx(0.75)
    assert summary[HOLDOUT]["n"] == 2 and summary[HOLDOUT]["mean"] == pytest.approx(0.5)


# ------------------------------------------------------------------ snapshots


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_a_snapshot_is_due_every_snapshot_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("loopwise.streams.learner.time.monotonic", clock)
    learner = recording_learner(FakeRedis(), snapshot_interval_s=5.0)
    assert not learner.snapshot_due()
    clock.now += 4.9
    assert not learner.snapshot_due()
    clock.now += 0.1
    assert learner.snapshot_due()
    asyncio.run(learner.snapshot())
    assert not learner.snapshot_due()  # a saved snapshot starts the interval again
    clock.now += 5.0
    assert learner.snapshot_due()


def test_a_snapshot_saves_every_policy_the_offsets_and_the_reward_monitor() -> None:
    client = FakeRedis()
    learner = recording_learner(client)
    learner.learn([(0, 0, log_record(reward=1.0)), (3, 41, log_record(arm=HOLDOUT))])
    learner.learn([(3, 42, orjson.dumps({"decision_id": "forged", "propensity": 0}))])
    asyncio.run(learner.snapshot())
    saved = client.hashes["t:model"]
    assert set(saved) == {
        b"vw",
        HOLDOUT.encode(),
        b"offsets",
        b"saved_at_ms",
        b"reward_monitor",
        b"invalid_records",
        b"prefilter_popularity",
        b"version",
    }
    assert int(saved[b"version"]) == 1 == learner.version and not learner.unsaved
    invalid = orjson.loads(saved[b"invalid_records"])
    assert sum(invalid.values()) == 1 == learner.invalid  # counted with the offsets
    restored = recording_learner(client)
    restored.load_snapshot(
        {k: v for k, v in saved.items() if k in (b"offsets", b"invalid_records")}
    )
    assert restored.invalid_reasons == learner.invalid_reasons
    assert saved[b"vw"] == b"vw@2" and saved[HOLDOUT.encode()] == HOLDOUT.encode() + b"@1"
    assert orjson.loads(saved[b"offsets"]) == {"0": 1, "3": 43}
    assert orjson.loads(saved[b"reward_monitor"]) == learner.monitor_summary()
    assert int(saved[b"saved_at_ms"]) > 1_600_000_000_000
    # the pre-filter's popularity and the version travel with the models, to every decider
    restored.load_snapshot({k: v for k, v in saved.items() if k not in (b"vw", HOLDOUT.encode())})
    assert restored.version == 1
    assert restored.popularity.to_dict() == pytest.approx(learner.popularity.to_dict())
    assert restored.popularity.total == pytest.approx(learner.popularity.total)
    learner.learn([(0, 1, log_record(reward=1.0))])
    assert learner.unsaved
    asyncio.run(learner.snapshot())
    assert int(client.hashes["t:model"][b"version"]) == 2 == learner.version


def test_a_restored_learner_continues_where_the_snapshot_left_off() -> None:
    """Round trip through snapshot() and restore(): same models, same offsets, and the log
    records the snapshot includes are skipped, the others learned: nothing learned twice."""
    client = FakeRedis()
    first = Learner(
        learner_settings(),
        client,
        {"vw": VWPolicy(), HOLDOUT: PopularityPolicy()},  # type: ignore[arg-type]
    )
    rng = np.random.default_rng(0)
    records = [
        (
            i % 2,
            i // 2,
            log_record(
                arm=HOLDOUT if i % 3 == 0 else "vw",
                chosen=int(rng.integers(len(ITEMS))),
                reward=float(rng.random() < 0.3),
                user=f"u{i % 5}",
            ),
        )
        for i in range(60)
    ]
    first.learn(records[:40])
    asyncio.run(first.snapshot())

    fresh: dict[str, Any] = {"vw": VWPolicy(), HOLDOUT: PopularityPolicy()}
    fresh["linucb"] = untouched = RecordingPolicy("linucb")  # an arm the snapshot lacks
    second = Learner(learner_settings(), client, fresh)  # type: ignore[arg-type]
    assert asyncio.run(second.restore())
    assert second.offsets == first.offsets == {0: 20, 1: 20}
    assert second.versions() == {**first.versions(), "linucb": 0}
    assert second.policies["linucb"] is untouched

    first.learn(records[40:])
    assert second.learn(records) == 20  # the whole log again, as after a crash
    assert second.skipped == 40
    assert second.offsets == first.offsets
    assert {arm: v for arm, v in second.versions().items() if arm != "linucb"} == first.versions()
    actions = [Action(item, {"category": "c1"}) for item in ITEMS]
    shared = {"user": {"user_id": "u1"}, "context": {"device": "mobile", "hour": 9}}
    for arm in ("vw", HOLDOUT):
        assert np.array_equal(
            second.policies[arm].pmf(shared, actions), first.policies[arm].pmf(shared, actions)
        )


def test_restore_without_a_snapshot_keeps_the_fresh_policies() -> None:
    learner = recording_learner(FakeRedis())
    policies = dict(learner.policies)
    assert asyncio.run(learner.restore()) is False
    assert learner.policies == policies and learner.offsets == {}


# ------------------------------------------------------------------ sampling


def test_a_learn_sample_rate_learns_the_same_share_of_records_in_every_learner() -> None:
    records = [(0, i, log_record(arm="vw", user=f"u{i}", reward=float(i % 2))) for i in range(2000)]
    first = recording_learner(learn_sample_rate=0.25)
    second = recording_learner(learn_sample_rate=0.25)
    assert first.learn(records[:700]) + first.learn(records[700:]) == second.learn(records)
    learned = [call[0] for call in calls(first, "vw")]
    assert learned == [call[0] for call in calls(second, "vw")]  # the same records
    assert 0.2 * len(records) < len(learned) < 0.3 * len(records)
    assert first.not_sampled == len(records) - len(learned)
    # Every record is consumed (offsets) and counted by the monitor and the pre-filter.
    assert first.offsets == {0: len(records)}
    assert first.monitor_summary()["vw"]["n"] == len(records)
    everything = recording_learner()
    assert everything.learn(records) == len(records)
    assert first.popularity.to_dict() == everything.popularity.to_dict()
    assert first.popularity.total == everything.popularity.total > 0


def test_sampling_ignores_the_reward() -> None:
    # A sample that depended on the reward would bias what the policies learn.
    learner = recording_learner(learn_sample_rate=0.5)
    records = [(0, i, log_record(reward=float(i % 2), user=f"u{i}")) for i in range(4000)]
    learner.learn(records)
    rewards = [call[4] for call in calls(learner, "vw")]
    assert abs(sum(rewards) / len(rewards) - 0.5) < 0.05


@pytest.mark.parametrize("rate", [0, -0.1, 1.5])
def test_a_learn_sample_rate_outside_0_1_is_refused_by_name(rate: float) -> None:
    from loopwise.config import ConfigError

    with pytest.raises(ConfigError, match="learn_sample_rate"):
        learner_settings(learn_sample_rate=rate)
