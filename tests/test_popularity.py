"""Item popularity (the one decayed count) and the holdout built on it: pure unit tests."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from loopwise.learners import popularity
from loopwise.learners.policy import Action, restore
from loopwise.learners.popularity import ItemPopularity, PopularityPolicy

# A PopularityPolicy snapshot written before ItemPopularity existed (the policy kept its
# own dicts): PopularityPolicy(epsilon=0.1, top_k=1, half_life=4, prior_strength=1) after
# observe a 1, b 0, a 0, c 1, b 1, and the scores and pmf of a, b, c, d it gave then.
SNAPSHOT_BEFORE_ITEM_POPULARITY = (
    b"LOOPWISE-POLICY/1\n"
    b'{"policy":"popularity","params":{"epsilon":0.1,"top_k":1,"half_life":4.0,'
    b'"prior_strength":1.0},"version":0}\n'
    b'{"impressions":{"a":1.0150517651282176,"b":1.3408964152537144,"c":0.7071067811865475},'
    b'"rewards":{"a":0.42044820762685725,"b":0.8408964152537145,"c":0.7071067811865475},'
    b'"total_impressions":3.0630549615684792,"total_rewards":1.968451404067119}'
)
SCORES_BEFORE = [0.5275752283636104, 0.6337485046804524, 0.7906652258586566, 0.6426431875251584]
PMF_BEFORE = [0.025, 0.025, 0.925, 0.025]


def test_the_docstring_examples_hold() -> None:
    assert doctest.testmod(popularity).failed == 0


def test_item_popularity_halves_every_half_life_of_updates() -> None:
    pop = ItemPopularity(half_life=2)
    pop.update("a", 8.0)
    for _ in range(3):
        pop.update("b", 0.0)  # an update without amount still ages everything
    assert pop.score("a") == pytest.approx(2.0)  # aged 4 steps = 2 half-lives: 8 / 4
    assert pop.score("b") == 0.0 and pop.score("never seen") == 0.0
    pop.update("b", 2.0)
    assert pop.score("b") == pytest.approx(2.0 * 2**-0.5)  # the latest amount aged one step
    assert pop.score("a") == pytest.approx(8.0 * 2**-2.5)
    assert pop.total == pytest.approx(pop.score("a") + pop.score("b"))


def test_item_popularity_matches_its_formula_across_rescaling() -> None:
    """score_i = sum_u a_u 2^(-(n - u) / h), also after the stored values are folded back."""
    rng = np.random.default_rng(0)
    half_life = 3.0  # folds back every 192 updates: 1,000 updates cross it five times
    pop = ItemPopularity(half_life)
    history = [(f"i{int(rng.integers(5))}", float(rng.integers(0, 3))) for _ in range(1_000)]
    for item, amount in history:
        pop.update(item, amount)
    n = len(history)
    for item in {i for i, _ in history}:
        expected = sum(
            a * 2 ** (-(n - u) / half_life) for u, (i, a) in enumerate(history) if i == item
        )
        assert pop.score(item) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert pop.total == pytest.approx(sum(pop.scores(sorted({i for i, _ in history}))))


def test_item_popularity_ranks_best_first_and_ties_in_first_seen_order() -> None:
    pop = ItemPopularity(half_life=math.inf)  # never forgets: plain sums
    for item, amount in [("a", 1.0), ("b", 3.0), ("c", 1.0), ("d", 2.0), ("a", 1.0)]:
        pop.update(item, amount)
    assert pop.top(3) == [("b", 3.0), ("a", 2.0), ("d", 2.0)]
    assert pop.top(10)[-1] == ("c", 1.0)
    assert pop.max_score() == 3.0
    assert pop.scores(["c", "zzz", "b"]).tolist() == [1.0, 0.0, 3.0]
    assert ItemPopularity(half_life=1).max_score() == 0.0  # no items: 0, as the pre-filter needs


def test_item_popularity_max_score_follows_negative_amounts_and_decay() -> None:
    pop = ItemPopularity(half_life=1)
    pop.update("a", 4.0)
    pop.update("b", 1.0)
    assert pop.max_score() == pytest.approx(1.0)  # a: 4 aged two steps
    pop.update("a", -4.0)  # a penalty: the best item changes
    assert pop.top(1)[0][0] == "b" and pop.max_score() == pop.score("b")


def test_item_popularity_round_trips_through_its_scores() -> None:
    pop = ItemPopularity(half_life=5)
    for j in range(40):
        pop.update(f"i{j % 7}", float(j % 3))
    twin = ItemPopularity.from_scores(pop.to_dict(), half_life=5, total=pop.total)
    items = [f"i{j}" for j in range(8)]
    assert twin.scores(items).tolist() == pytest.approx(pop.scores(items).tolist())
    for p in (pop, twin):
        p.update("i3", 1.0)
    assert [item for item, _ in twin.top(8)] == [item for item, _ in pop.top(8)]
    assert [s for _, s in twin.top(8)] == pytest.approx([s for _, s in pop.top(8)])
    assert twin.total == pytest.approx(pop.total)
    assert ItemPopularity.from_scores({"x": 1.0, "y": 2.0}, half_life=1).total == 3.0


def test_item_popularity_refuses_a_half_life_that_is_not_positive() -> None:
    for half_life in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="half_life"):
            ItemPopularity(half_life)


def test_popularity_snapshot_written_before_item_popularity_still_restores() -> None:
    policy = restore(SNAPSHOT_BEFORE_ITEM_POPULARITY)
    assert isinstance(policy, PopularityPolicy)
    actions = [Action(item, {}) for item in "abcd"]
    assert policy.scores(actions).tolist() == SCORES_BEFORE
    assert policy.pmf({}, actions).tolist() == PMF_BEFORE
    assert restore(policy.snapshot()).scores(actions).tolist() == SCORES_BEFORE


def test_popularity_policy_counts_like_its_definition() -> None:
    """score_i = (r_i + m mu) / (n_i + m) over two ItemPopularity aged one step per example."""
    policy = PopularityPolicy(half_life=4, prior_strength=1)
    for item, reward in [("a", 1.0), ("b", 0.0), ("a", 0.0), ("c", 1.0), ("b", 1.0)]:
        policy.observe(item, reward)
    assert policy.scores([Action(i, {}) for i in "abcd"]).tolist() == pytest.approx(SCORES_BEFORE)
