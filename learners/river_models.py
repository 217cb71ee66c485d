"""Incremental models that feed reports (river).

* :class:`RewardMonitor` -- the reward rate and drift alarms from river's ``ADWIN``.

Item popularity is :class:`loopwise.learners.popularity.ItemPopularity`.
"""

from __future__ import annotations

import math
from typing import Any

from river import drift

__all__ = ["RewardMonitor"]


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
