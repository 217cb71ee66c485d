"""``loopwise replay``: off-policy estimates of candidate policies from the propensity log.

:func:`replay` reads one or more logs (exported ``.jsonl``/``.parquet`` files, or ``kafka:`` for
the topic of ``settings``), validates every record once, scores each record with every target
(:mod:`loopwise.learners.targets`), fits a cross-fitted reward model and returns, for each
candidate, the estimates of :mod:`loopwise.learners.ope` with bootstrap intervals and the weight
diagnostics, in
docs/contracts.md's ``--json`` format::

    {"n": valid rounds, "excluded": {reason: count},
     "candidates": {name: {"ips": {"value", "ci_low", "ci_high"}, "snips": {...}, "dr": {...},
                           ..., "diagnostics": {"n", "ess", "ess_share", "mean_weight",
                                                "max_weight", "support_deficiency",
                                                "excluded": {reason: count}}}}}

Steps, in order:

1. build the targets (a bad name or file raises :class:`ReplayError` before reading the log)
   and check that every log file exists;
2. pass 1, in chunks of ``chunk`` records: validate each record
   (:func:`loopwise.learners.log_record.check_record`, the learner's rules too; a bad
   one is counted under its reason in ``excluded`` and never used), append its floats to the
   columns, ask each target for its pmf (then let progressive targets learn from it), and teach
   the reward models (every fold's model but the record's own);
3. pass 2 (only when an estimator needs the reward model): read the log again and predict
   ``q(x, a)`` for every action with the model of the record's own fold. ``kafka:`` is read once:
   its valid records are spooled to a temporary JSONL file in pass 1 so both passes see the same
   records;
4. estimate, bootstrap, diagnose.

What stays in memory: per valid round, reward, propensity, the chosen index (8 bytes each) and
the offset into the flat columns; per action of a valid round, the logged pmf, ``q(x, a)`` and
one pmf column per candidate (8 bytes each), plus one bool per round and candidate. Records
themselves are only held ``chunk`` at a time, so a log larger than memory is fine as long as
these columns fit (about ``8 * (2 + candidates) * actions`` bytes per round; a 1M-round log of
10 actions with 3 candidates: ~0.5 GB). The bootstrap draws its index matrix in blocks.

Malformed JSONL lines are counted (``invalid_json``, ``not_an_object``), as are invalid records;
the first examples of each reason, with file and line, are kept in :data:`last_problems` and
logged.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import orjson
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from loopwise.learners.log_record import (
    PMF_SUM_TOLERANCE,
    PROPENSITY_TOLERANCE,
    LogRecord,
    Numbers,
    check_record,
    plain_numbers,
    record_numbers,
)
from loopwise.learners.ope import (
    DEFAULT_BOOTSTRAP,
    NEEDS_REWARD_MODEL,
    BanditData,
    BoolArray,
    CrossFitRewardModel,
    Estimator,
    IntArray,
    bootstrap_intervals,
    diagnostics,
    make_estimator,
)
from loopwise.learners.policy import FloatArray
from loopwise.learners.targets import PmfFileTarget, TargetError, TargetPolicy, make_target

if TYPE_CHECKING:
    from loopwise.export import LogRange

__all__ = [
    "DEFAULT_ESTIMATORS",
    "KAFKA_LOG",
    "CandidateRounds",
    "ReplayDetails",
    "ReplayError",
    "check_record",  # loopwise.learners.log_record's, the one validator of a record
    "print_table",
    "replay",
    "replay_details",
]

log = logging.getLogger(__name__)

KAFKA_LOG: Final = "kafka:"
DEFAULT_ESTIMATORS: Final = ("ips", "clipped_ips", "snips", "dm", "dr", "sndr", "switch_dr")
_EXAMPLES_PER_REASON: Final = 3

last_problems: list[str] = []
"""Examples (``file:line: reason: detail``) of the excluded records of the last :func:`replay`."""


class ReplayError(ValueError):
    """The replay cannot run as asked (missing file, bad target, bad option); says what to fix."""


# ------------------------------------------------------------------------------- reading


@dataclass
class _Problems:
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    _shown: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self._shown.get(reason, 0) < _EXAMPLES_PER_REASON:
            self._shown[reason] = self._shown.get(reason, 0) + 1
            self.examples.append(f"{where}: {reason}: {detail}")


def _read_jsonl(path: Path, problems: _Problems | None) -> Iterator[_Item]:
    """``(line number, record)`` per JSON-object line; other lines are counted, never raised."""
    loads = orjson.loads
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                record = loads(line)
            except orjson.JSONDecodeError as exc:
                if not line.strip():
                    continue
                if problems is not None:
                    problems.add("invalid_json", f"{path}:{number}", str(exc))
                continue
            if type(record) is not dict:
                if problems is not None:
                    kind = type(record).__name__
                    problems.add("not_an_object", f"{path}:{number}", f"a JSON {kind}")
                continue
            yield number, record


def _read_source(
    source: str,
    settings: Any,
    problems: _Problems | None,
    kafka_range: LogRange | None = None,
) -> Iterator[_Item]:
    if source == KAFKA_LOG:
        from loopwise.export import ExportError, iter_kafka_messages

        if settings is None:
            raise ReplayError("kafka: needs settings (the broker and topic to read)")
        try:
            for msg in iter_kafka_messages(settings, kafka_range):
                where = f"kafka partition {msg.partition} offset {msg.offset}"
                if msg.record is not None:
                    yield where, msg.record
                elif problems is not None and msg.problem is not None:
                    problems.add(msg.problem[0], where, msg.problem[1])
        except ExportError as exc:
            raise ReplayError(f"kafka: {exc}") from None
        return
    path = Path(source)
    if path.suffix.lower() == ".jsonl":
        yield from _read_jsonl(path, problems)
        return
    from loopwise.export import read_log

    try:
        for number, record in enumerate(read_log(path), start=1):
            yield f"{path} row {number}", record
    except (OSError, ValueError) as exc:
        raise ReplayError(f"cannot read {str(path)!r}: {exc}") from None


def _check_sources(logs: Sequence[str]) -> None:
    if not logs:
        raise ReplayError("no log to replay: give an exported .jsonl/.parquet file or kafka:")
    for source in logs:
        if source == KAFKA_LOG:
            continue
        path = Path(source)
        if path.suffix.lower() not in (".jsonl", ".parquet"):
            raise ReplayError(
                f"log {source!r}: give a .jsonl or .parquet export, or {KAFKA_LOG} for the topic"
            )
        if not path.is_file():
            raise ReplayError(f"log file {source!r} does not exist")


# ---------------------------------------------------------------------------- validating

_NUMBER_TYPES: Final = (float, int)


@dataclass
class _ChunkColumns:
    """The numbers of a chunk of records (flat columns: ``sizes[i]`` entries per record)."""

    sizes: IntArray
    chosen: IntArray
    propensity: FloatArray
    reward: FloatArray
    logged_pmf: FloatArray  # NaN where the record has no pmf
    pmfs: tuple[Any, ...]  # the records' pmf lists (None where absent), for the type check

    @classmethod
    def of(cls, rows: Sequence[Numbers]) -> _ChunkColumns:
        if not rows:
            empty = np.zeros(0)
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty, empty, ())
        sizes, chosen, propensity, reward, pmfs = zip(*rows, strict=True)
        flat = list(
            chain.from_iterable(
                p if p is not None else repeat(math.nan, k)
                for p, k in zip(pmfs, sizes, strict=True)
            )
        )
        return cls(
            sizes=np.array(sizes, dtype=np.int64),
            chosen=np.array(chosen, dtype=np.int64),
            propensity=np.array(propensity, dtype=np.float64),
            reward=np.array(reward, dtype=np.float64),
            logged_pmf=np.array(flat, dtype=np.float64),
            pmfs=pmfs,
        )

    def numbers_ok(self) -> BoolArray:
        """check_record's numeric rules, vectorized; False where a record may break one.

        Borderline pmf sums (within 1e-12 of the tolerance, where numpy's and ``math.fsum``'s
        rounding could disagree) are False too: check_record decides those.
        """
        ok: BoolArray = (
            (self.propensity > 0.0) & (self.propensity <= 1.0) & np.isfinite(self.reward)
        )
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        has_pmf = np.array([p is not None for p in self.pmfs], dtype=np.bool_)
        if not has_pmf.any():
            return ok
        types = set(map(type, chain.from_iterable(p for p in self.pmfs if p is not None)))
        if not types <= {float, int}:  # bools, strings, None inside a pmf: check_record says
            ok &= np.array(
                [p is None or all(type(x) in _NUMBER_TYPES for x in p) for p in self.pmfs],
                dtype=np.bool_,
            )
        flat = self.logged_pmf
        in_row = np.repeat(has_pmf, self.sizes)
        entry_ok = ~in_row | (np.isfinite(flat) & (flat >= 0.0))
        entries_ok = np.logical_and.reduceat(entry_ok, starts)
        deviation = np.abs(np.add.reduceat(np.where(in_row, flat, 0.0), starts) - 1.0)
        sum_ok = (deviation <= PMF_SUM_TOLERANCE) & (np.abs(deviation - PMF_SUM_TOLERANCE) > 1e-12)
        with np.errstate(invalid="ignore"):
            match = np.abs(flat[starts + self.chosen] - self.propensity) <= PROPENSITY_TOLERANCE
        ok &= ~has_pmf | (entries_ok & sum_ok & match)
        return ok


_Item = tuple[str | int, dict[str, Any]]
"""A record and where it is: a line number of the ``label`` file, or a description."""


def _where(label: str, locator: str | int) -> str:
    return locator if isinstance(locator, str) else f"{label}:{locator}"


def _validate(
    items: Sequence[_Item], problems: _Problems | None, label: str = ""
) -> tuple[list[dict[str, Any]], _ChunkColumns]:
    """The valid records of a chunk, in order, and their columns; the others are counted.

    Valid means exactly :func:`check_record` returns None: a fast path checks structure per
    record and numbers in bulk, and every record it does not clear goes through
    :func:`check_record`, which decides (and gives the reason).
    """
    records = [record for _, record in items]
    rows = [plain_numbers(r) for r in records]
    all_plain = None not in rows
    plain: list[Numbers] = rows if all_plain else [x for x in rows if x is not None]  # type: ignore[assignment]
    cleared: list[bool] = [False] * len(plain)
    columns = None
    try:
        columns = _ChunkColumns.of(plain)
        verdicts = columns.numbers_ok()
        if all_plain and bool(verdicts.all()):
            return records, columns
        cleared = verdicts.tolist()
    except (OverflowError, TypeError, ValueError):  # e.g. an int too large for a float
        columns = None
    kept: list[dict[str, Any]] = []
    fast = iter(cleared)
    for (locator, record), row in zip(items, rows, strict=True):
        if row is not None and next(fast) and columns is not None:
            kept.append(record)
            continue
        bad = check_record(record)
        if bad is not None:
            if problems is not None:
                problems.add(bad[0], _where(label, locator), bad[1])
            continue
        kept.append(record)
    return kept, _ChunkColumns.of([record_numbers(r) for r in kept])


class _Typed(Sequence[LogRecord]):
    """A chunk's valid records as :class:`LogRecord` objects, built on first use.

    Bulk targets (``uniform``, ``logged``) read only the chunk's columns: a replay with only
    those never pays for building the objects (~1.6 us a record, ~15% of its time).
    """

    __slots__ = ("_dicts", "_records")

    def __init__(self, dicts: list[dict[str, Any]]) -> None:
        self._dicts = dicts
        self._records: list[LogRecord] | None = None

    def _built(self) -> list[LogRecord]:
        if self._records is None:  # the dicts passed check_record (bulk or single)
            self._records = [LogRecord.from_dict(d, check=False) for d in self._dicts]
        return self._records

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, index: Any) -> Any:
        return self._built()[index]

    def __iter__(self) -> Iterator[LogRecord]:
        return iter(self._built())


def _chunks(
    source: str,
    settings: Any,
    problems: _Problems | None,
    size: int,
    kafka_range: LogRange | None = None,
) -> Iterator[list[_Item]]:
    """Records ``size`` at a time."""
    batch: list[_Item] = []
    for item in _read_source(source, settings, problems, kafka_range):
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the log is read.

    A chunk holds thousands of live dicts and lists, and every 700 allocations the collector
    would walk them again (measured: parsing 2.6x slower with chunks of 1,000 records). Parsed
    JSON holds no reference cycles; the collector runs again when the pass ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------- accumulating


class _Columns:
    """Per-chunk numpy arrays of the valid rounds, concatenated at the end."""

    def __init__(self, n_targets: int) -> None:
        self.reward: list[np.ndarray] = []
        self.propensity: list[np.ndarray] = []
        self.chosen: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []
        self.logged_pmf: list[np.ndarray] = []
        self.target_pmf: list[list[np.ndarray]] = [[] for _ in range(n_targets)]
        self.target_ok: list[list[np.ndarray]] = [[] for _ in range(n_targets)]
        self.q_hat: list[np.ndarray] = []
        self.with_model = False

    def add(self, chunk: _ChunkColumns) -> None:
        self.reward.append(chunk.reward)
        self.propensity.append(chunk.propensity)
        self.chosen.append(chunk.chosen)
        self.sizes.append(chunk.sizes)
        self.logged_pmf.append(chunk.logged_pmf)

    @staticmethod
    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _progress(enabled: bool, console: Console | None) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        TextColumn("{task.completed:,} records"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )


# ---------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class CandidateRounds:
    """One candidate's rounds, for plots: the rounds it scored, in log order."""

    rounds: IntArray
    """Index of each scored round among the valid rounds of the log."""
    weight: FloatArray
    """Importance weight ``pi(a_i|x_i) / p_i`` of each scored round."""
    running: dict[str, FloatArray]
    """Estimator name -> its estimate over the first ``j + 1`` scored rounds."""


@dataclass(frozen=True)
class ReplayDetails:
    """Per-round data behind a :func:`replay` result (``--report`` plots it)."""

    reward: FloatArray
    """The logged reward of every valid round, in log order (the on-policy curve)."""
    candidates: dict[str, CandidateRounds]


def replay(
    logs: Sequence[str],
    targets: Sequence[str],
    settings: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Estimate every target's value on the logs; the JSON result of :func:`replay_details`."""
    result, _ = replay_details(logs, targets, settings, keep_rounds=False, **options)
    return result


def replay_details(
    logs: Sequence[str],
    targets: Sequence[str],
    settings: Any = None,
    *,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    chunk: int = 1_000,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    alpha: float = 0.05,
    seed: int = 0,
    folds: int = 2,
    progress: bool = True,
    console: Console | None = None,
    keep_rounds: bool = True,
    kafka_range: LogRange | None = None,
) -> tuple[dict[str, Any], ReplayDetails | None]:
    """Estimate every target's value on the logs (see the module docstring for the steps).

    ``logs``: exported ``.jsonl``/``.parquet`` paths or ``kafka:`` (read with ``settings``);
    ``targets``: names for :func:`loopwise.learners.targets.make_target`; ``estimators``: names of
    :data:`loopwise.learners.ope.ESTIMATORS`; ``chunk``: records held at a time; ``n_bootstrap`` and
    ``alpha``: the percentile bootstrap (``1 - alpha`` intervals, one shared draw for every
    candidate and estimator); ``seed``: bootstrap and VW seeds; ``folds``: cross-fitting folds
    of the reward model; ``keep_rounds``: also return the per-round :class:`ReplayDetails`;
    ``kafka_range``: the :class:`loopwise.export.LogRange` to read for ``kafka:`` (None: all).

    Raises :class:`ReplayError` for what must be fixed before anything can be estimated; bad
    records and lines are counted in ``excluded`` instead.
    """
    if not targets:
        raise ReplayError("no target to evaluate: give at least one --target (e.g. uniform)")
    if len(set(targets)) != len(targets):
        raise ReplayError(f"a target is given twice: {list(targets)}")
    if chunk < 1:
        raise ReplayError("chunk must be >= 1")
    if n_bootstrap < 1:
        raise ReplayError(f"n_bootstrap={n_bootstrap}: need at least 1 bootstrap replicate")
    if not 0.0 < alpha < 1.0:
        raise ReplayError(f"alpha={alpha}: must be in (0, 1)")
    try:
        estimator_objects = {name: make_estimator(name) for name in estimators}
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    if not estimator_objects:
        raise ReplayError("no estimator given")
    _check_sources(logs)
    if kafka_range is not None and not kafka_range.everything and KAFKA_LOG not in logs:
        raise ReplayError(
            f"a time/offset/partition range applies to {KAFKA_LOG} only; "
            "an exported file holds the range it was exported with"
        )
    try:
        key = _snapshot_key(settings)
        target_objects = [make_target(spec, seed=seed, snapshot_key=key) for spec in targets]
    except TargetError as exc:
        raise ReplayError(str(exc)) from None
    need_model = bool(NEEDS_REWARD_MODEL & set(estimator_objects))
    model = CrossFitRewardModel(folds=folds, seed=seed) if need_model else None
    problems = _Problems()
    columns = _Columns(len(target_objects))
    columns.with_model = need_model
    spool_path: str | None = None
    try:
        with _progress(progress, console) as bar:
            spool = None
            if need_model and KAFKA_LOG in logs:
                fd, spool_path = tempfile.mkstemp(prefix="loopwise-replay-", suffix=".jsonl")
                spool = os.fdopen(fd, "wb", buffering=1 << 20)
            task = bar.add_task("replay: scoring", total=None)
            with _gc_paused():
                chunks = _valid_chunks(logs, settings, chunk, problems, (bar, task), kafka_range)
                n_valid = _pass_one(chunks, target_objects, model, columns, spool)
            if spool is not None:
                spool.close()
            if model is not None:
                task2 = bar.add_task("replay: reward model", total=n_valid)
                with _gc_paused():
                    chunks = _valid_chunks(
                        logs, settings, chunk, None, (bar, task2), spool_path=spool_path
                    )
                    _pass_two(chunks, model, columns)
    finally:
        if model is not None:
            model.close()
        if spool_path is not None:
            os.unlink(spool_path)
    last_problems[:] = problems.examples
    for example in problems.examples:
        log.warning("replay excluded %s", example)
    return _estimate(
        columns,
        target_objects,
        estimator_objects,
        problems,
        n_valid,
        n_bootstrap,
        alpha,
        seed,
        keep_rounds,
    )


_Chunk = tuple[int, str, list[dict[str, Any]], _ChunkColumns]
"""A chunk of valid records: the index of its first record, its log, the records, their columns."""


def _valid_chunks(
    logs: Sequence[str],
    settings: Any,
    chunk_size: int,
    problems: _Problems | None,
    progress: tuple[Progress, Any],
    kafka_range: LogRange | None = None,
    spool_path: str | None = None,
) -> Iterator[_Chunk]:
    """Every chunk of valid records of the logs, in order; the progress task counts the
    records done. With ``spool_path``, ``kafka:`` is read back from there (pass 1's spool)."""
    bar, task = progress
    done = 0
    for source in logs:
        path = spool_path if spool_path is not None and source == KAFKA_LOG else source
        for items in _chunks(path, settings, problems, chunk_size, kafka_range):
            records, columns = _validate(items, problems, source)
            if not records:
                continue
            yield done, source, records, columns
            done += len(records)
            bar.update(task, completed=done)


def _pass_one(
    chunks: Iterator[_Chunk],
    targets: Sequence[TargetPolicy],
    model: CrossFitRewardModel | None,
    columns: _Columns,
    spool: Any,
) -> int:
    n_valid = 0
    for start, source, records, chunk in chunks:
        columns.add(chunk)
        typed = _Typed(records)
        for t, target in enumerate(targets):
            pmf, scored = target.score(typed, chunk.sizes, chunk.logged_pmf)
            columns.target_pmf[t].append(pmf)
            columns.target_ok[t].append(scored)
        if model is not None:
            for i, record in enumerate(typed, start=start):
                model.learn(
                    i,
                    record.shared(),
                    record.action_list(),
                    record.chosen,
                    float(record.reward),
                )
        if spool is not None and source == KAFKA_LOG:
            spool.write(b"".join(orjson.dumps(r) + b"\n" for r in records))
        n_valid = start + len(records)
    return n_valid


def _pass_two(chunks: Iterator[_Chunk], model: CrossFitRewardModel, columns: _Columns) -> None:
    for start, _, records, _ in chunks:
        q = [
            model.predict(j, r.shared(), r.action_list())
            for j, r in enumerate(_Typed(records), start=start)
        ]
        columns.q_hat.append(np.concatenate(q))


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _estimate(
    columns: _Columns,
    targets: Sequence[TargetPolicy],
    estimators: Mapping[str, Estimator],
    problems: _Problems,
    n_valid: int,
    n_bootstrap: int,
    alpha: float,
    seed: int,
    keep_rounds: bool,
) -> tuple[dict[str, Any], ReplayDetails | None]:
    reward = columns.cat(columns.reward, np.float64)
    propensity = columns.cat(columns.propensity, np.float64)
    chosen = columns.cat(columns.chosen, np.int64)
    sizes = columns.cat(columns.sizes, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    logged_pmf = columns.cat(columns.logged_pmf, np.float64)
    q_hat = columns.cat(columns.q_hat, np.float64) if columns.with_model else None
    if q_hat is not None and q_hat.shape != logged_pmf.shape:
        raise ReplayError("the log changed between the two passes (reward-model predictions)")
    result: dict[str, Any] = {
        "n": n_valid,
        "excluded": dict(sorted(problems.counts.items())),
        "candidates": {},
    }
    # One bootstrap per set of rounds: candidates that scored every round share their draw.
    datasets: list[BanditData] = []
    scored_rows: list[IntArray] = []
    for t in range(len(targets)):
        target_pmf = columns.cat(columns.target_pmf[t], np.float64)
        ok = columns.cat(columns.target_ok[t], np.bool_)
        data = BanditData(
            reward=reward,
            propensity=propensity,
            target_prob=target_pmf[offsets[:-1] + chosen] if n_valid else np.zeros(0),
            offsets=offsets,
            target_pmf=target_pmf,
            logged_pmf=logged_pmf,
            q_hat=q_hat,
            chosen=chosen,
        )
        rows = np.flatnonzero(ok)
        datasets.append(data if len(rows) == n_valid else data.subset(ok))
        scored_rows.append(rows)
    intervals = _shared_intervals(datasets, estimators, n_bootstrap, alpha, seed)
    details = ReplayDetails(reward=reward, candidates={}) if keep_rounds else None
    for t, target in enumerate(targets):
        data = datasets[t]
        entry: dict[str, Any] = {}
        for name, estimator in estimators.items():
            low, high = intervals[t][name]
            entry[name] = {
                "value": _json_float(estimator.estimate_policy_value(data)),
                "ci_low": _json_float(low),
                "ci_high": _json_float(high),
            }
        diag: dict[str, Any] = {
            key: (_json_float(float(v)) if isinstance(v, float) else v)
            for key, v in diagnostics(data).items()
        }
        diag["excluded"] = dict(sorted(target.excluded.items()))
        if isinstance(target, PmfFileTarget):
            diag["pmf_file_unused"] = target.unused
        entry["diagnostics"] = diag
        result["candidates"][target.name] = entry
        if details is not None:
            details.candidates[target.name] = CandidateRounds(
                rounds=scored_rows[t],
                weight=data.weight,
                running={name: e.running_estimate(data) for name, e in estimators.items()},
            )
    return result, details


def _shared_intervals(
    datasets: Sequence[BanditData],
    estimators: Mapping[str, Estimator],
    n_bootstrap: int,
    alpha: float,
    seed: int,
) -> list[dict[str, tuple[float, float]]]:
    """Bootstrap intervals per candidate and estimator; one draw per distinct set of rounds."""
    out: list[dict[str, tuple[float, float]]] = [{} for _ in datasets]
    groups: dict[int, list[int]] = {}
    for t, data in enumerate(datasets):
        # Candidates that kept every round hold the same n and the same rounds.
        key = -1 if data.n == datasets[0].n and data.reward is datasets[0].reward else t
        groups.setdefault(key, []).append(t)
    for members in groups.values():
        jobs = [
            (t, name, estimator.bootstrap_job(datasets[t]))
            for t in members
            for name, estimator in estimators.items()
        ]
        bounds = bootstrap_intervals(
            [job for _, _, job in jobs], alpha, n_bootstrap, np.random.default_rng(seed)
        )
        for (t, name, _), interval in zip(jobs, bounds, strict=True):
            out[t][name] = interval
    return out


# ------------------------------------------------------------------------------- rendering


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def print_table(result: Mapping[str, Any], console: Console | None = None) -> None:
    """Render a :func:`replay` result: candidate x estimator (value, 95% CI), then diagnostics."""
    out = console or Console()
    estimates = Table(title=f"Off-policy estimates ({result['n']:,} rounds)")
    estimates.add_column("candidate")
    estimates.add_column("estimator")
    estimates.add_column("value", justify="right")
    estimates.add_column("95% CI", justify="right")
    for name, entry in result["candidates"].items():
        first = True
        for estimator, cell in entry.items():
            if estimator == "diagnostics":
                continue
            ci = f"[{_fmt(cell['ci_low'])}, {_fmt(cell['ci_high'])}]"
            estimates.add_row(name if first else "", estimator, _fmt(cell["value"]), ci)
            first = False
        estimates.add_section()
    out.print(estimates)
    diag_table = Table(title="Importance-weight diagnostics")
    for column in ("candidate", "n", "ESS", "ESS/n", "mean w", "max w", "no support", "excluded"):
        diag_table.add_column(column, justify="left" if column == "candidate" else "right")
    for name, entry in result["candidates"].items():
        d = entry["diagnostics"]
        excluded = ", ".join(f"{k}={v}" for k, v in d.get("excluded", {}).items()) or "0"
        diag_table.add_row(
            name,
            f"{d['n']:,}",
            _fmt(d["ess"], 1),
            _fmt(d["ess_share"], 3),
            _fmt(d["mean_weight"], 3),
            _fmt(d["max_weight"], 2),
            _fmt(d["support_deficiency"], 3),
            excluded,
        )
    out.print(diag_table)
    if result["excluded"]:
        skipped = ", ".join(f"{k}={v:,}" for k, v in result["excluded"].items())
        out.print(f"[yellow]excluded records:[/yellow] {skipped}")


def _snapshot_key(settings: Any) -> bytes | None:
    """``LOOPWISE_SNAPSHOT_KEY``, from the settings or, without them, the environment."""
    if settings is not None:
        key: bytes | None = settings.snapshot_key_bytes
        return key
    raw = os.environ.get("LOOPWISE_SNAPSHOT_KEY")
    return raw.encode() if raw else None
