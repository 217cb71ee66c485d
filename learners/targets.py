"""Target (candidate) policies for off-policy evaluation: a pmf over each logged record's actions.

Every target answers the same two calls, record by record in log order::

    pmf = target.pmf(record)     # pi(.|x) over record.actions, or None: excluded
    target.update(record)        # progressive targets learn from the logged outcome; else no-op

where ``record`` is a valid :class:`~loopwise.learners.log_record.LogRecord`.

``pmf`` returns None for a record the target cannot score, and counts why in
``target.excluded`` (``{reason: count}``); such rounds leave the candidate's estimates.
``target.score(records, sizes, logged_pmf)`` does both for a chunk of valid records (the replay
calls it): record by record for policies, in bulk with numpy for ``uniform`` and ``logged``.

Names (as on the command line, see :func:`make_target`):

* ``uniform`` -- ``1 / K`` on each of the ``K`` actions;
* ``logged`` -- the logged pmf (its IPS weights are all 1: IPS/SNIPS reproduce the on-policy
  average reward exactly, a sanity check of the log);
* ``pmf:FILE`` -- a per-decision pmf file, JSON lines ``{"decision_id", "pmf"}`` aligned with the
  record's actions (the whole file is held in memory as a dict);
* ``snapshot:FILE`` -- a saved Loopwise policy (:func:`loopwise.learners.policy.restore`), frozen;
* ``vw:ARGS`` -- a :class:`~loopwise.learners.vw_policy.VWPolicy` with those VW arguments (they must
  contain ``--cb_explore_adf``), trained **progressively** on the log: each record is scored
  before the policy learns from it (logged action, propensity and reward), so the estimate is
  that of the learning policy run on this traffic (counterfactual learning);
* ``linucb`` (or ``linucb:alpha=0.3,epsilon=0.05``) --
  :class:`~loopwise.learners.linucb.LinUCBPolicy`
  on river, progressive too.

A policy sees a record's :meth:`~loopwise.learners.log_record.LogRecord.shared` and
:meth:`~loopwise.learners.log_record.LogRecord.action_list`, as the learner does and as when the
decision was made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import orjson

from loopwise.learners.log_record import LogRecord
from loopwise.learners.policy import Action, FloatArray, Policy, SnapshotError, restore

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

__all__ = [
    "LinUCBTarget",
    "LoggedTarget",
    "PmfFileTarget",
    "SnapshotTarget",
    "TargetError",
    "TargetPolicy",
    "UniformTarget",
    "VWTarget",
    "make_target",
]

_PMF_TOLERANCE = 1e-6


class TargetError(ValueError):
    """A target cannot be built (bad name, missing or malformed file); says what to fix."""


@runtime_checkable
class TargetPolicy(Protocol):
    """What every target answers (see the module docstring)."""

    name: str
    excluded: dict[str, int]

    def pmf(self, record: LogRecord) -> FloatArray | None:
        """``pi(.|x)`` over ``record.actions``, or None (the reason is counted)."""
        ...

    def update(self, record: LogRecord) -> None:
        """Learn from the logged outcome (progressive targets), after :meth:`pmf`."""
        ...

    def score(
        self, records: Sequence[LogRecord], sizes: IntArray, logged_pmf: FloatArray
    ) -> tuple[FloatArray, BoolArray]:
        """A chunk at once: ``pmf`` then ``update`` per record; ``(flat pmf, scored mask)``."""
        ...


class _Target:
    name = ""
    validated = False
    """True when every pmf returned is already checked (length K, >= 0, sums to 1)."""

    def __init__(self) -> None:
        self.excluded: dict[str, int] = {}

    def _exclude(self, reason: str, count: int = 1) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + count

    def pmf(self, record: LogRecord) -> FloatArray | None:
        """``pi(.|x)`` over ``record.actions``, or None (the reason is counted)."""
        raise NotImplementedError

    def update(self, record: LogRecord) -> None:
        """Frozen target: nothing to learn."""

    def score(
        self,
        records: Sequence[LogRecord],
        sizes: IntArray,
        logged_pmf: FloatArray,
    ) -> tuple[FloatArray, BoolArray]:
        """Score a chunk of valid records in log order: ``(flat pmf, scored)``.

        Record by record: :meth:`pmf` (checked unless :attr:`validated`), then :meth:`update`,
        so progressive targets never see a record's outcome before scoring it. ``flat`` holds
        ``sizes[i]`` entries per record (zeros where it was not scored); ``logged_pmf`` is the
        records' flat logged pmf (NaN where absent), for targets that score in bulk.
        """
        parts: list[FloatArray] = []
        scored = np.ones(len(records), dtype=np.bool_)
        for i, record in enumerate(records):
            k = int(sizes[i])
            pmf = self.pmf(record)
            if pmf is not None and not self.validated and not _valid_pmf(pmf, k):
                self._exclude("target_pmf_invalid")
                pmf = None
            if pmf is None:
                scored[i] = False
                pmf = np.zeros(k)
            parts.append(pmf)
            self.update(record)
        flat = np.concatenate(parts) if parts else np.zeros(0)
        return flat, scored


def _valid_pmf(pmf: FloatArray, k: int) -> bool:
    return bool(
        pmf.shape == (k,)
        and np.all(np.isfinite(pmf))
        and pmf.min() >= 0
        and abs(float(pmf.sum()) - 1.0) <= _PMF_TOLERANCE
    )


class UniformTarget(_Target):
    """``pi(a|x) = 1 / K``."""

    name = "uniform"
    validated = True

    def pmf(self, record: LogRecord) -> FloatArray | None:
        k = len(record.actions)
        return np.full(k, 1.0 / k)

    def score(
        self, records: Sequence[LogRecord], sizes: IntArray, logged_pmf: FloatArray
    ) -> tuple[FloatArray, BoolArray]:
        """In bulk: ``1 / K_i`` repeated ``K_i`` times."""
        flat: FloatArray = np.repeat(1.0 / sizes, sizes)
        return flat, np.ones(len(records), dtype=np.bool_)


class LoggedTarget(_Target):
    """The logger's own pmf (records without a ``pmf`` are excluded: ``logged_pmf_missing``)."""

    name = "logged"
    validated = True  # the record's pmf passed loopwise.learners.log_record.check_record

    def pmf(self, record: LogRecord) -> FloatArray | None:
        pmf = record.pmf
        if pmf is None:
            self._exclude("logged_pmf_missing")
            return None
        return np.asarray(pmf, dtype=np.float64)

    def score(
        self, records: Sequence[LogRecord], sizes: IntArray, logged_pmf: FloatArray
    ) -> tuple[FloatArray, BoolArray]:
        """In bulk: the logged pmf column; records without one are not scored."""
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        scored: BoolArray = ~np.isnan(logged_pmf[offsets]) if len(records) else np.ones(0, bool)
        missing = int(len(records) - scored.sum())
        if missing:
            self._exclude("logged_pmf_missing", missing)
        flat: FloatArray = np.where(np.isnan(logged_pmf), 0.0, logged_pmf)
        return flat, scored


class PmfFileTarget(_Target):
    """A per-decision pmf file: JSON lines ``{"decision_id": str, "pmf": [float, ...]}``.

    The file is validated when loaded (a line that is not such an object, a pmf with a negative
    or non-finite entry or not summing to 1, a repeated decision_id: :class:`TargetError` naming
    the file and line). Records whose decision_id is absent from the file are excluded as
    ``pmf_file_missing_decision``, pmfs whose length differs from the record's actions as
    ``pmf_file_length_mismatch``; :attr:`unused` counts file entries no record asked for.
    """

    validated = True  # at load time; the length per record in pmf()

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = f"pmf:{path}"
        self._pmfs = _load_pmf_file(self.path)
        self._used: set[str] = set()

    @property
    def unused(self) -> int:
        """File entries whose decision_id no scored record had."""
        return len(self._pmfs) - len(self._used)

    def pmf(self, record: LogRecord) -> FloatArray | None:
        decision_id = record.decision_id
        pmf = self._pmfs.get(decision_id) if isinstance(decision_id, str) else None
        if pmf is None:
            self._exclude("pmf_file_missing_decision")
            return None
        assert isinstance(decision_id, str)
        self._used.add(decision_id)
        if len(pmf) != len(record.actions):
            self._exclude("pmf_file_length_mismatch")
            return None
        return pmf


def _load_pmf_file(path: Path) -> dict[str, FloatArray]:
    if not path.is_file():
        raise TargetError(f"pmf file {str(path)!r} does not exist")
    out: dict[str, FloatArray] = {}
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise TargetError(f"{where}: not valid JSON: {exc}") from None
            if not isinstance(item, dict) or not isinstance(item.get("decision_id"), str):
                raise TargetError(f'{where}: need an object with a string "decision_id"')
            values = item.get("pmf")
            if not isinstance(values, list) or not values:
                raise TargetError(f'{where}: "pmf" must be a non-empty list of numbers')
            if not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            ):
                raise TargetError(f'{where}: "pmf" entries must be finite numbers')
            pmf = np.asarray(values, dtype=np.float64)
            if pmf.min() < 0 or abs(float(pmf.sum()) - 1.0) > _PMF_TOLERANCE:
                raise TargetError(
                    f'{where}: "pmf" must be >= 0 and sum to 1 (sum is {float(pmf.sum()):.9g})'
                )
            if item["decision_id"] in out:
                raise TargetError(f"{where}: decision_id {item['decision_id']!r} repeated")
            out[item["decision_id"]] = pmf
    if not out:
        raise TargetError(f"pmf file {str(path)!r} holds no pmf")
    return out


class _PolicyTarget(_Target):
    """A Loopwise :class:`~loopwise.learners.policy.Policy`; ``progressive`` ones learn after
    scoring."""

    def __init__(self, name: str, policy: Policy, progressive: bool) -> None:
        super().__init__()
        self.name = name
        self.policy = policy
        self.progressive = progressive

    def pmf(self, record: LogRecord) -> FloatArray | None:
        return self._pmf(record.shared(), record.action_list())

    def _pmf(self, shared: Mapping[str, Any], actions: Sequence[Action]) -> FloatArray | None:
        p = np.asarray(self.policy.pmf(shared, list(actions)), dtype=np.float64)
        total = float(p.sum())
        if p.shape != (len(actions),) or not (total > 0 and math.isfinite(total)):
            self._exclude("policy_pmf_invalid")
            return None
        out: FloatArray = p / total
        if not _valid_pmf(out, len(actions)):  # a negative entry
            self._exclude("policy_pmf_invalid")
            return None
        return out

    def update(self, record: LogRecord) -> None:
        if self.progressive:
            self._learn(record, record.shared(), record.action_list())

    def _learn(
        self, record: LogRecord, shared: Mapping[str, Any], actions: Sequence[Action]
    ) -> None:
        self.policy.learn(
            shared,
            list(actions),
            record.chosen,
            float(record.propensity),
            float(record.reward),
        )

    def score(
        self, records: Sequence[LogRecord], sizes: IntArray, logged_pmf: FloatArray
    ) -> tuple[FloatArray, BoolArray]:
        """Record by record: score, then (progressive) learn; the features are built once."""
        parts: list[FloatArray] = []
        scored = np.ones(len(records), dtype=np.bool_)
        for i, record in enumerate(records):
            shared, actions = record.shared(), record.action_list()
            pmf = self._pmf(shared, actions)
            if pmf is None:
                scored[i] = False
                pmf = np.zeros(int(sizes[i]))
            parts.append(pmf)
            if self.progressive:
                self._learn(record, shared, actions)
        return (np.concatenate(parts) if parts else np.zeros(0)), scored


class SnapshotTarget(_PolicyTarget):
    """A saved policy snapshot (file bytes from ``policy.snapshot()``), frozen."""

    def __init__(self, path: str | Path, key: bytes | None = None) -> None:
        file = Path(path)
        if not file.is_file():
            raise TargetError(f"snapshot file {str(file)!r} does not exist")
        try:  # data only; with a key, it must be signed with it (learners/snapshot.py)
            policy = restore(file.read_bytes(), key=key)
        except SnapshotError as exc:
            raise TargetError(f"snapshot file {str(file)!r}: {exc}") from None
        super().__init__(f"snapshot:{path}", policy, progressive=False)


class VWTarget(_PolicyTarget):
    """``VWPolicy(args=ARGS)``, learning progressively (score first, then learn)."""

    def __init__(self, args: str, seed: int = 0) -> None:
        from loopwise.learners.vw_policy import VWPolicy

        try:
            policy = VWPolicy(args=args, seed=seed)
        except (ValueError, RuntimeError) as exc:
            raise TargetError(f"vw:{args}: {exc}") from None
        super().__init__(f"vw:{args}", policy, progressive=True)


class LinUCBTarget(_PolicyTarget):
    """``LinUCBPolicy(**params)`` on river, learning progressively."""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        from loopwise.learners.linucb import LinUCBPolicy

        try:
            policy = LinUCBPolicy(**dict(params or {}))
        except (TypeError, ValueError) as exc:
            raise TargetError(f"linucb: {exc}") from None
        super().__init__("linucb", policy, progressive=True)


def _parse_params(text: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            params[key.strip()] = float(value)
        except ValueError:
            raise TargetError(f"linucb parameter {part!r}: write name=number") from None
    if "dim" in params:
        params["dim"] = int(params["dim"])
    return params


def make_target(spec: str, *, seed: int = 0, snapshot_key: bytes | None = None) -> TargetPolicy:
    """The target named ``spec``: ``uniform``, ``logged``, ``pmf:FILE``, ``snapshot:FILE``
    (verified with ``snapshot_key``), ``vw:ARGS``, ``linucb`` or ``linucb:name=value,...``
    (:class:`TargetError` otherwise)."""
    kind, _, rest = spec.partition(":")
    if spec == "uniform":
        return UniformTarget()
    if spec == "logged":
        return LoggedTarget()
    if kind == "pmf" and rest:
        return PmfFileTarget(rest)
    if kind == "snapshot" and rest:
        return SnapshotTarget(rest, snapshot_key)
    if kind == "vw" and rest:
        return VWTarget(rest, seed=seed)
    if kind == "linucb":
        target = LinUCBTarget(_parse_params(rest))
        target.name = spec
        return target
    raise TargetError(
        f"unknown target {spec!r}; use uniform, logged, pmf:FILE, snapshot:FILE, "
        "vw:ARGS (e.g. 'vw:--cb_explore_adf --squarecb') or linucb"
    )
