"""Off-policy evaluation: estimators by hand, the ``logged`` sanity check, interval coverage on
the simulator's ground truth, and bad inputs (pure unit tests: no Kafka, no Redis)."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopwise.learners.log_record import check_record
from loopwise.learners.ope import (
    DR,
    IPS,
    SNDR,
    SNIPS,
    BanditData,
    ClippedIPS,
    SwitchDR,
    bootstrap_intervals,
    diagnostics,
)
from loopwise.learners.policy import apply_floor
from loopwise.learners.targets import TargetError, make_target
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.replay import ReplayError, _Problems, _validate, replay

# ------------------------------------------------------------------------------ helpers


def _record(
    i: int,
    pmf: list[float],
    chosen: int,
    reward: float,
    *,
    context: dict[str, Any] | None = None,
    items: list[str] | None = None,
) -> dict[str, Any]:
    items = items or [f"item-{j}" for j in range(len(pmf))]
    return {
        "decision_id": f"d{i}",
        "timestamp": 1_790_000_000_000 + i,
        "user_id": f"u{i % 3}",
        "arm": "vw",
        "policy_version": "1",
        "context": context if context is not None else {"device": "mobile", "hour": 9},
        "actions": [
            {"id": item, "features": {"category": f"c{j % 2}"}} for j, item in enumerate(items)
        ],
        "chosen": chosen,
        "propensity": pmf[chosen],
        "pmf": pmf,
        "reward": reward,
        "reward_components": {"click": reward},
    }


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


# A small fixed log: 4 rounds, 2 or 3 actions.
SMALL = [
    _record(0, [0.5, 0.5], 0, 1.0),
    _record(1, [0.2, 0.8], 1, 0.0),
    _record(2, [0.25, 0.25, 0.5], 0, 1.0),
    _record(3, [0.1, 0.3, 0.6], 2, 2.0),
]


# ---------------------------------------------------------------------- estimators by hand


def test_ips_and_snips_match_hand_computed_values(tmp_path: Path) -> None:
    log = _write_jsonl(tmp_path / "small.jsonl", SMALL)
    # uniform target: pi(a_i|x_i) = 1/2, 1/2, 1/3, 1/3; weights = pi / p:
    #   w = 0.5/0.5 = 1, 0.5/0.8 = 0.625, (1/3)/0.25 = 4/3, (1/3)/0.6 = 5/9
    #   w r = 1, 0, 4/3, 10/9
    ips = (1.0 + 0.0 + 4.0 / 3.0 + 10.0 / 9.0) / 4.0  # = 31/36 = 0.861111...
    snips = (1.0 + 0.0 + 4.0 / 3.0 + 10.0 / 9.0) / (1.0 + 0.625 + 4.0 / 3.0 + 5.0 / 9.0)
    assert ips == pytest.approx(31.0 / 36.0, abs=1e-15)
    result = replay([str(log)], ["uniform"], estimators=["ips", "snips"], progress=False)
    uniform = result["candidates"]["uniform"]
    assert abs(uniform["ips"]["value"] - ips) <= 1e-12
    assert abs(uniform["snips"]["value"] - snips) <= 1e-12
    assert uniform["diagnostics"]["max_weight"] == pytest.approx(4.0 / 3.0, abs=1e-12)
    assert uniform["diagnostics"]["support_deficiency"] == 0.0
    assert result["n"] == 4 and result["excluded"] == {}


def test_estimator_formulas_on_columns() -> None:
    data = BanditData.from_pmfs(
        reward=[1.0, 0.0, 1.0],
        propensity=[0.5, 0.25, 0.5],
        chosen=[0, 1, 1],
        target_pmfs=[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
        logged_pmfs=[[0.5, 0.5], [0.75, 0.25], [0.5, 0.5]],
        q_hats=[[0.8, 0.1], [0.2, 0.4], [0.3, 0.6]],
    )
    w = np.array([2.0, 4.0, 1.0])
    r = np.array([1.0, 0.0, 1.0])
    dm = np.array([0.8, 0.4, 0.45])
    resid = r - np.array([0.8, 0.4, 0.6])
    assert IPS().estimate_policy_value(data) == pytest.approx((w * r).mean(), abs=1e-12)
    assert ClippedIPS(3.0).estimate_policy_value(data) == pytest.approx(
        (np.minimum(w, 3.0) * r).mean(), abs=1e-12
    )
    assert SNIPS().estimate_policy_value(data) == pytest.approx((w * r).sum() / w.sum())
    assert DR().estimate_policy_value(data) == pytest.approx((dm + w * resid).mean())
    assert SNDR().estimate_policy_value(data) == pytest.approx(
        dm.mean() + (w * resid).sum() / w.sum()
    )
    assert SwitchDR(tau=3.0).estimate_policy_value(data) == pytest.approx(
        (dm + np.where(w <= 3.0, w * resid, 0.0)).mean()
    )
    for est in (IPS(), SNIPS(), DR(), SNDR()):
        rounds = est.estimate_round_rewards(data)
        assert rounds.mean() == pytest.approx(est.estimate_policy_value(data), abs=1e-12)
        low, high = est.estimate_interval(data, n_bootstrap=200, rng=0)
        assert low <= high
    diag = diagnostics(data)
    assert diag["ess"] == pytest.approx(w.sum() ** 2 / (w**2).sum())
    assert diag["mean_weight"] == pytest.approx(w.mean())
    # round 0: the target puts mass 1 on action 0, which the logger gave 0.5: supported.
    assert diag["support_deficiency"] == 0.0
    blind = BanditData.from_pmfs(
        reward=[1.0], propensity=[1.0], chosen=[0], target_pmfs=[[0.5, 0.5]], logged_pmfs=[[1, 0]]
    )
    assert diagnostics(blind)["support_deficiency"] == 1.0


def test_logged_target_reproduces_the_on_policy_average(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(500):
        pmf = rng.dirichlet(np.ones(4)).tolist()
        chosen = int(rng.choice(4, p=np.asarray(pmf) / np.sum(pmf)))
        pmf[chosen] = pmf[chosen]  # the logged propensity is exactly pmf[chosen]
        rows.append(_record(i, pmf, chosen, float(rng.integers(0, 3))))
    log = _write_jsonl(tmp_path / "log.jsonl", rows)
    result = replay([str(log)], ["logged"], estimators=["ips", "snips"], progress=False)
    on_policy = math.fsum(r["reward"] for r in rows) / len(rows)
    logged = result["candidates"]["logged"]
    assert logged["ips"]["value"] == on_policy
    assert logged["snips"]["value"] == on_policy
    assert logged["diagnostics"]["mean_weight"] == 1.0
    assert logged["diagnostics"]["max_weight"] == 1.0


# ------------------------------------------------------------------------- coverage on the sim


N_SEEDS = 50
N_ROUNDS = 2_500


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    out: np.ndarray = e / e.sum()
    return out


def _simulated_log(seed: int, tmp: Path) -> tuple[Path, Path, float]:
    """A log from a known stochastic logger, a target pmf file, and the target's true value.

    Logger: softmax(1.5 * s_log[device]) floored at 0.02; target: softmax(2.5 * s_tgt[device]),
    fixed per seed. True value: mean over rounds of sum_a pi(a|x_i) P(click | x_i, a).
    """
    market = Marketplace(MarketConfig(n_users=100, n_items=10, seed=seed))
    rng = np.random.default_rng(10_000 + seed)
    n_dev = len(market.devices)
    s_log = rng.normal(size=(n_dev, 10))
    s_tgt = rng.normal(size=(n_dev, 10))
    items = market.items
    features = [market.item_features(item) for item in items]
    rows, pmf_rows, truth = [], [], 0.0
    for i in range(N_ROUNDS):
        user = market.sample_user(rng)
        context = market.sample_context(rng, user)
        d = market.devices.index(context["device"])
        logger = apply_floor(_softmax(1.5 * s_log[d]), 0.02)
        target = _softmax(2.5 * s_tgt[d])
        clicks = market.click_probabilities(user, context)
        truth += float(target @ clicks)
        chosen = int(rng.choice(10, p=logger))
        reward = float(rng.random() < clicks[chosen])
        rows.append(
            {
                "decision_id": f"s{seed}-{i}",
                "user_id": user,
                "context": context,
                "actions": [
                    {"id": it, "features": f} for it, f in zip(items, features, strict=True)
                ],
                "chosen": chosen,
                "propensity": float(logger[chosen]),
                "pmf": logger.tolist(),
                "reward": reward,
            }
        )
        pmf_rows.append({"decision_id": f"s{seed}-{i}", "pmf": target.tolist()})
    log = _write_jsonl(tmp / f"sim-{seed}.jsonl", rows)
    pmfs = _write_jsonl(tmp / f"target-{seed}.jsonl", pmf_rows)
    return log, pmfs, truth / N_ROUNDS


def test_ips_and_dr_intervals_cover_the_true_value(tmp_path: Path) -> None:
    covered: dict[str, int] = {}
    for seed in range(N_SEEDS):
        log, pmfs, truth = _simulated_log(seed, tmp_path)
        result = replay([str(log)], [f"pmf:{pmfs}"], n_bootstrap=500, seed=seed, progress=False)
        candidate = result["candidates"][f"pmf:{pmfs}"]
        assert candidate["diagnostics"]["support_deficiency"] == 0.0
        for name, cell in candidate.items():
            if name != "diagnostics":
                hit = cell["ci_low"] <= truth <= cell["ci_high"]
                covered[name] = covered.get(name, 0) + int(hit)
    print(f"coverage over {N_SEEDS} seeds: {covered}")
    assert covered["ips"] >= 45, covered
    assert covered["dr"] >= 45, covered


# ----------------------------------------------------------------------------- bad inputs


def test_missing_log_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="does not exist"):
        replay([str(tmp_path / "nope.jsonl")], ["uniform"], progress=False)
    with pytest.raises(ReplayError, match=r"\.jsonl or \.parquet"):
        replay([str(tmp_path / "log.csv")], ["uniform"], progress=False)


def test_malformed_lines_and_invalid_records_are_counted(tmp_path: Path) -> None:
    log = tmp_path / "bad.jsonl"
    good = SMALL[0]
    bad_rows = [
        {**good, "propensity": 0.0},
        {**good, "propensity": -0.1},
        {**good, "propensity": float("nan")},
        {**good, "propensity": 1.5},
        {k: v for k, v in good.items() if k != "propensity"},
        {**good, "propensity": 0.4},  # pmf[chosen] is 0.5
        {**good, "chosen": 5},
        {k: v for k, v in good.items() if k != "reward"},
    ]
    lines = [orjson.dumps(good), b"{not json", b"[1, 2]"]
    lines += [orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) for r in bad_rows[:2]]
    lines += [b'{"propensity": NaN}']  # not JSON either
    lines += [orjson.dumps(r) for r in bad_rows[3:]]
    log.write_bytes(b"\n".join(lines) + b"\n")
    assert check_record({**good, "propensity": float("nan")}) == (
        "invalid_propensity",
        "propensity=nan is not in (0, 1]",
    )
    result = replay([str(log)], ["uniform", "logged"], estimators=["ips"], progress=False)
    assert result["n"] == 1
    assert result["excluded"] == {
        "chosen_out_of_range": 1,
        "invalid_json": 2,
        "invalid_propensity": 3,
        "missing_propensity": 1,
        "missing_reward": 1,
        "not_an_object": 1,
        "propensity_pmf_mismatch": 1,
    }
    assert result["candidates"]["uniform"]["ips"]["value"] == pytest.approx(0.5 / 0.5 * 1.0)


def test_mismatched_pmf_file_is_reported(tmp_path: Path) -> None:
    log = _write_jsonl(tmp_path / "small.jsonl", SMALL)
    pmfs = _write_jsonl(
        tmp_path / "pmfs.jsonl",
        [
            {"decision_id": "d0", "pmf": [1.0, 0.0]},
            {"decision_id": "d1", "pmf": [0.2, 0.3, 0.5]},  # the record has 2 actions
            {"decision_id": "zzz", "pmf": [1.0]},
        ],
    )
    result = replay([str(log)], [f"pmf:{pmfs}"], estimators=["ips"], progress=False)
    diag = result["candidates"][f"pmf:{pmfs}"]["diagnostics"]
    assert diag["n"] == 1
    assert diag["excluded"] == {"pmf_file_length_mismatch": 1, "pmf_file_missing_decision": 2}
    assert diag["pmf_file_unused"] == 1
    assert result["candidates"][f"pmf:{pmfs}"]["ips"]["value"] == pytest.approx(2.0)

    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"decision_id": "d0", "pmf": [0.5, 0.6]}\n')
    with pytest.raises(ReplayError, match=r"broken\.jsonl:1: .*sum to 1"):
        replay([str(log)], [f"pmf:{broken}"], progress=False)
    with pytest.raises(TargetError, match="does not exist"):
        make_target(f"pmf:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(ReplayError, match="unknown target"):
        replay([str(log)], ["best-guess"], progress=False)


def test_all_zero_propensities_give_an_empty_estimate_not_a_number(tmp_path: Path) -> None:
    rows = [{**r, "propensity": 0.0, "pmf": None} for r in SMALL]
    log = _write_jsonl(tmp_path / "zeros.jsonl", rows)
    result = replay([str(log)], ["uniform"], progress=False)
    assert result["n"] == 0
    assert result["excluded"] == {"invalid_propensity": 4}
    assert result["candidates"]["uniform"]["ips"]["value"] is None


def test_progressive_targets_score_before_learning(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(300):
        pmf = [0.25] * 4
        chosen = int(rng.integers(0, 4))
        rows.append(_record(i, pmf, chosen, float(chosen == i % 4 and rng.random() < 0.9)))
    log = _write_jsonl(tmp_path / "prog.jsonl", rows)
    result = replay(
        [str(log)],
        ["vw:--cb_explore_adf --epsilon 0.1", "linucb", "uniform"],
        n_bootstrap=100,
        progress=False,
    )
    for name in ("vw:--cb_explore_adf --epsilon 0.1", "linucb"):
        cell = result["candidates"][name]
        assert cell["diagnostics"]["n"] == 300
        assert cell["dr"]["value"] is not None and cell["ips"]["value"] is not None


# ------------------------------------------------------------- bulk validation == check_record

_MUTATIONS: list[tuple[str, Any]] = [
    ("propensity", 0.0), ("propensity", -0.5), ("propensity", 1.0000001), ("propensity", "0.5"),
    ("propensity", True), ("propensity", None), ("propensity", 10**400), ("propensity", 1),
    ("reward", float("inf")), ("reward", "1"), ("reward", None), ("reward", 10**400),
    ("reward", 3), ("chosen", -1), ("chosen", 2), ("chosen", 1.0), ("chosen", True),
    ("chosen", None), ("context", None), ("context", []), ("actions", []),
    ("actions", "item-0"), ("actions", [{"id": "a"}, "b"]), ("actions", [{"id": "a"}, {}]),
    ("pmf", None), ("pmf", [0.5]), ("pmf", "0.5,0.5"), ("pmf", [0.5, "0.5"]),
    ("pmf", [True, 0.0]), ("pmf", [1.5, -0.5]), ("pmf", [0.5, float("nan")]),
    ("pmf", [0.5, 0.5 + 1e-6]), ("pmf", [0.5, 0.5 + 1e-6 + 1e-15]), ("pmf", [0.5, 0.5 - 1e-6]),
    ("pmf", [1, 0]), ("pmf", [0.5 + 1e-10, 0.5]), ("pmf", [0.5, 0.5, 0.0]),
    ("user_features", None), ("user_features", {}), ("user_features", []),
    ("user_features", "u1"), ("actions", [{"id": "a", "features": None}, {"id": "b"}]),
    ("actions", [{"id": "a", "features": ["x"]}, {"id": "b"}]),
]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from(range(len(_MUTATIONS) + 1)), max_size=3), min_size=1, max_size=40
    )
)
def test_bulk_validation_keeps_exactly_what_check_record_accepts(plan: list[list[int]]) -> None:
    """The fast path of the replay must agree with check_record on every record."""
    records = []
    for i, mutations in enumerate(plan):
        record = _record(i, [0.5, 0.5], i % 2, float(i % 3 == 0))
        for m in mutations:
            if m < len(_MUTATIONS):
                key, value = _MUTATIONS[m]
                record[key] = value
        if i % 5 == 0:
            del record["pmf"]
        records.append(record)
    problems = _Problems()
    kept, columns = _validate(list(enumerate(records)), problems, "log.jsonl")
    expected = [r for r in records if check_record(r) is None]
    assert [id(r) for r in kept] == [id(r) for r in expected]
    reasons: dict[str, int] = {}
    for r in records:
        bad = check_record(r)
        if bad is not None:
            reasons[bad[0]] = reasons.get(bad[0], 0) + 1
    assert problems.counts == reasons
    assert columns.reward.tolist() == [float(r["reward"]) for r in expected]
    assert columns.propensity.tolist() == [float(r["propensity"]) for r in expected]
    assert columns.chosen.tolist() == [r["chosen"] for r in expected]
    assert columns.sizes.sum() == columns.logged_pmf.shape[0]


def test_shared_bootstrap_equals_one_job_at_a_time() -> None:
    rng = np.random.default_rng(1)
    w = rng.exponential(size=500)
    r = (rng.random(500) < 0.3).astype(float)
    data = BanditData.from_pmfs(
        reward=r,
        propensity=1.0 / (1.0 + w),
        chosen=[0] * 500,
        target_pmfs=[[1.0]] * 500,
    )
    single = [
        e.estimate_interval(data, n_bootstrap=300, rng=np.random.default_rng(7))
        for e in (IPS(), SNIPS())
    ]
    shared = bootstrap_intervals(
        [IPS().bootstrap_job(data), SNIPS().bootstrap_job(data)], 0.05, 300, 7
    )
    assert np.allclose(shared, single, rtol=1e-12, atol=0)
    low, high = single[0]
    assert low < IPS().estimate_policy_value(data) < high
    running = SNIPS().running_estimate(data)
    assert running[-1] == pytest.approx(SNIPS().estimate_policy_value(data), rel=1e-12)
    assert running[0] == pytest.approx(r[0])


def test_per_round_dot_on_ragged_and_equal_rounds() -> None:
    rng = np.random.default_rng(3)
    for sizes in (rng.integers(1, 15, 20_000), np.full(20_000, 7)):
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n, m = len(sizes), int(offsets[-1])
        a, b = rng.random(m), rng.random(m)
        data = BanditData(
            reward=np.zeros(n),
            propensity=np.ones(n),
            target_prob=np.ones(n),
            offsets=offsets,
            target_pmf=a,
        )
        expected = [float(a[s:e] @ b[s:e]) for s, e in pairwise(offsets)]
        assert np.allclose(data.per_round_dot(a, b), expected, rtol=1e-12, atol=0)
