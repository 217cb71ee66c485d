"""Item popularity with decay, and the non-personalized holdout policy built on it.

* :class:`ItemPopularity` -- per-item sums that halve every ``half_life`` updates
  (O(1) per update). The candidate pre-filter ranks items by their decayed
  reward (:mod:`loopwise.streams.decisions`, counted by :mod:`loopwise.streams.learner`);
  the holdout keeps two of them, impressions and rewards.
* :class:`PopularityPolicy` -- the holdout arm: the smoothed reward rate of
  every item, epsilon exploration.

For every item the policy keeps decayed sums of impressions ``n_i`` and rewards
``r_i`` (two :class:`ItemPopularity`, aged by one step per learned example, so a
busy and a quiet stream forget at the same pace per decision). Its score is the
smoothed reward rate::

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

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from loopwise.learners.policy import Action, BasePolicy, Example, FloatArray, pack_snapshot

__all__ = ["ItemPopularity", "PopularityPolicy"]


class ItemPopularity:
    """Per-item sums that halve every ``half_life`` updates.

    The clock counts updates, not time. Every :meth:`update` adds its amount to
    one item, then ages every item by one step, a factor ``2 ** (-1 / half_life)``.
    After ``n`` updates an item's score is::

        score_i = sum over the updates u of item i:  a_u * 2 ** (-(n - u) / half_life)

    with ``u = 0, 1, ...`` numbering all updates (so the latest amount has aged
    one step). Items never updated score 0; ``half_life=math.inf`` never forgets.

    An update is O(1): instead of scaling every item down, amounts are stored
    scaled up by ``2 ** (clock / half_life)`` and read back scaled down; the
    stored values are folded back to scale 1 (O(items)) every ``64 * half_life``
    updates, far from overflow. :attr:`total` and :meth:`max_score` are O(1) too
    (the latter amortized: a negative amount makes it rescan once).

    Example::

        >>> pop = ItemPopularity(half_life=1)
        >>> pop.update("a", 4.0)
        >>> pop.update("b", 1.0)
        >>> pop.score("a"), pop.score("b"), pop.total
        (1.0, 0.5, 1.5)
        >>> pop.top(1)
        [('a', 1.0)]
    """

    def __init__(self, half_life: float) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life={half_life} must be > 0 (math.inf never forgets)")
        self.half_life = float(half_life)
        self._decay = 2.0 ** (-1.0 / self.half_life)
        self._weights: dict[str, float] = {}  # score * 2 ** (clock / half_life)
        self._clock = 0.0
        self._total = 0.0  # at scale 1: aged eagerly, one multiplication per update
        self._max_weight: float | None = 0.0  # max of _weights (0 if empty); None: rescan

    @classmethod
    def from_scores(
        cls, scores: Mapping[str, float], half_life: float, total: float | None = None
    ) -> ItemPopularity:
        """Items with these scores now (``total`` defaults to their sum), e.g. from a snapshot."""
        popularity = cls(half_life)
        popularity._weights = {str(item): float(score) for item, score in scores.items()}
        popularity._total = float(sum(popularity._weights.values()) if total is None else total)
        popularity._max_weight = None
        return popularity

    @property
    def total(self) -> float:
        """The decayed sum of every amount, all items together."""
        return self._total

    def update(self, item_id: str, amount: float = 1.0) -> None:
        """Add ``amount`` to ``item_id``, then age every item by one step."""
        if amount:
            stored = amount * 2.0 ** (self._clock / self.half_life)
            weight = self._weights[item_id] = self._weights.get(item_id, 0.0) + stored
            if self._max_weight is not None:
                self._max_weight = max(self._max_weight, weight) if amount > 0 else None
        self._total = (self._total + amount) * self._decay
        self._clock += 1.0
        if self._clock >= 64.0 * self.half_life:
            self._rescale()

    def score(self, item_id: str) -> float:
        """The decayed sum of ``item_id`` (0 for an item never updated)."""
        return self._weights.get(item_id, 0.0) * self._scale()

    def scores(self, item_ids: Iterable[str]) -> FloatArray:
        """:meth:`score` of every item, in order."""
        stored = self._weights.get
        out: FloatArray = np.array([stored(i, 0.0) for i in item_ids], dtype=np.float64)
        out *= self._scale()
        return out

    def max_score(self) -> float:
        """The largest score of any item (0 if there is none)."""
        if self._max_weight is None:
            self._max_weight = max(self._weights.values(), default=0.0)
        return self._max_weight * self._scale()

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` best items, ``[(item_id, score)]``, best first (ties: first seen first)."""
        scale = self._scale()
        best = heapq.nlargest(k, self._weights.items(), key=itemgetter(1))
        return [(item, weight * scale) for item, weight in best]

    def to_dict(self) -> dict[str, float]:
        """Every item's score (for a snapshot; :meth:`from_scores` reads it back)."""
        self._rescale()
        return dict(self._weights)

    def _scale(self) -> float:
        return 2.0 ** (-self._clock / self.half_life)

    def _rescale(self) -> None:
        """Fold the clock into the stored sums (clock back to 0); scores are unchanged."""
        if self._clock == 0.0:
            return
        scale = self._scale()
        for item, weight in self._weights.items():
            scaled = weight * scale
            self._weights[item] = scaled if math.isfinite(scaled) else 0.0
        self._clock = 0.0
        self._max_weight = None


class PopularityPolicy(BasePolicy):
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
        >>> policy.learn({}, acts, chosen=0, propensity=0.5, reward=0.0)
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
        self._impressions = ItemPopularity(self.half_life)
        self._rewards = ItemPopularity(self.half_life)  # aged in step with the impressions
        self._version = 0

    def scores(self, actions: Sequence[Action]) -> FloatArray:
        """Smoothed reward rate of every action (higher is better)."""
        n_total, r_total = self._impressions.total, self._rewards.total
        mu = r_total / n_total if n_total > 0 else 0.0
        m = self.prior_strength
        items = [action.id for action in actions]
        n, r = self._impressions.scores(items), self._rewards.scores(items)
        out: FloatArray = np.zeros(len(actions), dtype=np.float64)
        np.divide(r + m * mu, n + m, out=out, where=n + m > 0)
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

    def _learn(self, example: Example) -> None:
        """Count one impression of ``actions[chosen]`` and its reward, then age every count."""
        _, actions, chosen, _, reward = example
        self.observe(actions[chosen].id, reward)

    def observe(self, item_id: str, reward: float = 0.0, impressions: float = 1.0) -> None:
        """Add impressions and reward of an item (organic traffic too), then age every count."""
        self._impressions.update(item_id, impressions)
        self._rewards.update(item_id, reward)

    def snapshot(self) -> bytes:
        """Header + the counts as JSON."""
        params = {
            "epsilon": self.epsilon,
            "top_k": self.top_k,
            "half_life": self.half_life,
            "prior_strength": self.prior_strength,
        }
        state = {
            "impressions": self._impressions.to_dict(),
            "rewards": self._rewards.to_dict(),
            "total_impressions": self._impressions.total,
            "total_rewards": self._rewards.total,
        }
        return pack_snapshot(self.name, params, self._version, orjson.dumps(state))

    class Params(BaseModel):
        """The constructor arguments a snapshot may carry (learners/snapshot.py)."""

        model_config = ConfigDict(extra="forbid")

        epsilon: float = Field(0.1, ge=0, le=1)
        top_k: int = Field(1, ge=1)
        half_life: float = Field(20_000.0, gt=0)
        prior_strength: float = Field(10.0, ge=0)

    @classmethod
    def _from_snapshot(cls, header: Mapping[str, Any], payload: bytes) -> PopularityPolicy:
        policy = cls(**header["params"])
        state = _State.model_validate_json(payload)
        half_life = policy.half_life
        policy._impressions = ItemPopularity.from_scores(
            state.impressions, half_life, total=state.total_impressions
        )
        policy._rewards = ItemPopularity.from_scores(
            state.rewards, half_life, total=state.total_rewards
        )
        policy._version = int(header["version"])
        return policy


class _State(BaseModel):
    """A popularity snapshot's payload (JSON)."""

    model_config = ConfigDict(extra="forbid")

    impressions: dict[str, float]
    rewards: dict[str, float]
    total_impressions: float | None = None
    total_rewards: float | None = None
