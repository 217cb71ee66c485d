"""Off-policy estimators: the value of a target policy from a propensity log.

Notation (Dudík et al. 2011; Open Bandit Pipeline): round ``i`` of ``n`` has context ``x_i``,
candidate actions ``A_i``, the logged action ``a_i`` shown with propensity ``p_i = mu(a_i|x_i)``
and reward ``r_i``. The target policy ``pi`` gives ``pi(a|x_i)`` for every ``a`` in ``A_i``; the
importance weight is ``w_i = pi(a_i|x_i) / p_i``; a reward model gives ``q(x_i, a)``.

Every estimator is a small dataclass answering the same three calls (OBP style):

* ``estimate_round_rewards(data)`` -- the per-round contributions ``v_i`` (their mean is the
  estimate);
* ``estimate_policy_value(data)`` -- the point estimate;
* ``estimate_interval(data, alpha, n_bootstrap, rng)`` -- a percentile bootstrap interval over
  rounds. Self-normalized estimators are ratios of means, so each bootstrap replicate recomputes
  the ratio on the resampled rounds (not only the mean of fixed ``v_i``).

``data`` is a :class:`BanditData`: numpy columns, the ragged per-action columns flattened with
``offsets`` (round ``i`` owns ``flat[offsets[i]:offsets[i + 1]]``).

:class:`CrossFitRewardModel` is the reward model of DM/DR/SNDR/Switch-DR: Vowpal Wabbit
regressions over the shared (user, context) and action features of
:mod:`loopwise.learners.features`,
trained with K-fold cross-fitting so that ``q(x_i, .)`` never comes from a model that saw round
``i`` (Chernozhukov et al. 2018, "Double/debiased machine learning").

Example::

    >>> import numpy as np
    >>> data = BanditData.from_pmfs(
    ...     reward=[1.0, 0.0], propensity=[0.5, 0.25], chosen=[0, 1],
    ...     target_pmfs=[[1.0, 0.0], [0.0, 1.0]], logged_pmfs=[[0.5, 0.5], [0.75, 0.25]],
    ... )
    >>> IPS().estimate_policy_value(data)   # (2 * 1 + 4 * 0) / 2
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt
from vowpalwabbit import Workspace

from loopwise.learners.features import vw_adf_lines
from loopwise.learners.policy import Action, ActionTable, FloatArray

__all__ = [
    "DM",
    "DR",
    "ESTIMATORS",
    "IPS",
    "SNDR",
    "SNIPS",
    "BanditData",
    "ClippedIPS",
    "CrossFitRewardModel",
    "Estimator",
    "SwitchDR",
    "bootstrap_intervals",
    "diagnostics",
    "make_estimator",
]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_BOOTSTRAP: Final = 1000
# Bootstrap replicates are drawn in blocks of at most this many indices (memory ~ 8 bytes each).
_BOOTSTRAP_BLOCK_CELLS: Final = 4_000_000
_REWARD_MODEL_ARGS: Final = (
    "--quiet -b 18 -l 0.02 --interactions UA --interactions CA --interactions UB"
)


def _floats(values: Any) -> FloatArray:
    out: FloatArray = np.ascontiguousarray(values, dtype=np.float64)
    return out


@dataclass(frozen=True, eq=False)
class BanditData:
    """The columns an estimator reads (numpy, one entry per round unless said otherwise).

    Parameters
    ----------
    reward
        ``r_i``.
    propensity
        ``p_i``: the logger's probability of the logged action.
    target_prob
        ``pi(a_i|x_i)``: the target's probability of the logged action.
    offsets
        ``n + 1`` increasing ints; round ``i``'s actions are ``offsets[i]:offsets[i + 1]`` of
        the flat columns.
    target_pmf
        Flat: ``pi(a|x_i)`` for every action of every round.
    logged_pmf
        Flat: the logger's pmf (NaN where the log has none); used for the support diagnostic.
    q_hat
        Flat: reward-model predictions ``q(x_i, a)`` for every action (None: no reward model;
        DM/DR/SNDR/Switch-DR then raise).
    q_hat_logged
        ``q(x_i, a_i)``; derived from ``q_hat`` and ``chosen`` when not given.
    chosen
        Index of ``a_i`` within its round (used to derive ``q_hat_logged``).
    """

    reward: FloatArray
    propensity: FloatArray
    target_prob: FloatArray
    offsets: IntArray
    target_pmf: FloatArray
    logged_pmf: FloatArray | None = None
    q_hat: FloatArray | None = None
    q_hat_logged: FloatArray | None = None
    chosen: IntArray | None = None
    round_of: IntArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.reward.shape[0]
        for name in ("propensity", "target_prob"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, need ({n},)")
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0:
            raise ValueError("offsets must have n + 1 entries starting at 0")
        sizes = np.diff(self.offsets)
        if np.any(sizes < 1):
            raise ValueError("every round needs at least one action (offsets must increase)")
        m = int(self.offsets[-1])
        for name in ("target_pmf", "logged_pmf", "q_hat"):
            column = getattr(self, name)
            if column is not None and column.shape != (m,):
                raise ValueError(f"{name} has shape {column.shape}, need ({m},) (flat)")
        if np.any(~(self.propensity > 0)):
            raise ValueError("every propensity must be > 0 (validate the log first)")
        object.__setattr__(self, "round_of", np.repeat(np.arange(n, dtype=np.int64), sizes))
        if self.q_hat is not None and self.q_hat_logged is None:
            if self.chosen is None:
                raise ValueError("q_hat needs chosen (or q_hat_logged)")
            object.__setattr__(self, "q_hat_logged", self.q_hat[self.offsets[:-1] + self.chosen])

    @classmethod
    def from_pmfs(
        cls,
        *,
        reward: Sequence[float] | FloatArray,
        propensity: Sequence[float] | FloatArray,
        chosen: Sequence[int] | IntArray,
        target_pmfs: Sequence[Sequence[float]],
        logged_pmfs: Sequence[Sequence[float]] | None = None,
        q_hats: Sequence[Sequence[float]] | None = None,
    ) -> BanditData:
        """Build from per-round lists (small logs and tests)."""
        sizes = np.array([len(p) for p in target_pmfs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        chosen_arr = np.asarray(chosen, dtype=np.int64)
        flat_target = _floats([x for p in target_pmfs for x in p])

        def flat(rows: Sequence[Sequence[float]] | None) -> FloatArray | None:
            return None if rows is None else _floats([x for p in rows for x in p])

        return cls(
            reward=_floats(reward),
            propensity=_floats(propensity),
            target_prob=flat_target[offsets[:-1] + chosen_arr],
            offsets=offsets,
            target_pmf=flat_target,
            logged_pmf=flat(logged_pmfs),
            q_hat=flat(q_hats),
            chosen=chosen_arr,
        )

    @property
    def n(self) -> int:
        """Number of rounds."""
        return int(self.reward.shape[0])

    @property
    def weight(self) -> FloatArray:
        """Importance weights ``w_i = pi(a_i|x_i) / p_i``."""
        out: FloatArray = self.target_prob / self.propensity
        return out

    def subset(self, rows: BoolArray) -> BanditData:
        """The rounds where ``rows`` is True."""
        sizes = np.diff(self.offsets)
        flat_rows = np.repeat(rows, sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes[rows])]).astype(np.int64)

        def pick(column: FloatArray | None, mask: BoolArray) -> FloatArray | None:
            return None if column is None else column[mask]

        return BanditData(
            reward=self.reward[rows],
            propensity=self.propensity[rows],
            target_prob=self.target_prob[rows],
            offsets=offsets,
            target_pmf=self.target_pmf[flat_rows],
            logged_pmf=pick(self.logged_pmf, flat_rows),
            q_hat=pick(self.q_hat, flat_rows),
            q_hat_logged=pick(self.q_hat_logged, rows),
            chosen=None if self.chosen is None else self.chosen[rows],
        )

    def per_round_sum(self, flat: FloatArray) -> FloatArray:
        """``sum over a in A_i`` of a flat column, per round."""
        out = np.bincount(self.round_of, weights=flat, minlength=self.n)
        return out.astype(np.float64, copy=False)

    def per_round_dot(self, a: FloatArray, b: FloatArray) -> FloatArray:
        """``sum over a in A_i`` of ``a * b`` (flat columns), per round.

        Without an ``a * b`` temporary of the log's size: when every round has the same number
        of actions it is one ``einsum`` over the ``(n, K)`` views, else blocks of ~64k actions.
        """
        n = self.n
        if n and int(self.offsets[-1]) == n * int(self.offsets[1]):
            k = int(self.offsets[1])
            if np.array_equal(self.offsets, np.arange(0, n * k + 1, k)):
                out: FloatArray = np.einsum("ij,ij->i", a.reshape(n, k), b.reshape(n, k))
                return out
        result = np.empty(n, dtype=np.float64)
        block = 1 << 16
        start_round = 0
        while start_round < n:
            lo = int(self.offsets[start_round])
            end_round = int(np.searchsorted(self.offsets, lo + block, side="right")) - 1
            end_round = min(n, max(end_round, start_round + 1))
            hi = int(self.offsets[end_round])
            starts = self.offsets[start_round:end_round] - lo
            result[start_round:end_round] = np.add.reduceat(a[lo:hi] * b[lo:hi], starts)
            start_round = end_round
        return result

    def direct_method_terms(self) -> FloatArray:
        """``sum_a pi(a|x_i) q(x_i, a)`` per round (needs ``q_hat``)."""
        if self.q_hat is None:
            raise ValueError("this estimator needs reward-model predictions (q_hat)")
        return self.per_round_dot(self.target_pmf, self.q_hat)

    def residual(self) -> FloatArray:
        """``r_i - q(x_i, a_i)`` (needs ``q_hat``)."""
        if self.q_hat_logged is None:
            raise ValueError("this estimator needs reward-model predictions (q_hat)")
        out: FloatArray = self.reward - self.q_hat_logged
        return out


# ---------------------------------------------------------------------------------- estimators


Statistic = Callable[[FloatArray], FloatArray]
"""Maps term means ``(replicates, k)`` to one estimate per replicate."""


def bootstrap_intervals(
    jobs: Sequence[tuple[Sequence[FloatArray], Statistic]],
    alpha: float,
    n_bootstrap: int,
    rng: np.random.Generator | int | None,
) -> list[tuple[float, float]]:
    """Percentile intervals of several estimates over the same ``n`` rounds, in one bootstrap.

    Each job is ``(terms, statistic)``: per-round columns and the function of their means that
    gives the estimate. A replicate resamples ``n`` of the ``n`` rounds with replacement; its
    multiplicities ``c`` (``np.bincount`` of the drawn indices) give every term's mean at once as
    ``c @ terms.T / n`` (a matrix product), so many estimators and candidates cost one draw of
    ``n * n_bootstrap`` indices (int32, about 3 ns each) rather than one gather per term. Sharing
    the replicates also makes the candidates' intervals paired. Replicates are drawn in blocks
    whose index matrix stays below ``_BOOTSTRAP_BLOCK_CELLS`` entries.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 1")
    if not jobs:
        return []
    n = jobs[0][0][0].shape[0]
    if any(t.shape != (n,) for terms, _ in jobs for t in terms):
        raise ValueError("every job's terms must have one entry per round (the same n)")
    if n == 0:
        return [(float("nan"), float("nan"))] * len(jobs)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    stacked_t = np.stack([t for terms, _ in jobs for t in terms], axis=1)  # (n, K)
    spans: list[tuple[int, int]] = []
    start_col = 0
    for terms, _ in jobs:
        spans.append((start_col, start_col + len(terms)))
        start_col += len(terms)
    values = np.empty((len(jobs), n_bootstrap), dtype=np.float64)
    block = max(1, min(n_bootstrap, _BOOTSTRAP_BLOCK_CELLS // n))
    index_type = np.int32 if block * n < 2**31 else np.int64
    for start in range(0, n_bootstrap, block):
        b = min(block, n_bootstrap - start)
        index = gen.integers(0, n, size=(b, n), dtype=index_type)
        index += (np.arange(b, dtype=index_type) * n)[:, None]
        counts = np.bincount(index.ravel(), minlength=b * n).reshape(b, n)
        means = (counts @ stacked_t) / n  # (b, K)
        for j, (lo, hi) in enumerate(spans):
            values[j, start : start + b] = jobs[j][1](means[:, lo:hi])
    out = []
    for row in values:
        low, high = np.nanquantile(row, [alpha / 2.0, 1.0 - alpha / 2.0])
        out.append((float(low), float(high)))
    return out


class Estimator:
    """The shared machinery: a subclass gives ``_terms`` and ``_statistic``.

    ``_terms(data)`` returns per-round columns whose means ``m`` determine the estimate through
    ``_statistic(m)`` (``m`` has shape ``(replicates, k)``); a plain mean estimator has one term
    and the identity statistic.
    """

    name: ClassVar[str] = ""

    def _terms(self, data: BanditData) -> list[FloatArray]:
        raise NotImplementedError

    def _statistic(self, means: FloatArray) -> FloatArray:
        out: FloatArray = means[:, 0]
        return out

    def estimate_round_rewards(self, data: BanditData) -> FloatArray:
        """Per-round contributions ``v_i`` (their mean is :meth:`estimate_policy_value`)."""
        return self._terms(data)[0]

    def estimate_policy_value(self, data: BanditData) -> float:
        """The point estimate of the target policy's value (NaN on an empty log)."""
        if data.n == 0:
            return float("nan")
        means = np.array([[float(t.mean()) for t in self._terms(data)]])
        return float(self._statistic(means)[0])

    def estimate_interval(
        self,
        data: BanditData,
        alpha: float = 0.05,
        n_bootstrap: int = DEFAULT_BOOTSTRAP,
        rng: np.random.Generator | int | None = None,
    ) -> tuple[float, float]:
        """``(low, high)``: the ``1 - alpha`` percentile bootstrap interval over rounds."""
        if data.n == 0:
            return float("nan"), float("nan")
        return bootstrap_intervals([self.bootstrap_job(data)], alpha, n_bootstrap, rng)[0]

    def bootstrap_job(self, data: BanditData) -> tuple[list[FloatArray], Statistic]:
        """``(terms, statistic)`` for :func:`bootstrap_intervals` (many estimates, one draw)."""
        return self._terms(data), self._statistic

    def running_estimate(self, data: BanditData) -> FloatArray:
        """The estimate over the first ``i + 1`` rounds, for every ``i`` (in log order)."""
        if data.n == 0:
            return np.zeros(0, dtype=np.float64)
        count = np.arange(1, data.n + 1, dtype=np.float64)
        means = np.stack([np.cumsum(t) / count for t in self._terms(data)], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out: FloatArray = self._statistic(means)
        return out


def _ratio_means(means: FloatArray) -> FloatArray:
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = means[:, 0] / means[:, 1]
    return out


@dataclass(frozen=True)
class IPS(Estimator):
    """Inverse propensity scoring (Horvitz & Thompson 1952; Precup et al. 2000)::

        V_IPS = 1/n sum_i w_i r_i,   w_i = pi(a_i|x_i) / p_i

    Unbiased when ``p_i > 0`` wherever ``pi`` puts mass; its variance grows with the weights.
    """

    name: ClassVar[str] = "ips"

    def _terms(self, data: BanditData) -> list[FloatArray]:
        return [data.weight * data.reward]


@dataclass(frozen=True)
class ClippedIPS(Estimator):
    """IPS with weights clipped at ``max_weight`` (Strehl et al. 2010, "Learning from Logged
    Implicit Exploration Data", NeurIPS; Bottou et al. 2013, JMLR 14)::

        V = 1/n sum_i min(w_i, M) r_i

    Lower variance, biased downwards (for rewards >= 0) where weights exceed ``M``.
    """

    max_weight: float = 100.0
    name: ClassVar[str] = "clipped_ips"

    def __post_init__(self) -> None:
        if not self.max_weight > 0:
            raise ValueError("max_weight must be > 0")

    def _terms(self, data: BanditData) -> list[FloatArray]:
        return [np.minimum(data.weight, self.max_weight) * data.reward]


@dataclass(frozen=True)
class SNIPS(Estimator):
    """Self-normalized IPS (Swaminathan & Joachims 2015, "The Self-Normalized Estimator for
    Counterfactual Learning", NeurIPS)::

        V_SNIPS = sum_i w_i r_i / sum_i w_i

    Biased but consistent; invariant to reward shifts and robust when ``sum w / n`` drifts
    from 1. Round rewards are ``w_i r_i / mean(w)``.
    """

    name: ClassVar[str] = "snips"

    def _terms(self, data: BanditData) -> list[FloatArray]:
        w = data.weight
        return [w * data.reward, w]

    def _statistic(self, means: FloatArray) -> FloatArray:
        return _ratio_means(means)

    def estimate_round_rewards(self, data: BanditData) -> FloatArray:
        w = data.weight
        out: FloatArray = w * data.reward / w.mean()
        return out


@dataclass(frozen=True)
class DM(Estimator):
    """Direct method: the reward model's value of the target policy (Beygelzimer & Langford
    2009; Dudík et al. 2011)::

        V_DM = 1/n sum_i sum_a pi(a|x_i) q(x_i, a)

    Low variance; biased as much as the reward model is wrong.
    """

    name: ClassVar[str] = "dm"

    def _terms(self, data: BanditData) -> list[FloatArray]:
        return [data.direct_method_terms()]


@dataclass(frozen=True)
class DR(Estimator):
    """Doubly robust (Dudík, Langford & Li 2011, "Doubly Robust Policy Evaluation and
    Learning", ICML)::

        V_DR = 1/n sum_i [ sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) ]

    Unbiased when the propensities are right, whatever the reward model; the model only
    lowers the variance.
    """

    name: ClassVar[str] = "dr"

    def _terms(self, data: BanditData) -> list[FloatArray]:
        return [data.direct_method_terms() + data.weight * data.residual()]


@dataclass(frozen=True)
class SNDR(Estimator):
    """Self-normalized doubly robust (Su, Dimakopoulou, Krishnamurthy & Dudík 2020,
    "Doubly Robust Off-policy Evaluation with Shrinkage", ICML; OBP's ``SelfNormalizedDR``)::

        V_SNDR = 1/n sum_i sum_a pi(a|x_i) q(x_i, a)
                 + sum_i w_i (r_i - q(x_i, a_i)) / sum_i w_i
    """

    name: ClassVar[str] = "sndr"

    def _terms(self, data: BanditData) -> list[FloatArray]:
        w = data.weight
        return [data.direct_method_terms(), w * data.residual(), w]

    def _statistic(self, means: FloatArray) -> FloatArray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out: FloatArray = means[:, 0] + means[:, 1] / means[:, 2]
        return out

    def estimate_round_rewards(self, data: BanditData) -> FloatArray:
        w = data.weight
        out: FloatArray = data.direct_method_terms() + w * data.residual() / w.mean()
        return out


@dataclass(frozen=True)
class SwitchDR(Estimator):
    """Switch doubly robust (Wang, Agarwal & Dudík 2017, "Optimal and Adaptive Off-policy
    Evaluation in Contextual Bandits", ICML), in OBP's form::

        V_SwitchDR = 1/n sum_i [ sum_a pi(a|x_i) q(x_i, a)
                                 + 1{w_i <= tau} w_i (r_i - q(x_i, a_i)) ]

    DR where the weight is at most ``tau``, the direct method where it is larger
    (``tau = inf`` is DR, ``tau = 0`` is DM).
    """

    tau: float = 20.0
    name: ClassVar[str] = "switch_dr"

    def __post_init__(self) -> None:
        if not self.tau >= 0:
            raise ValueError("tau must be >= 0")

    def _terms(self, data: BanditData) -> list[FloatArray]:
        w = data.weight
        keep = w <= self.tau
        return [data.direct_method_terms() + np.where(keep, w * data.residual(), 0.0)]


ESTIMATORS: Final[dict[str, Callable[[], Estimator]]] = {
    "ips": IPS,
    "clipped_ips": ClippedIPS,
    "snips": SNIPS,
    "dm": DM,
    "dr": DR,
    "sndr": SNDR,
    "switch_dr": SwitchDR,
}
"""Estimator name -> constructor with default parameters."""

NEEDS_REWARD_MODEL: Final = frozenset({"dm", "dr", "sndr", "switch_dr"})


def make_estimator(name: str) -> Estimator:
    """The estimator called ``name`` with default parameters (ValueError listing the names)."""
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}") from None


def diagnostics(data: BanditData) -> dict[str, float | int]:
    """Health of the importance weights.

    * ``ess = (sum w)^2 / sum w^2`` (Kish's effective sample size) and ``ess_share = ess / n``;
    * ``mean_weight`` (about 1 when the log and the target are sound: ``E_mu[w] = 1``),
      ``max_weight``;
    * ``support_deficiency``: share of rounds where the target puts mass on an action the logger
      gave probability 0 (IPS/DR are then biased; with Loopwise's floor it is 0). Rounds whose
      log has no pmf are not counted.
    """
    n = data.n
    if n == 0:
        return {"n": 0, "ess": 0.0, "ess_share": float("nan"), "mean_weight": float("nan"),
                "max_weight": float("nan"), "support_deficiency": float("nan")}  # fmt: skip
    w = data.weight
    sum_w2 = float(np.dot(w, w))
    ess = float(w.sum()) ** 2 / sum_w2 if sum_w2 > 0 else 0.0
    deficiency = float("nan")
    if data.logged_pmf is not None:
        known = ~np.isnan(data.logged_pmf)
        blind = known & (data.logged_pmf <= 0.0) & (data.target_pmf > 0.0)
        rounds_known = data.per_round_sum(known.astype(np.float64)) > 0
        rounds_blind = data.per_round_sum(blind.astype(np.float64)) > 0
        if rounds_known.any():
            deficiency = float(rounds_blind.sum() / rounds_known.sum())
    return {
        "n": n,
        "ess": ess,
        "ess_share": ess / n,
        "mean_weight": float(w.mean()),
        "max_weight": float(w.max()),
        "support_deficiency": deficiency,
    }


# -------------------------------------------------------------------------------- reward model


class CrossFitRewardModel:
    """K-fold cross-fitted reward regressions ``q(x, a)`` on Vowpal Wabbit.

    Round ``i`` belongs to fold ``i mod folds`` (interleaved, so that drift over time is spread
    over the folds). Model ``k`` learns every round *not* in fold ``k``; round ``i`` is predicted
    by the model of its own fold, which never saw it. Use it in two passes over the log::

        model = CrossFitRewardModel()
        for i, (shared, actions, chosen, reward) in enumerate(log):   # pass 1
            model.learn(i, shared, actions, chosen, reward)
        for i, (shared, actions, _, _) in enumerate(log):             # pass 2
            q = model.predict(i, shared, actions)

    Each model is a plain VW squared-loss regression of the logged action's reward on one line
    per (round, action): the shared ``U`` (user) and ``C`` (context) namespaces and the action's
    ``A``/``B`` namespaces of
    :func:`loopwise.learners.features.vw_adf_lines`, with the ``UA``, ``CA`` and
    ``UB`` interactions. The learning rate 0.02 was chosen on the simulator (100 users x 10
    items, 1,250 training rounds, click rewards): held-out MSE against the true click
    probabilities 0.0049 versus 0.0061 for the constant mean and 0.016 with VW's default 0.5,
    which overfits sparse clicks. (``--cb_adf --cb_type dm`` was tried first: its predictions
    were biased, about -0.3 on a 0.04 click rate.)
    """

    def __init__(self, folds: int = 2, args: str = _REWARD_MODEL_ARGS, seed: int = 0) -> None:
        if folds < 2:
            raise ValueError("cross-fitting needs folds >= 2")
        self.folds = folds
        self.args = f"{args} --random_seed {seed}"
        self._models = [Workspace(self.args) for _ in range(folds)]
        self._actions = ActionTable()  # one action per item version: its text rendered once

    def _action_lines(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> list[str]:
        table = self._actions
        lines = vw_adf_lines(shared, [table.intern(a) for a in actions])
        shared_part = lines[0].removeprefix("shared ")
        return [f"{shared_part} {line}" for line in lines[1:]]

    def learn(
        self,
        round_index: int,
        shared: Mapping[str, Any],
        actions: Sequence[Action],
        chosen: int,
        reward: float,
    ) -> None:
        """Learn round ``round_index`` into every model but its own fold's."""
        fold = round_index % self.folds
        line = self._action_lines(shared, [actions[chosen]])[0]
        example = f"{float(reward):.9g} {line}"
        for k, model in enumerate(self._models):
            if k != fold:
                model.learn(example)

    def predict(
        self, round_index: int, shared: Mapping[str, Any], actions: Sequence[Action]
    ) -> FloatArray:
        """``q(x, a)`` for every action, from the model that did not learn this round."""
        model = self._models[round_index % self.folds]
        lines = self._action_lines(shared, actions)
        return np.fromiter((model.predict(line) for line in lines), np.float64, len(lines))

    def close(self) -> None:
        """Release VW's native resources."""
        for model in self._models:
            model.finish()
        self._models = []
