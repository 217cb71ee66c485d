"""Decisions (pure): the candidate pre-filter, the pmf floor, and the nba:{user} value."""

from __future__ import annotations

import numpy as np
import orjson

from loopwise.learners.policy import Action
from loopwise.learners.popularity import ItemPopularity, PopularityPolicy
from loopwise.streams.decisions import POPULARITY_HALF_LIFE, DecisionMaker, nba_json, user_features
from loopwise.streams.user_state import UserState

USER: dict[str, float | str] = {"user_id": "u", "aff:c1": 0.5, "aff:c3": 0.25}


def _maker(max_candidates: int) -> DecisionMaker:
    return DecisionMaker(
        {"popularity": PopularityPolicy()},
        lambda user: "popularity",
        pmf_floor=0.01,
        max_candidates=max_candidates,
        default_arm="popularity",
        rng=np.random.default_rng(0),
    )


def test_prefilter_keeps_the_top_by_popularity_plus_affinity_in_a_stable_order() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(5, 60))
        actions = [Action(f"i{j}", {"category": f"c{j % 4}"}) for j in range(n)]
        maker = _maker(max_candidates=int(rng.integers(1, 10)))
        # Integer popularity: many ties, which must keep catalog order (a stable ranking).
        popularity = {a.id: float(rng.integers(0, 3)) for a in actions if rng.random() < 0.7}
        maker.popularity = ItemPopularity.from_scores(popularity, half_life=POPULARITY_HALF_LIFE)
        top = max(popularity.values(), default=0.0) or 1.0

        def reference_score(
            a: Action, top: float = top, popularity: dict[str, float] = popularity
        ) -> float:
            affinity = USER.get("aff:" + str(a.features.get("category")), 0.0)
            return popularity.get(a.id, 0.0) / top + float(affinity)

        if n <= maker.max_candidates:
            expected = actions  # small catalogs are not ranked
        else:
            expected = sorted(actions, key=reference_score, reverse=True)[: maker.max_candidates]
        assert maker.candidates(actions, USER) == expected


def test_decision_respects_the_floor_and_renders_nba() -> None:
    actions = [Action(f"i{j}", {"category": "c"}) for j in range(5)]
    maker = _maker(max_candidates=3)
    state = UserState()
    decision = maker.decide("u1", state, {"device": "mobile"}, actions, now_ms=7)
    assert len(decision.actions) == 3 and min(decision.pmf) >= 0.01
    assert abs(sum(decision.pmf) - 1.0) < 1e-12
    body = orjson.loads(nba_json(decision))
    assert body["propensity"] == decision.pmf[decision.chosen]
    assert body["item_id"] == decision.actions[decision.chosen]["id"]
    assert user_features("u1", None) == {"user_id": "u1"}
