"""A contextual-bandit policy on Vowpal Wabbit's ``--cb_explore_adf``.

Each decision is one VW multi-line (ADF) example: a ``shared`` line with the
user (namespace ``U``) and the request context (``C``), then one line per
candidate action with the item's features (``A``: id, category, brand, price
band, log price) and the user's affinity share for the item's category (``B``).
VW learns a cost regressor over the action lines with the quadratic
interactions ``UA`` (user x item: personal taste) and ``CA`` (context x item:
device and hour effects), and its exploration reduction turns the predicted
costs into the pmf. Cost is ``-reward / reward_scale`` (VW minimizes cost).

Explorations (``exploration=``, see VW's wiki "Contextual Bandit Exploration
with SquareCB" and Bietti, Agarwal, Langford 2021, "A Contextual Bandit
Bake-off", JMLR 22):

* ``"squarecb"`` (default) -- Foster & Rakhlin 2020, "Beyond UCB": with predicted
  costs ``f_a`` and the best ``b``, ``p_a = 1 / (K + gamma (f_a - f_b))`` for
  ``a != b`` and the rest on ``b``; ``gamma = gamma_scale * t ** gamma_exponent``
  grows with the number of examples ``t``;
* ``"epsilon"`` -- epsilon-greedy: ``p = (1 - eps) 1[a = b] + eps / K``;
* ``"softmax"`` -- ``p_a ~ exp(-lambda f_a)``;
* ``"bag"`` -- bootstrap Thompson-like exploration with ``bag`` online bootstrap
  replicas (plus ``epsilon``).

**The default** (:data:`DEFAULT_ARGS`: squarecb, ``gamma_scale=50``,
``gamma_exponent=0.5``, squared loss, ``-b 18``, ``UA`` + ``CA``) was chosen on
the simulator's closed loop (``bench/bench_policies.py``; value of the shown
items / oracle value, rounds 50k-60k, loop seed 1): squarecb 50 reached 0.86 (200
users x 40 items) and 0.76 (500 x 40) where squarecb 10 (VW's default scale)
reached 0.80 / 0.77, bagging(5) 0.79 / 0.70, softmax 0.63 / 0.57 and epsilon-greedy
0.05 0.56 / 0.53. Also tried (500 x 40, 50k rounds) and not kept: logistic loss
(0.49-0.80 across settings and seeds: unstable), ``--elim``, ``--regcbopt``,
``--synthcover``, ``--rnd``, ``--lrq UA8``, ``--cubic UCA``, ``-b 20``, learning
rates 0.1-4, unweighted or clipped importance weights: none did better than the
seed-to-seed spread (about +-0.03). The 500-user market needs 50k-100k rounds to
reach 0.8 of the oracle (loop seeds 1/2/3: first 10k-round window at >= 0.8 ends
at 100k/50k/100k rounds; 0.83-0.85 at 150k).

The adapter hides VW's duties (parsing, multi-example lists, ``finish_example``):
callers only see :class:`~loopwise.learners.policy.Action` lists and numpy pmfs. It talks to
VW's native binding (``pylibvw``: parse, ``predict_multi``/``learn_multi``, finish)
rather than through ``pyvw``'s ``Example`` wrappers, whose Python set-up costs
~4 µs a line: measured on 100 actions, a pmf took 454 µs through ``pyvw`` and
227 µs direct, with identical pmfs (``tests/test_learners.py`` checks they stay
identical). If the binding lacks those calls, the ``pyvw`` path is used.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from vowpalwabbit import Workspace, pyvw

from loopwise.learners.features import vw_adf_lines
from loopwise.learners.policy import (
    Action,
    ActionTable,
    BasePolicy,
    Example,
    FloatArray,
    pack_snapshot,
)
from loopwise.learners.snapshot import SnapshotError
from loopwise.learners.vw_options import ALLOWED_OPTIONS, check_vw_args, model_options

__all__ = [
    "ALLOWED_OPTIONS",
    "DEFAULT_ARGS",
    "DEFAULT_EXPLORATION",
    "EXPLORATIONS",
    "VWPolicy",
    "check_vw_args",
    "model_options",
    "vw_args",
]

_NATIVE: Final = pyvw.pylibvw.vw
_HAS_NATIVE: Final = all(
    hasattr(_NATIVE, name)
    for name in ("_parse", "predict_multi", "learn_multi", "_finish_example_multi_ex")
)

EXPLORATIONS: Final = ("squarecb", "epsilon", "softmax", "bag")
DEFAULT_EXPLORATION: Final = "squarecb"


def vw_args(
    exploration: str = DEFAULT_EXPLORATION,
    *,
    bits: int = 18,
    interactions: Sequence[str] = ("UA", "CA"),
    learning_rate: float | None = None,
    gamma_scale: float = 50.0,
    gamma_exponent: float = 0.5,
    epsilon: float = 0.05,
    softmax_lambda: float = 10.0,
    bag: int = 5,
    cb_type: str | None = None,
    extra: str = "",
) -> str:
    """The VW command line of an exploration and its parameters (see the module docstring)."""
    parts = ["--cb_explore_adf", "--quiet", f"-b {bits}"]
    parts += [f"--interactions {pair}" for pair in interactions]
    if learning_rate is not None:
        parts.append(f"-l {learning_rate:g}")
    if cb_type is not None:
        parts.append(f"--cb_type {cb_type}")
    if exploration == "squarecb":
        parts.append(
            f"--squarecb --gamma_scale {gamma_scale:g} --gamma_exponent {gamma_exponent:g}"
        )
    elif exploration == "epsilon":
        parts.append(f"--epsilon {epsilon:g}")
    elif exploration == "softmax":
        parts.append(f"--softmax --lambda {softmax_lambda:g}")
    elif exploration == "bag":
        parts.append(f"--bag {bag} --epsilon {epsilon:g}")
    else:
        raise ValueError(f"exploration={exploration!r} is not one of {', '.join(EXPLORATIONS)}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


DEFAULT_ARGS: Final = vw_args()
"""The default VW command line (see the module docstring for how it was chosen)."""


class VWPolicy(BasePolicy):
    """Vowpal Wabbit ``--cb_explore_adf`` behind the :class:`~loopwise.learners.policy.Policy`
    protocol.

    Parameters
    ----------
    exploration
        ``"squarecb"`` (default), ``"epsilon"``, ``"softmax"`` or ``"bag"``.
    args
        A raw VW argument string that replaces everything :func:`vw_args` would
        build (it must contain ``--cb_explore_adf``; ``--quiet`` and the seed are added).
    seed
        VW's ``--random_seed`` (bagging and ties), for reproducible runs.
    reward_scale
        Rewards are divided by it before becoming VW costs (keep costs O(1) when
        purchases add price-weighted amounts).
    **options
        Parameters of :func:`vw_args` (``bits``, ``interactions``, ``gamma_scale``,
        ``epsilon``, ``softmax_lambda``, ``bag``, ``learning_rate``, ``cb_type``).

    Example::

        >>> policy = VWPolicy()
        >>> acts = [Action("i1", {"category": "c1"}), Action("i2", {"category": "c2"})]
        >>> shared = {"user": {"user_id": "u1"}, "context": {"device": "mobile", "hour": 9}}
        >>> p = policy.pmf(shared, acts)
        >>> policy.learn(shared, acts, chosen=1, propensity=float(p[1]), reward=1.0)
        >>> policy.version
        1
    """

    name = "vw"

    def __init__(
        self,
        exploration: str = DEFAULT_EXPLORATION,
        *,
        args: str | None = None,
        seed: int = 0,
        reward_scale: float = 1.0,
        **options: Any,
    ) -> None:
        if args is not None and "--cb_explore_adf" not in args:
            raise ValueError("args must contain --cb_explore_adf (a pmf over the actions)")
        if not reward_scale > 0:
            raise ValueError("reward_scale must be > 0")
        self.exploration = exploration if args is None else "custom"
        self.options = dict(options)
        self.seed = seed
        self.reward_scale = float(reward_scale)
        base = args if args is not None else vw_args(exploration, **options)
        if "--quiet" not in base.split():
            base += " --quiet"
        self.args = f"{base} --random_seed {int(seed)}"
        check_vw_args(self.args)  # before VW sees them: nothing may touch a file
        self._raw_args = args
        self._vw = Workspace(self.args)
        self._version = 0
        # One action per item version, so each item's |A text is rendered once, also for the
        # actions rebuilt from every log record the learner reads.
        self._actions = ActionTable()
        self._native = _HAS_NATIVE

    # ------------------------------------------------------------- protocol

    def pmf(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> FloatArray:
        """VW's exploration pmf over ``actions`` (float64, renormalized to sum exactly 1)."""
        if not actions:
            return np.zeros(0, dtype=np.float64)
        lines = self._lines_of(shared, actions, None)
        if self._native:
            raw = _NATIVE._parse(self._vw, "\n".join(lines).strip())
            try:
                _NATIVE.predict_multi(self._vw, raw)
                probs = raw[0].get_action_scores()
            finally:
                _NATIVE._finish_example_multi_ex(self._vw, raw)
        else:
            examples = self._vw.parse(lines)
            try:
                probs = self._vw.predict(examples)
            finally:
                self._vw.finish_example(examples)
        p = np.asarray(probs, dtype=np.float64)
        total = p.sum()
        if not (total > 0 and math.isfinite(total)):
            return np.full(len(actions), 1.0 / len(actions))
        out: FloatArray = p / total
        return out

    def _learn(self, example: Example) -> None:
        """One CB update: ``actions[chosen]`` cost ``-reward / reward_scale`` at ``propensity``."""
        shared, actions, chosen, propensity, reward = example
        label = (chosen, -reward / self.reward_scale, propensity)
        lines = self._lines_of(shared, actions, label)
        if self._native:
            raw = _NATIVE._parse(self._vw, "\n".join(lines).strip())
            try:
                _NATIVE.learn_multi(self._vw, raw)
            finally:
                _NATIVE._finish_example_multi_ex(self._vw, raw)
        else:
            examples = self._vw.parse(lines)
            try:
                self._vw.learn(examples)
            finally:
                self._vw.finish_example(examples)

    def learn_many(self, examples: Iterable[Example]) -> None:
        """Learn from closed decisions in order (same as calling :meth:`learn` on each)."""
        for shared, actions, chosen, propensity, reward in examples:
            self.learn(shared, actions, chosen, propensity, reward)

    def snapshot(self) -> bytes:
        """Header + VW's saved model (``Workspace.save``, resumable: learning continues exactly)."""
        fd, path = tempfile.mkstemp(prefix="loopwise-vw-", suffix=".model")
        os.close(fd)
        try:
            self._vw.save(path)
            with open(path, "rb") as fh:
                payload = fh.read()
        finally:
            os.unlink(path)
        params: dict[str, Any] = {
            "exploration": self.exploration,
            "args": self._raw_args,
            "seed": self.seed,
            "reward_scale": self.reward_scale,
            **self.options,
        }
        return pack_snapshot(self.name, params, self._version, payload)

    class Params(BaseModel):
        """The constructor arguments a snapshot may carry (learners/snapshot.py); the VW
        command line they make is checked against ALLOWED_OPTIONS by the constructor."""

        model_config = ConfigDict(extra="forbid")

        exploration: Literal["squarecb", "epsilon", "softmax", "bag", "custom"] = "squarecb"
        args: str | None = None
        seed: int = 0
        reward_scale: float = Field(1.0, gt=0)
        bits: int = Field(18, ge=1, le=30)
        interactions: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2,3}$")]] = [
            "UA",
            "CA",
        ]
        learning_rate: float | None = None
        gamma_scale: float = 50.0
        gamma_exponent: float = 0.5
        epsilon: float = Field(0.05, ge=0, le=1)
        softmax_lambda: float = 10.0
        bag: int = Field(5, ge=1, le=100)
        cb_type: Literal["ips", "dm", "dr", "mtr", "sm"] | None = None
        extra: str = ""

    @classmethod
    def _from_snapshot(cls, header: Mapping[str, Any], payload: bytes) -> VWPolicy:
        try:
            check_vw_args(model_options(payload), "VW model in the snapshot")
        except ValueError as exc:
            raise SnapshotError(str(exc)) from None
        params = dict(header["params"])
        exploration = params.pop("exploration")
        args = params.pop("args")
        if "interactions" in params:
            params["interactions"] = tuple(params["interactions"])
        policy = cls(
            DEFAULT_EXPLORATION if exploration == "custom" else exploration, args=args, **params
        )
        fd, path = tempfile.mkstemp(prefix="loopwise-vw-", suffix=".model")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
            policy._vw.finish()
            # The model file carries its reductions and interactions; only -i and quiet here.
            policy._vw = Workspace(f"--quiet -i {path}")
        finally:
            os.unlink(path)
        policy._version = int(header["version"])
        return policy

    def close(self) -> None:
        """Release VW's native resources (also done when the policy is garbage collected)."""
        self._vw.finish()

    # ------------------------------------------------------------- internals

    def _lines_of(
        self,
        shared: Mapping[str, Any],
        actions: Sequence[Action],
        label: tuple[int, float, float] | None,
    ) -> list[str]:
        table = self._actions
        return vw_adf_lines(shared, [table.intern(a) for a in actions], label)
