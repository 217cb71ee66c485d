"""Disjoint LinUCB on river's Bayesian linear regression: the contextual baseline.

River 0.26.1 ships ``river.bandit.LinUCBDisjoint``, which keeps one
``river.linear_model.BayesianLinearRegression`` per arm and pulls the arm with
the largest ``mu + sigma``. It only returns the pulled arm; a logged policy
needs a pmf (propensities), so this class keeps the same per-arm river models
and exposes their scores. For action ``a`` with posterior mean weights ``m_a``
and covariance ``S_a`` (Bishop 2006, eqs. 3.53-3.59; Li et al. 2010, "A
Contextual-Bandit Approach to Personalized News Article Recommendation", WWW)::

    ucb_a(x) = m_a . x + alpha * sqrt(x' S_a x)

and the pmf puts ``1 - epsilon`` on the arg-max (split evenly on ties) and
``epsilon / K`` on every action, so every propensity is >= ``epsilon / K``.

``x`` is the shared (user + context) featurization of :mod:`loopwise.learners.features`,
hashed into ``dim`` buckets plus a bias (river's model cost is quadratic in the
number of features, so the hashing keeps one update at O(dim^2)). Item features
are constant per arm, so the disjoint model does not need them: each arm's bias
is the item's own effect. A new item starts from the prior (``ucb = alpha *
sqrt(x' x / prior_precision)``: optimistic, so it gets tried).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field
from river import linear_model

from loopwise.learners.features import FeatureHasher, shared_features
from loopwise.learners.policy import Action, BasePolicy, Example, FloatArray, pack_snapshot
from loopwise.learners.snapshot import SnapshotError

__all__ = ["LinUCBPolicy"]

MAX_DIM: Final = 4096
# The state of river's BayesianLinearRegression (river 0.26): feature index, precision
# matrix, covariance, natural mean, capacity, count. A snapshot stores it as data.
_ARRAYS: Final = ("ss", "ss_inv", "eta")
_RIVER_ATTRS: Final = ("_idx", "_ss_arr", "_ss_inv_arr", "_eta_arr", "_cap", "_n", "_m_dirty")


class LinUCBPolicy(BasePolicy):
    """Disjoint LinUCB, one river ``BayesianLinearRegression`` per action, epsilon-greedy pmf.

    Parameters
    ----------
    alpha
        Width of the confidence bonus (``alpha * posterior std`` of the mean reward).
    epsilon
        Probability mass spread uniformly over all actions.
    dim
        Hashed dimension of the shared features; a bias is added, so 63 makes 64
        weights per arm (river grows its matrices to powers of two: 64 x 64, not 128).
    prior_precision
        River's ``alpha``: the prior precision of the weights (larger = stronger shrinkage).
    noise_precision
        River's ``beta``: the precision of the reward noise.
    """

    name = "linucb"

    def __init__(
        self,
        alpha: float = 0.3,
        epsilon: float = 0.05,
        dim: int = 63,
        prior_precision: float = 1.0,
        noise_precision: float = 1.0,
    ) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        if alpha < 0:
            raise ValueError("alpha must be >= 0")
        self.alpha = float(alpha)
        self.epsilon = float(epsilon)
        self.dim = int(dim)
        self.prior_precision = float(prior_precision)
        self.noise_precision = float(noise_precision)
        self._hasher = FeatureHasher(self.dim)
        self._models: dict[str, linear_model.BayesianLinearRegression] = {}
        self._version = 0

    def scores(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> FloatArray:
        """``ucb_a(x)`` of every action (see the module docstring)."""
        x = self._context(shared)
        noise_var = 1.0 / self.noise_precision
        out = np.empty(len(actions), dtype=np.float64)
        for i, action in enumerate(actions):
            model = self._models.get(action.id)
            if model is None:
                mean, var = 0.0, sum(v * v for v in x.values()) / self.prior_precision
            else:
                dist = model.predict_one(x, with_dist=True)
                mean, var = float(dist.mu), float(dist.sigma) ** 2 - noise_var
            out[i] = mean + self.alpha * math.sqrt(max(var, 0.0))
        return out

    def pmf(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> FloatArray:
        """``(1 - epsilon)`` on the best UCB (ties split), ``epsilon / K`` everywhere."""
        k = len(actions)
        if k == 0:
            return np.zeros(0, dtype=np.float64)
        ucb = self.scores(shared, actions)
        best = ucb >= ucb.max() - 1e-12
        out: FloatArray = np.full(k, self.epsilon / k)
        out[best] += (1.0 - self.epsilon) / int(best.sum())
        return out

    def _learn(self, example: Example) -> None:
        """Update the chosen action's regression with ``(x, reward)`` (on-policy, unweighted)."""
        shared, actions, chosen, _, reward = example
        action_id = actions[chosen].id
        model = self._models.get(action_id)
        if model is None:
            model = linear_model.BayesianLinearRegression(
                alpha=self.prior_precision, beta=self.noise_precision
            )
            self._models[action_id] = model
        model.learn_one(self._context(shared), float(reward))

    class Params(BaseModel):
        """The constructor arguments a snapshot may carry (learners/snapshot.py)."""

        model_config = ConfigDict(extra="forbid")

        alpha: float = Field(0.3, ge=0)
        epsilon: float = Field(0.05, ge=0, le=1)
        dim: int = Field(63, ge=1, le=MAX_DIM)
        prior_precision: float = Field(1.0, gt=0)
        noise_precision: float = Field(1.0, gt=0)

    def snapshot(self) -> bytes:
        """Header + each arm's river state as data: a JSON line (arm ids, feature keys,
        sizes) and the float64 arrays (precision, covariance, natural mean), little-endian."""
        params = {
            "alpha": self.alpha,
            "epsilon": self.epsilon,
            "dim": self.dim,
            "prior_precision": self.prior_precision,
            "noise_precision": self.noise_precision,
        }
        arms, arrays = [], []
        for action_id, model in self._models.items():
            state = _river_state(model)
            arms.append(
                {"id": action_id, "keys": state["keys"], "cap": state["cap"], "n": state["n"]}
            )
            for name in _ARRAYS:
                arrays.append(np.ascontiguousarray(state[name], dtype="<f8").tobytes())
        payload = orjson.dumps({"arms": arms}) + b"\n" + b"".join(arrays)
        return pack_snapshot(self.name, params, self._version, payload)

    @classmethod
    def _from_snapshot(cls, header: Mapping[str, Any], payload: bytes) -> LinUCBPolicy:
        policy = cls(**header["params"])
        end = payload.find(b"\n")
        if end < 0:
            raise SnapshotError("linucb snapshot payload lacks its JSON line")
        index = _Index.model_validate_json(payload[:end])
        data = memoryview(payload)[end + 1 :]
        needed = sum(8 * (2 * arm.cap * arm.cap + arm.cap) for arm in index.arms)
        if len(data) != needed:
            raise SnapshotError(f"linucb snapshot holds {len(data)} array bytes, expected {needed}")
        offset = 0
        for arm in index.arms:
            if len(arm.keys) > arm.cap or len(set(map(repr, arm.keys))) != len(arm.keys):
                raise SnapshotError(f"linucb arm {arm.id!r}: bad feature keys for size {arm.cap}")
            shapes = {"ss": (arm.cap, arm.cap), "ss_inv": (arm.cap, arm.cap), "eta": (arm.cap,)}
            state: dict[str, Any] = {"keys": arm.keys, "cap": arm.cap, "n": arm.n}
            for name in _ARRAYS:
                count = int(np.prod(shapes[name]))
                values = np.frombuffer(data, dtype="<f8", count=count, offset=offset)
                state[name] = values.astype(np.float64).reshape(shapes[name])
                offset += 8 * count
            policy._models[arm.id] = _river_model(
                state, policy.prior_precision, policy.noise_precision
            )
        policy._version = int(header["version"])
        return policy

    def _context(self, shared: Mapping[str, Any]) -> dict[Any, float]:
        user, context = shared_features(shared)
        x: dict[Any, float] = dict(self._hasher.sparse(user, context))
        x["bias"] = 1.0
        return x


class _Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    keys: list[int | str]
    cap: int = Field(ge=0, le=MAX_DIM + 1)
    n: int


class _Index(BaseModel):
    """The JSON line of a linucb snapshot's payload."""

    model_config = ConfigDict(extra="forbid")

    arms: list[_Arm]


def _check_river(model: linear_model.BayesianLinearRegression) -> None:
    missing = [a for a in _RIVER_ATTRS if not hasattr(model, a)]
    if missing:
        raise SnapshotError(
            f"this river version's BayesianLinearRegression lacks {missing}: linucb snapshots "
            "need river 0.26's state layout"
        )


def _river_state(model: linear_model.BayesianLinearRegression) -> dict[str, Any]:
    """The model's state as plain data (keys in index order, arrays, sizes)."""
    _check_river(model)
    keys = sorted(model._idx, key=model._idx.__getitem__)
    return {
        "keys": keys,
        "cap": int(model._cap),
        "n": int(model._n),
        "ss": model._ss_arr,
        "ss_inv": model._ss_inv_arr,
        "eta": model._eta_arr,
    }


def _river_model(
    state: Mapping[str, Any], prior_precision: float, noise_precision: float
) -> linear_model.BayesianLinearRegression:
    """A river model holding ``state`` (as :func:`_river_state` gave it)."""
    model = linear_model.BayesianLinearRegression(alpha=prior_precision, beta=noise_precision)
    _check_river(model)
    model._idx = {key: i for i, key in enumerate(state["keys"])}
    model._cap = int(state["cap"])
    model._n = int(state["n"])
    model._ss_arr = np.array(state["ss"], dtype=np.float64)
    model._ss_inv_arr = np.asfortranarray(state["ss_inv"], dtype=np.float64)
    model._eta_arr = np.array(state["eta"], dtype=np.float64)
    model._m_dirty = True  # the mean is recomputed from the natural parameters
    return model
