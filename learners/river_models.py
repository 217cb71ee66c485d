"""Incremental models that feed features and reports (river and friends).

* :class:`ItemPopularity` -- item popularity with exponential decay in event time;
* :class:`ClickModel` -- P(click | user, context, item): river's online
  ``LogisticRegression`` over the shared featurization of :mod:`loopwise.learners.features`;
* :class:`RewardMonitor` -- the reward rate and drift alarms from river's ``ADWIN``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from river import drift, linear_model, optim

from loopwise.learners.features import Features, action_features, shared_features, user_affinity_for
from loopwise.learners.policy import Action, FloatArray

__all__ = ["ClickModel", "ItemPopularity", "RewardMonitor"]


class ItemPopularity:
    """Per-item counts that halve every ``half_life_ms`` of event time.

    ``score_i(t) = sum_e w_e * 2 ** (-(t - t_e) / half_life_ms)`` over the item's
    events ``e`` (weight ``w_e``, e.g. view 1, click 3, purchase 10), kept exactly
    with one ``(value, as_of)`` pair per item. Events older than an item's
    ``as_of`` (out of order) are decayed to it rather than moving time back.

    Example::

        >>> pop = ItemPopularity(half_life_ms=1000)
        >>> pop.update("a", timestamp_ms=0, weight=4.0)
        >>> pop.score("a", now_ms=2000)
        1.0
    """

    def __init__(self, half_life_ms: float = 86_400_000.0) -> None:
        if not half_life_ms > 0:
            raise ValueError("half_life_ms must be > 0")
        self.half_life_ms = float(half_life_ms)
        self._state: dict[str, tuple[float, float]] = {}

    def update(self, item_id: str, timestamp_ms: float, weight: float = 1.0) -> None:
        """Add ``weight`` for ``item_id`` at event time ``timestamp_ms``."""
        value, as_of = self._state.get(item_id, (0.0, float(timestamp_ms)))
        if timestamp_ms >= as_of:
            value = value * self._decay(timestamp_ms - as_of) + weight
            as_of = float(timestamp_ms)
        else:
            value += weight * self._decay(as_of - timestamp_ms)
        self._state[item_id] = (value, as_of)

    def score(self, item_id: str, now_ms: float) -> float:
        """The decayed count of ``item_id`` at ``now_ms`` (0 for an unseen item)."""
        hit = self._state.get(item_id)
        if hit is None:
            return 0.0
        value, as_of = hit
        return value * self._decay(max(0.0, now_ms - as_of))

    def top(self, k: int, now_ms: float) -> list[tuple[str, float]]:
        """The ``k`` most popular items at ``now_ms``: ``[(item_id, score)]``, best first."""
        scored = ((self.score(item, now_ms), item) for item in self._state)
        return [(item, s) for s, item in heapq.nlargest(k, scored)]

    def _decay(self, dt_ms: float) -> float:
        return 2.0 ** (-dt_ms / self.half_life_ms)


class ClickModel:
    """P(click | shared, item) by online logistic regression (river).

    Features: the user, context and item features of :mod:`loopwise.learners.features`,
    plus the crosses that carry personal and situational taste in a linear
    model: every context feature x the item's category (``ctx x category``),
    and ``user_aff`` (the user's affinity share for the item's category)::

        P(click) = sigmoid(w . phi(user, context, item) + b)

    learned by SGD on the log loss (river ``LogisticRegression``).
    """

    def __init__(self, learning_rate: float = 0.05, l2: float = 0.0) -> None:
        self.learning_rate = float(learning_rate)
        self.l2 = float(l2)
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate), l2=l2)
        self.n_learned = 0

    def predict_proba(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> FloatArray:
        """P(click) of every action for this user and context."""
        user, context = shared_features(shared)
        out = np.empty(len(actions), dtype=np.float64)
        for i, action in enumerate(actions):
            x = self._features(user, context, action)
            out[i] = float(self.model.predict_proba_one(x).get(True, 0.0))
        return out

    def learn(self, shared: Mapping[str, Any], action: Action, clicked: bool) -> None:
        """One SGD step on the outcome of showing ``action``."""
        user, context = shared_features(shared)
        self.model.learn_one(self._features(user, context, action), bool(clicked))
        self.n_learned += 1

    @staticmethod
    def _features(user: Features, context: Features, action: Action) -> dict[str, float]:
        item = action_features(action.id, action.features)
        x: dict[str, float] = {}
        for prefix, feats in (("u.", user), ("c.", context), ("i.", item)):
            for name, value in feats.items():
                x[prefix + name] = value
        category = action.features.get("category")
        if category is not None:
            for name, value in context.items():
                x[f"c.{name}*cat={category}"] = value
            aff = user_affinity_for(user, category)
            if aff:
                x["user_aff"] = aff
        return x


class RewardMonitor:
    """Running reward rate with drift alarms (river ``ADWIN``, Bifet & Gavalda 2007).

    ADWIN keeps an adaptive window of recent rewards and drops its older part
    when the means of two sub-windows differ by more than the Hoeffding-style
    bound ``eps_cut = sqrt(2 / m * sigma^2 * ln(2 / delta')) + 2 / (3 m) ln(2 / delta')``;
    :meth:`update` returns ``True`` on such a cut (the reward rate changed).

    Example::

        >>> monitor = RewardMonitor()
        >>> alarms = [monitor.update(0.0) for _ in range(2000)]
        >>> alarms += [monitor.update(1.0) for _ in range(2000)]
        >>> monitor.summary()["drifts"] >= 1
        True
    """

    def __init__(self, delta: float = 0.002) -> None:
        self.delta = float(delta)
        self._adwin = drift.ADWIN(delta=delta)
        self.n = 0
        self.total = 0.0
        self.drifts = 0
        self.last_drift_at: int | None = None

    def update(self, reward: float) -> bool:
        """Feed one reward; ``True`` when a drift of the reward rate is detected."""
        if not math.isfinite(reward):
            raise ValueError(f"reward={reward} must be finite")
        self.n += 1
        self.total += reward
        self._adwin.update(float(reward))
        if self._adwin.drift_detected:
            self.drifts += 1
            self.last_drift_at = self.n
            return True
        return False

    def summary(self) -> dict[str, Any]:
        """``{"n", "mean", "recent_mean", "window", "drifts", "last_drift_at"}``.

        ``recent_mean`` is the mean over ADWIN's current window (since the last
        change), ``mean`` over everything.
        """
        return {
            "n": self.n,
            "mean": self.total / self.n if self.n else 0.0,
            "recent_mean": float(self._adwin.estimation),
            "window": int(self._adwin.width),
            "drifts": self.drifts,
            "last_drift_at": self.last_drift_at,
        }
