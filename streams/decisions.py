"""Next-best-action: a decision per touched user, from the current model.

For each user touched by a batch, :class:`DecisionMaker` takes the active
catalog (capped at ``max_candidates``, pre-filtered by popularity and the
user's category affinities when larger), asks the policy of the user's arm for
a pmf, raises every probability to at least ``pmf_floor`` (so that off-policy
evaluation stays possible), samples ``chosen`` from it and stamps a fresh
``decision_id``. ``nba_json`` renders docs/contracts.md's ``nba:{user_id}`` value.
"""

from __future__ import annotations

import heapq
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from loopwise.learners.policy import Action, Policy, apply_floor, sample
from loopwise.learners.popularity import ItemPopularity
from loopwise.streams.reward_join import Decision
from loopwise.streams.user_state import UserState

DEFAULT_USER = "__default__"
# The pre-filter's popularity halves every ~693 learned examples (a decay of 0.999 per example).
POPULARITY_HALF_LIFE = -1.0 / math.log2(0.999)


def user_features(user_id: str, state: UserState | None) -> dict[str, Any]:
    """What a policy knows of a user: id, activity counts and category affinities (share)."""
    features: dict[str, Any] = {"user_id": user_id}
    if state is None:
        return features
    features["views"] = state.views
    features["clicks"] = state.clicks
    features["purchases"] = state.purchases
    total = sum(state.affinities.values())
    if total > 0:
        for category, value in state.affinities.items():
            features["aff:" + category] = round(value / total, 6)
    return features


class DecisionMaker:
    """Turns (user, context, candidates) into a sampled, logged-ready decision."""

    def __init__(
        self,
        policies: Mapping[str, Policy],
        assign_arm: Callable[[str], str],
        *,
        pmf_floor: float,
        max_candidates: int,
        default_arm: str,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.policies = policies
        self.assign_arm = assign_arm
        self.pmf_floor = pmf_floor
        self.max_candidates = max_candidates
        self.default_arm = default_arm
        self.rng = rng or np.random.default_rng()
        # Decayed reward per item, for the pre-filter; the learner counts it (shared object).
        self.popularity = ItemPopularity(POPULARITY_HALF_LIFE)

    def policy_version(self, arm: str) -> str:
        policy = self.policies[arm]
        return f"{arm}/{policy.name}/{policy.version}"

    def candidates(self, actions: Sequence[Action], features: Mapping[str, Any]) -> list[Action]:
        """All actions, or the ``max_candidates`` best by popularity + the user's affinity."""
        if len(actions) <= self.max_candidates:
            return list(actions)

        # Both terms in [0, 1]: popularity relative to the most popular item, affinity share.
        best = self.popularity.max_score() or 1.0
        scores = (self.popularity.scores([a.id for a in actions]) / best).tolist()
        affinity = {  # the user's affinity share per category, looked up once per decision
            name[4:]: float(value) for name, value in features.items() if name.startswith("aff:")
        }
        if affinity:
            scores = [
                popularity + affinity.get(str(action.features.get("category")), 0.0)
                for popularity, action in zip(scores, actions, strict=True)
            ]

        # The same order as a stable sort by descending score, top max_candidates only.
        top = heapq.nlargest(self.max_candidates, range(len(actions)), key=scores.__getitem__)
        return [actions[i] for i in top]

    def decide(
        self,
        user_id: str,
        state: UserState | None,
        context: Mapping[str, Any],
        actions: Sequence[Action],
        now_ms: int,
        arm: str | None = None,
        subject: str | None = None,
    ) -> Decision:
        """A decision for ``user_id``; with ``subject`` (the user's pseudonymization token)
        the policies and the log see the subject instead of the stored id."""
        if not actions:
            raise ValueError("no active items in the catalog: nothing to decide between")
        arm = arm or self.assign_arm(user_id)
        features = user_features(subject or user_id, state)
        candidates = self.candidates(actions, features)
        shared = {"user": features, "context": dict(context)}
        pmf = apply_floor(self.policies[arm].pmf(shared, candidates), self.pmf_floor)
        chosen = sample(pmf, self.rng)
        return Decision(
            decision_id=uuid.uuid4().hex,
            user_id=user_id,
            arm=arm,
            policy_version=self.policy_version(arm),
            computed_at=now_ms,
            context=dict(context),
            user_features=features,
            actions=[a.as_record() for a in candidates],  # built once per item version
            pmf=[float(p) for p in pmf],
            chosen=chosen,
            versions=[a.version for a in candidates],  # computed once per item version
            subject=subject or "",
        )

    def default_decision(self, actions: Sequence[Action], now_ms: int) -> Decision:
        """The non-personalized decision for users with no state or no consent."""
        return self.decide(DEFAULT_USER, None, {}, actions, now_ms, arm=self.default_arm)


def nba_json(decision: Decision, extra: Mapping[str, Any] | None = None) -> bytes:
    """docs/contracts.md's ``nba:{user_id}`` value."""
    body: dict[str, Any] = {
        "decision_id": decision.decision_id,
        "user_id": decision.user_id,
        "arm": decision.arm,
        "policy_version": decision.policy_version,
        "computed_at": decision.computed_at,
        "actions": [a["id"] for a in decision.actions],
        "pmf": decision.pmf,
        "chosen": decision.chosen,
        "item_id": decision.item_id,
        "propensity": decision.pmf[decision.chosen],
    }
    if extra:
        body.update(extra)
    return orjson.dumps(body)
