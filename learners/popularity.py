"""The non-personalized holdout policy: decayed item popularity, epsilon exploration.

For every item the policy keeps exponentially decayed sums of impressions
``n_i`` and rewards ``r_i``; each learned example multiplies every sum by
``2 ** (-1 / half_life)`` (decay by examples, so a busy and a quiet stream
forget at the same pace per decision). Its score is the smoothed reward rate::

    score_i = (r_i + m * mu) / (n_i + m),     mu = sum_j r_j / sum_j n_j

(a Beta-style shrinkage of each item toward the global rate ``mu`` with
``m = prior_strength`` pseudo-impressions), and the pmf is::

    p_i = (1 - epsilon) / k * 1[i in top k]  +  epsilon / K

Users without consent or without state get the same pmf from
:meth:`PopularityPolicy.default_pmf` (the ``nba:__default__`` key). Rates are
learned from whatever decisions the policy is fed; decisions made by another
policy (targeted to users who like the item) inflate that item's rate, which is
acceptable for a holdout baseline and avoided by feeding it its own arm's logs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from loopwise.learners.policy import Action, FloatArray, check_learn_args, pack_snapshot

__all__ = ["PopularityPolicy"]


class PopularityPolicy:
    """Decayed popularity with epsilon-uniform exploration (see the module docstring).

    Parameters
    ----------
    epsilon
        Probability mass spread uniformly over all actions.
    top_k
        How many of the best items share the remaining ``1 - epsilon``.
    half_life
        Number of learned examples after which a past impression weighs half.
    prior_strength
        Pseudo-impressions ``m`` pulling each item's rate toward the global rate.

    Example::

        >>> policy = PopularityPolicy(epsilon=0.1, top_k=1)
        >>> acts = [Action("a", {}), Action("b", {})]
        >>> policy.learn({}, acts, chosen=1, propensity=0.5, reward=1.0)
        >>> policy.default_pmf(acts).round(2).tolist()
        [0.05, 0.95]
    """

    name = "popularity"

    def __init__(
        self,
        epsilon: float = 0.1,
        top_k: int = 1,
        half_life: float = 20_000.0,
        prior_strength: float = 10.0,
    ) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        if not half_life > 0:
            raise ValueError("half_life must be > 0")
        if prior_strength < 0:
            raise ValueError("prior_strength must be >= 0")
        self.epsilon = float(epsilon)
        self.top_k = int(top_k)
        self.half_life = float(half_life)
        self.prior_strength = float(prior_strength)
        # Sums are stored undecayed-at-clock 0 scale: value * 2 ** (clock / half_life).
        # Reading multiplies by 2 ** (-clock / half_life); rescaled before it overflows.
        self._impressions: dict[str, float] = {}
        self._rewards: dict[str, float] = {}
        self._total_impressions = 0.0
        self._total_rewards = 0.0
        self._clock = 0.0
        self._version = 0

    @property
    def version(self) -> int:
        """Number of examples learned so far."""
        return self._version

    def scores(self, actions: Sequence[Action]) -> FloatArray:
        """Smoothed reward rate of every action (higher is better)."""
        n_total, r_total = self._total_impressions, self._total_rewards
        mu = r_total / n_total if n_total > 0 else 0.0
        scale = 2.0 ** (-self._clock / self.half_life)
        m = self.prior_strength
        out = np.empty(len(actions), dtype=np.float64)
        for i, action in enumerate(actions):
            n = self._impressions.get(action.id, 0.0) * scale
            r = self._rewards.get(action.id, 0.0) * scale
            out[i] = (r + m * mu) / (n + m) if n + m > 0 else 0.0
        return out

    def default_pmf(self, actions: Sequence[Action]) -> FloatArray:
        """The non-personalized pmf: ``(1 - epsilon)`` over the top ``k``, ``epsilon / K`` all."""
        k = len(actions)
        if k == 0:
            return np.zeros(0, dtype=np.float64)
        score = self.scores(actions)
        # Stable order: best score first, ties by position in the candidate list.
        top = np.lexsort((np.arange(k), -score))[: min(self.top_k, k)]
        out: FloatArray = np.full(k, self.epsilon / k)
        out[top] += (1.0 - self.epsilon) / len(top)
        return out

    def pmf(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> FloatArray:
        """Same as :meth:`default_pmf`: the holdout ignores the user and context."""
        return self.default_pmf(actions)

    def learn(
        self,
        shared: Mapping[str, Any],
        actions: Sequence[Action],
        chosen: int,
        propensity: float,
        reward: float,
    ) -> None:
        """Count one impression of ``actions[chosen]`` and its reward, then age every count."""
        check_learn_args(len(actions), chosen, propensity, reward)
        self.observe(actions[chosen].id, reward)
        self._version += 1

    def observe(self, item_id: str, reward: float = 0.0, impressions: float = 1.0) -> None:
        """Add impressions and reward of an item (organic traffic too), then age every count."""
        weight = 2.0 ** (self._clock / self.half_life)
        self._impressions[item_id] = self._impressions.get(item_id, 0.0) + impressions * weight
        self._rewards[item_id] = self._rewards.get(item_id, 0.0) + reward * weight
        self._total_impressions += impressions
        self._total_rewards += reward
        decay = 2.0 ** (-1.0 / self.half_life)
        self._total_impressions *= decay
        self._total_rewards *= decay
        self._clock += 1.0
        if self._clock >= 64.0 * self.half_life:  # keep the stored weights far from overflow
            self._rescale()

    def snapshot(self) -> bytes:
        """Header + the counts as JSON."""
        self._rescale()
        params = {
            "epsilon": self.epsilon,
            "top_k": self.top_k,
            "half_life": self.half_life,
            "prior_strength": self.prior_strength,
        }
        state = {
            "impressions": self._impressions,
            "rewards": self._rewards,
            "total_impressions": self._total_impressions,
            "total_rewards": self._total_rewards,
        }
        return pack_snapshot(self.name, params, self._version, orjson.dumps(state))

    @classmethod
    def _from_snapshot(cls, header: Mapping[str, Any], payload: bytes) -> PopularityPolicy:
        policy = cls(**header["params"])
        state = orjson.loads(payload)
        policy._impressions = {k: float(v) for k, v in state["impressions"].items()}
        policy._rewards = {k: float(v) for k, v in state["rewards"].items()}
        policy._total_impressions = float(state["total_impressions"])
        policy._total_rewards = float(state["total_rewards"])
        policy._version = int(header["version"])
        return policy

    def _rescale(self) -> None:
        """Fold the clock into the stored sums (clock back to 0); values are unchanged."""
        if self._clock == 0.0:
            return
        scale = 2.0 ** (-self._clock / self.half_life)
        for table in (self._impressions, self._rewards):
            for key, value in table.items():
                scaled = value * scale
                table[key] = scaled if math.isfinite(scaled) else 0.0
        self._clock = 0.0
