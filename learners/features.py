"""One featurization for every policy: shared (user + context) and per-action features.

Every policy sees the same features, so a comparison between policies compares
learners, not feature engineering. The rules, applied to ``shared = {"user":
{...}, "context": {...}}`` and to each action's catalog features:

* a string or bool value ``v`` of key ``k`` becomes the categorical (one-hot)
  feature ``k=v`` with value 1;
* a number becomes a numeric feature ``k`` with value ``sign(x) * log1p(|x|)``
  (counts and amounts are heavy-tailed; the compression keeps one large user
  from dominating the update);
* ``hour`` (context, local hour of day, 0..23) becomes the categorical ``hour=h``,
  a coarse day part ``daypart=night|morning|afternoon|evening`` (0-5, 6-11,
  12-17, 18-23) and the cyclic pair ``hour_cos, hour_sin = cos, sin(2 pi h / 24)``,
  so that sparse hours borrow from their neighbours (any daily cycle
  ``A cos(2 pi (h - h0) / 24)`` is linear in the pair);
* ``price`` (action) becomes ``log_price = log1p(price)`` and the categorical
  ``price_bucket=floor(log2(1 + price))`` (a price band that interacts with users);
* user affinities ``aff:{category}`` are normalized to shares,
  ``aff_k / sum_j |aff_j|``, so that heavy and light users are on one scale; each
  action also gets ``user_aff``, the user's share for the action's own category
  (the user x category signal as one dense feature);
* the action id becomes ``id={id}`` (so a learner can learn per-item terms).

Two renderings of the same features:

* :func:`vw_adf_lines`: Vowpal Wabbit ADF text (a ``shared`` line with namespaces
  ``U`` (user) and ``C`` (context), one line per action with namespace ``A``);
  VW parses it in C++: featurize + render + parse + predict of 40 actions took
  ~210 us here, while only *building* the same ``vowpalwabbit.Example`` objects
  from Python dicts (no predict) took ~220 us (``bench/bench_policies.py
  --latency-only``); each action's rendered text is kept on the action
  (:class:`loopwise.learners.policy.ActionTable` makes one action per item version);
* :func:`hashed_vector`: a fixed-length numeric vector (signed hashing trick,
  Weinberger et al. 2009, "Feature Hashing for Large Scale Multitask Learning")
  for linear models such as LinUCB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from hashlib import blake2b
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from loopwise.learners.policy import Action

__all__ = [
    "AFFINITY_PREFIX",
    "FeatureHasher",
    "Features",
    "action_features",
    "daypart",
    "hashed_vector",
    "render_action",
    "shared_features",
    "user_affinity_for",
    "vw_action_line",
    "vw_adf_lines",
    "vw_shared_line",
]

Features = dict[str, float]
"""A feature dict: name -> value (a categorical feature ``k=v`` has value 1.0)."""

AFFINITY_PREFIX: Final = "aff:"
"""User-state fields with this prefix are category affinities (``aff:{category}``)."""

_DAYPARTS: Final = ("night", "morning", "afternoon", "evening")
# Characters with a meaning in VW's text format, replaced inside feature names.
_VW_ESCAPE: Final = str.maketrans({" ": "_", "\t": "_", "|": "!", ":": ";", "\n": "_", "\r": "_"})


def daypart(hour: float) -> str:
    """The coarse day part of a local hour: night 0-5, morning 6-11, afternoon 12-17, evening 18-23.

    >>> daypart(13)
    'afternoon'
    """
    return _DAYPARTS[int(hour % 24) // 6]


def _squash(x: float) -> float:
    return math.copysign(math.log1p(abs(x)), x)


def _add_plain(out: Features, key: str, value: Any) -> None:
    if isinstance(value, bool):
        out[f"{key}={'true' if value else 'false'}"] = 1.0
    elif isinstance(value, int | float):
        x = float(value)
        if math.isfinite(x):
            out[key] = _squash(x)
    elif value is not None:
        out[f"{key}={value}"] = 1.0


def shared_features(shared: Mapping[str, Any]) -> tuple[Features, Features]:
    """``(user, context)`` feature dicts of ``shared = {"user": {...}, "context": {...}}``.

    Affinities (``aff:*``) become shares ``aff_k / sum_j |aff_j|``; ``hour`` in the
    context becomes ``hour=h`` and ``daypart=...``; other values follow the module rules.
    """
    user_raw: Mapping[str, Any] = shared.get("user") or {}
    context_raw: Mapping[str, Any] = shared.get("context") or {}
    user: Features = {}
    aff_total = 0.0
    affinities: list[tuple[str, float]] = []
    for key, value in user_raw.items():
        if key.startswith(AFFINITY_PREFIX) and isinstance(value, int | float):
            if not isinstance(value, bool) and math.isfinite(value):
                affinities.append((key, float(value)))
                aff_total += abs(float(value))
        else:
            _add_plain(user, key, value)
    if aff_total > 0.0:
        for key, value in affinities:
            user[key] = value / aff_total
    context: Features = {}
    for key, value in context_raw.items():
        if key == "hour" and isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                angle = 2.0 * math.pi * (float(value) % 24.0) / 24.0
                context[f"hour={int(value) % 24}"] = 1.0
                context[f"daypart={daypart(value)}"] = 1.0
                context["hour_cos"] = math.cos(angle)
                context["hour_sin"] = math.sin(angle)
        else:
            _add_plain(context, key, value)
    return user, context


def action_features(action_id: str, features: Mapping[str, Any]) -> Features:
    """Feature dict of one action (catalog item): ``id=``, categoricals, ``log_price``, band."""
    out: Features = {f"id={action_id}": 1.0}
    for key, value in features.items():
        if key == "price" and isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value) and value >= 0:
                out["log_price"] = math.log1p(value)
                out[f"price_bucket={int(math.log2(1.0 + value))}"] = 1.0
        else:
            _add_plain(out, key, value)
    return out


def user_affinity_for(user: Features, category: Any) -> float:
    """The user's normalized affinity share for ``category`` (0 when unknown)."""
    if category is None:
        return 0.0
    return user.get(f"{AFFINITY_PREFIX}{category}", 0.0)


# ----------------------------------------------------------------- VW text


def _vw_features(features: Mapping[str, float]) -> str:
    parts = []
    for name, value in features.items():
        clean = name.translate(_VW_ESCAPE)
        parts.append(clean if value == 1.0 else f"{clean}:{value:.6g}")
    return " ".join(parts)


def vw_shared_line(user: Features, context: Features) -> str:
    """The ADF ``shared`` line: ``shared |U user features |C context features``."""
    return f"shared |U {_vw_features(user)} |C {_vw_features(context)}"


def vw_action_line(features: Features) -> str:
    """The namespace part of one action's ADF line: ``|A id=... category=... log_price:...``."""
    return f"|A {_vw_features(features)}"


def render_action(action: Action) -> str:
    """The ``|A ...`` part of one action's ADF line, rendered once per action (kept on it)."""
    line = action.derived.get("vw")
    if line is None:
        line = action.derived["vw"] = vw_action_line(action_features(action.id, action.features))
    return line


def vw_adf_lines(
    shared: Mapping[str, Any],
    actions: Sequence[Action],
    label: tuple[int, float, float] | None = None,
    render: Callable[[Action], str] = render_action,
) -> list[str]:
    """VW ``--cb_explore_adf`` text of one decision: the shared line, then one line per action.

    ``label = (index, cost, probability)`` puts the CB label ``0:cost:probability``
    on that action's line. Each action line also carries ``|B user_aff:...`` (the
    user's affinity share for the action's category) when the user has one.
    ``render`` turns an action into its ``|A`` part (:func:`render_action`, cached per action).
    """
    user, context = shared_features(shared)
    lines = [vw_shared_line(user, context)]
    # The |B part depends only on the action's category: rendered once per category.
    suffix_of: dict[Any, str] = {}
    if any(name.startswith(AFFINITY_PREFIX) for name in user):
        for action in actions:
            category = action.features.get("category")
            if category not in suffix_of:
                aff = user_affinity_for(user, category)
                suffix_of[category] = f" |B user_aff:{aff:.6g}" if aff else ""
    if suffix_of:
        lines.extend(
            render(action) + suffix_of[action.features.get("category")] for action in actions
        )
    else:
        lines.extend(map(render, actions))
    if label is not None:
        index = label[0] + 1
        lines[index] = f"0:{label[1]:.6g}:{label[2]:.6g} {lines[index]}"
    return lines


# ----------------------------------------------------------------- hashing


def _hash_index(name: str, dim: int) -> tuple[int, float]:
    digest = int.from_bytes(blake2b(name.encode(), digest_size=8).digest(), "little")
    return digest % dim, (1.0 if (digest >> 63) & 1 else -1.0)


class FeatureHasher:
    """Signed hashing trick into ``dim`` buckets, with a cache of name -> (index, sign).

    ``x[h(name) mod dim] += s(name) * value`` with ``h`` = blake2b (stable across
    processes, unlike Python's ``hash``) and ``s`` a hash-derived sign, so that
    collisions cancel in expectation (Weinberger et al., 2009).
    """

    __slots__ = ("_cache", "dim")

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError("dim must be >= 1")
        self.dim = dim
        self._cache: dict[str, tuple[int, float]] = {}

    def index(self, name: str) -> tuple[int, float]:
        """``(bucket, sign)`` of a feature name."""
        hit = self._cache.get(name)
        if hit is None:
            hit = _hash_index(name, self.dim)
            if len(self._cache) < 1_000_000:
                self._cache[name] = hit
        return hit

    def sparse(self, *feature_dicts: Mapping[str, float]) -> dict[int, float]:
        """The hashed vector as ``{bucket: value}`` (only non-zero buckets)."""
        out: dict[int, float] = {}
        for feats in feature_dicts:
            for name, value in feats.items():
                i, s = self.index(name)
                out[i] = out.get(i, 0.0) + s * value
        return out

    def dense(self, *feature_dicts: Mapping[str, float]) -> npt.NDArray[np.float64]:
        """The hashed vector as a float64 array of length ``dim``."""
        x = np.zeros(self.dim, dtype=np.float64)
        for i, v in self.sparse(*feature_dicts).items():
            x[i] = v
        return x


def hashed_vector(dim: int, *feature_dicts: Mapping[str, float]) -> npt.NDArray[np.float64]:
    """A fixed-length vector of the feature dicts (see :class:`FeatureHasher`)."""
    return FeatureHasher(dim).dense(*feature_dicts)
