"""The one protocol every policy answers, and the helpers around a pmf.

A policy scores the candidate actions of one decision and returns a pmf over
them (River/OBP style: the same few calls everywhere)::

    pmf = policy.pmf(shared, actions)                 # float64, sums to 1
    pmf = apply_floor(pmf, floor)                     # keep every propensity >= floor
    chosen = sample(pmf, rng)                         # index into actions
    ...                                               # show, wait for the reward
    policy.learn(shared, actions, chosen, pmf[chosen], reward)
    blob = policy.snapshot()                          # data only (learners/snapshot.py)
    same = restore(blob, kind=policy.name)            # identical pmfs

``shared`` is ``{"user": {...}, "context": {...}}`` (user-state features and the
request context; values are str/number/bool), ``actions`` the candidate items
with their catalog features. Rewards are >= 0, higher is better. The policies
derive from :class:`BasePolicy` (``version``; ``learn`` checks its arguments and
counts the example, the policy's ``_learn`` updates the model).

A snapshot is data (:mod:`loopwise.learners.snapshot`: a JSON header with the
constructor arguments, validated against the class's ``Params`` schema, and the
model's own data; no serialized Python objects), optionally signed with an HMAC.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import orjson

from loopwise.learners.snapshot import SnapshotError, pack_snapshot, restore, unpack_snapshot

__all__ = [
    "Action",
    "ActionTable",
    "BasePolicy",
    "Example",
    "FloatArray",
    "Policy",
    "SnapshotError",
    "apply_floor",
    "item_version",
    "pack_snapshot",
    "restore",
    "sample",
    "unpack_snapshot",
]

FloatArray = npt.NDArray[np.float64]
Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True, eq=False)
class Action:
    """A candidate action (an item of the active catalog) and its catalog features.

    ``features`` are the item's catalog features (category, price, brand, ...):
    strings, numbers or bools. An action never changes: an item whose features
    change becomes a new ``Action`` (see :class:`ActionTable`), so what is derived
    from it (its log-record form, its VW text) is computed once and kept in
    ``derived``.
    """

    id: str
    features: Mapping[str, Scalar]
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def as_record(self) -> dict[str, Any]:
        """``{"id", "features"}``: the action as decisions and log records hold it (built once)."""
        record = self.derived.get("record")
        if record is None:
            record = self.derived["record"] = {"id": self.id, "features": self.features}
        return record

    @property
    def version(self) -> str:
        """The content address of the features (:func:`item_version`), computed once."""
        version = self.derived.get("version")
        if version is None:
            version = self.derived["version"] = item_version(self.features)
        return str(version)


def item_version(features: Mapping[str, Any]) -> str:
    """A short content address of an item's features: 12 hex digits of BLAKE2b over their
    JSON with sorted keys. Stored decisions name their candidates by (item id, version)."""
    blob = orjson.dumps(features, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(blob, digest_size=6).hexdigest()


class ActionTable:
    """The one per-item cache: one :class:`Action` per item and version of its features.

    ``get(item_id, features)`` returns the item's current action when its features
    are unchanged (so everything derived from it is reused), and a new action
    otherwise; ``version`` counts those changes. The catalog builds its candidates
    through one table, the learner and replay intern the actions of log records
    through theirs. Bounded: past ``max_items`` items it starts over (a catalog that
    large churns anyway; only the derived forms are recomputed).
    """

    def __init__(self, max_items: int = 1_000_000) -> None:
        self.max_items = max_items
        self.version = 0
        self._actions: dict[str, Action] = {}

    def __len__(self) -> int:
        return len(self._actions)

    def get(self, item_id: str, features: Mapping[str, Scalar]) -> Action:
        """The item's action with these features (the features are kept, not copied)."""
        action = self._actions.get(item_id)
        if action is not None and (action.features is features or action.features == features):
            return action
        return self._put(Action(item_id, features))

    def current(self, item_id: str) -> Action | None:
        """The item's latest action, if the table knows the item."""
        return self._actions.get(item_id)

    def intern(self, action: Action) -> Action:
        """The table's action equal to ``action`` (``action`` itself when it is new)."""
        known = self._actions.get(action.id)
        if known is not None and (
            known is action
            or known.features is action.features
            or known.features == action.features
        ):
            return known
        return self._put(action)

    def _put(self, action: Action) -> Action:
        if len(self._actions) >= self.max_items:
            self._actions.clear()
        self._actions[action.id] = action
        self.version += 1
        return action


@runtime_checkable
class Policy(Protocol):
    """What every policy answers.

    ``name`` is the policy's kind (``"vw"``, ``"linucb"``, ``"popularity"``) and
    ``version`` the number of examples it has learned from.
    """

    name: str

    @property
    def version(self) -> int:
        """Number of examples learned so far."""
        ...

    def pmf(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> FloatArray:
        """Probability of choosing each action: float64, >= 0, sums to 1, ``len(actions)``."""
        ...

    def learn(
        self,
        shared: Mapping[str, Any],
        actions: Sequence[Action],
        chosen: int,
        propensity: float,
        reward: float,
    ) -> None:
        """Learn from one closed decision: ``actions[chosen]`` was shown with ``propensity``."""
        ...

    def snapshot(self) -> bytes:
        """The policy's full state as bytes; :func:`restore` gives back an equal policy."""
        ...


Example = tuple[Mapping[str, Any], Sequence[Action], int, float, float]
"""One closed decision: ``(shared, actions, chosen, propensity, reward)``."""


class BasePolicy:
    """What Loopwise's policies share: :attr:`version` and :meth:`learn`.

    ``learn`` checks its arguments (:func:`check_learn_args`), hands the example to the
    policy's own :meth:`_learn` and counts it in ``version``.
    """

    name: str
    _version: int

    @property
    def version(self) -> int:
        """Number of examples learned so far."""
        return self._version

    def learn(
        self,
        shared: Mapping[str, Any],
        actions: Sequence[Action],
        chosen: int,
        propensity: float,
        reward: float,
    ) -> None:
        """Learn from one closed decision: ``actions[chosen]`` was shown with ``propensity``."""
        check_learn_args(len(actions), chosen, propensity, reward)
        self._learn((shared, actions, chosen, propensity, reward))
        self._version += 1

    def _learn(self, example: Example) -> None:
        """Learn from one checked example (the policy's own update)."""
        raise NotImplementedError


def apply_floor(pmf: npt.ArrayLike, floor: float) -> FloatArray:
    """Mix ``pmf`` with the uniform distribution as little as needed for ``min p >= floor``.

    With ``K`` actions and ``floor * K <= 1``::

        p'_a = (1 - K * floor) * p_a + floor

    which is the pmf mixed with uniform at weight ``K * floor``; it keeps the
    order of the actions and sums to 1, and every action keeps a propensity of at
    least ``floor``, so that importance-weighted off-policy estimates (weights
    ``pi(a|x) / p'_a <= 1 / floor``) stay finite. When ``floor * K > 1`` no pmf can
    satisfy the floor and the uniform pmf ``1 / K`` is returned. ``floor <= 0``
    returns the pmf unchanged (renormalized). The mixing is applied whenever
    ``floor > 0`` (even if the pmf already satisfies it) so that the result does
    not jump when one probability crosses the floor.
    """
    p = np.asarray(pmf, dtype=np.float64)
    k = p.size
    if k == 0:
        return p.copy()
    total = float(p.sum())
    p = p / total if total > 0 else np.full(k, 1.0 / k)
    if floor <= 0.0:
        return p
    if floor * k >= 1.0:
        return np.full(k, 1.0 / k)
    out: FloatArray = (1.0 - k * floor) * p + floor
    out /= out.sum()
    return out


def sample(pmf: npt.ArrayLike, rng: np.random.Generator) -> int:
    """Draw an index with probability ``pmf[i]`` (inverse CDF on one uniform draw)."""
    cdf = np.cumsum(np.asarray(pmf, dtype=np.float64))
    u = rng.random() * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)


def check_learn_args(n_actions: int, chosen: int, propensity: float, reward: float) -> None:
    """Validate a learn call once, at the boundary (raises ValueError naming the argument)."""
    if not 0 <= chosen < n_actions:
        raise ValueError(f"chosen={chosen} is not an index into {n_actions} actions")
    if not 0.0 < propensity <= 1.0:
        raise ValueError(f"propensity={propensity} must be in (0, 1]")
    if not np.isfinite(reward):
        raise ValueError(f"reward={reward} must be finite")
