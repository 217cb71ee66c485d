"""``loopwise replay``: off-policy estimates of candidate policies from the propensity log.

:func:`replay` reads one or more logs (exported ``.jsonl``/``.parquet`` files, or ``kafka:`` for
the topic of ``settings``), validates every record once, scores each record with every target
(:mod:`learners.targets`), fits a cross-fitted reward model and returns, for each candidate,
the estimates of :mod:`learners.ope` with bootstrap intervals and the weight diagnostics, in
DESIGN.md's ``--json`` format::

    {"n": valid rounds, "excluded": {reason: count},
     "candidates": {name: {"ips": {"value", "ci_low", "ci_high"}, "snips": {...}, "dr": {...},
                           ..., "diagnostics": {"n", "ess", "ess_share", "mean_weight",
                                                "max_weight", "support_deficiency",
                                                "excluded": {reason: count}}}}}

Steps, in order:

1. build the targets (a bad name or file raises :class:`ReplayError` before reading the log)
   and check that every log file exists;
2. pass 1, in chunks of ``chunk`` records: validate each record (:func:`check_record`; a bad
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

import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from learners.ope import (
    DEFAULT_BOOTSTRAP,
    NEEDS_REWARD_MODEL,
    BanditData,
    CrossFitRewardModel,
    diagnostics,
    make_estimator,
)
from learners.policy import FloatArray
from learners.targets import (
    PmfFileTarget,
    TargetError,
    TargetPolicy,
    make_target,
    record_actions,
    record_shared,
)

__all__ = [
    "DEFAULT_ESTIMATORS",
    "KAFKA_LOG",
    "ReplayError",
    "check_record",
    "print_table",
    "replay",
]

log = logging.getLogger(__name__)

KAFKA_LOG: Final = "kafka:"
DEFAULT_ESTIMATORS: Final = ("ips", "clipped_ips", "snips", "dm", "dr", "sndr", "switch_dr")
PROPENSITY_TOLERANCE: Final = 1e-9
PMF_SUM_TOLERANCE: Final = 1e-6
_EXAMPLES_PER_REASON: Final = 3

last_problems: list[str] = []
"""Examples (``file:line: reason: detail``) of the excluded records of the last :func:`replay`."""


class ReplayError(ValueError):
    """The replay cannot run as asked (missing file, bad target, bad option); says what to fix."""


# ------------------------------------------------------------------------------ validation


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_record(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """None when the record is usable, else ``(reason, detail)``.

    The rules: ``actions`` a non-empty list of objects with an ``id``; ``context`` an object;
    ``chosen`` an int index into ``actions``; ``propensity`` a number in ``(0, 1]``; ``pmf``, when
    present, one finite number >= 0 per action summing to 1 with ``pmf[chosen]`` equal to
    ``propensity`` (within 1e-9); ``reward`` a finite number.
    """
    actions = record.get("actions")
    if not isinstance(actions, list) or not actions:
        return "invalid_actions", "actions must be a non-empty list"
    if not all(isinstance(a, dict) and "id" in a for a in actions):
        return "invalid_actions", 'every action must be an object with an "id"'
    if not isinstance(record.get("context", {}), dict):
        return "invalid_context", "context must be an object"
    chosen = record.get("chosen")
    if chosen is None:
        return "missing_chosen", "no chosen"
    if not isinstance(chosen, int) or isinstance(chosen, bool) or not 0 <= chosen < len(actions):
        return "chosen_out_of_range", f"chosen={chosen!r} with {len(actions)} actions"
    propensity = record.get("propensity")
    if propensity is None:
        return "missing_propensity", "no propensity"
    if not _number(propensity) or not 0.0 < propensity <= 1.0:  # NaN fails the comparison
        return "invalid_propensity", f"propensity={propensity!r} is not in (0, 1]"
    pmf = record.get("pmf")
    if pmf is not None:
        if (
            not isinstance(pmf, list)
            or len(pmf) != len(actions)
            or not all(_number(p) and math.isfinite(p) and p >= 0 for p in pmf)
            or abs(math.fsum(pmf) - 1.0) > PMF_SUM_TOLERANCE
        ):
            return "invalid_pmf", "pmf must hold one probability per action, summing to 1"
        if abs(pmf[chosen] - propensity) > PROPENSITY_TOLERANCE:
            return (
                "propensity_pmf_mismatch",
                f"propensity={propensity!r} but pmf[{chosen}]={pmf[chosen]!r}",
            )
    reward = record.get("reward")
    if reward is None:
        return "missing_reward", "no reward"
    if not _number(reward) or not math.isfinite(reward):
        return "invalid_reward", f"reward={reward!r} is not a finite number"
    return None


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


def _read_jsonl(path: Path, problems: _Problems | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` per JSON-object line; other lines are counted, never raised."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                if problems is not None:
                    problems.add("invalid_json", where, str(exc))
                continue
            if not isinstance(record, dict):
                if problems is not None:
                    problems.add("not_an_object", where, f"a JSON {type(record).__name__}")
                continue
            yield where, record


def _read_source(
    source: str, settings: Any, problems: _Problems | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    if source == KAFKA_LOG:
        from loopwise.export import iter_kafka_log

        if settings is None:
            raise ReplayError("kafka: needs settings (the broker and topic to read)")
        for offset, record in enumerate(iter_kafka_log(settings)):
            yield f"kafka record {offset}", record
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


# ---------------------------------------------------------------------------- accumulating


class _Columns:
    """Growable float/int columns: per-chunk numpy arrays, concatenated at the end."""

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

    @staticmethod
    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


class _Chunk:
    """One chunk's rows as Python lists, turned into numpy arrays by :meth:`flush`."""

    def __init__(self, n_targets: int) -> None:
        self.reward: list[float] = []
        self.propensity: list[float] = []
        self.chosen: list[int] = []
        self.sizes: list[int] = []
        self.logged_pmf: list[float] = []
        self.target_pmf: list[list[FloatArray]] = [[] for _ in range(n_targets)]
        self.target_ok: list[list[bool]] = [[] for _ in range(n_targets)]

    def flush(self, columns: _Columns) -> None:
        if not self.reward:
            return
        columns.reward.append(np.asarray(self.reward, dtype=np.float64))
        columns.propensity.append(np.asarray(self.propensity, dtype=np.float64))
        columns.chosen.append(np.asarray(self.chosen, dtype=np.int64))
        columns.sizes.append(np.asarray(self.sizes, dtype=np.int64))
        columns.logged_pmf.append(np.asarray(self.logged_pmf, dtype=np.float64))
        for t, pmfs in enumerate(self.target_pmf):
            columns.target_pmf[t].append(np.concatenate(pmfs))
            columns.target_ok[t].append(np.asarray(self.target_ok[t], dtype=bool))
        self.clear()

    def clear(self) -> None:
        self.reward, self.propensity, self.chosen, self.sizes = [], [], [], []
        self.logged_pmf = []
        self.target_pmf = [[] for _ in self.target_pmf]
        self.target_ok = [[] for _ in self.target_ok]


def _checked_pmf(target: TargetPolicy, record: Mapping[str, Any], k: int) -> FloatArray | None:
    pmf = target.pmf(record)
    if pmf is None or getattr(target, "validated", False):
        return pmf
    if (
        pmf.shape != (k,)
        or not np.all(np.isfinite(pmf))
        or pmf.min() < 0
        or abs(float(pmf.sum()) - 1.0) > PMF_SUM_TOLERANCE
    ):
        target.excluded["target_pmf_invalid"] = target.excluded.get("target_pmf_invalid", 0) + 1
        return None
    return pmf


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


def replay(
    logs: Sequence[str],
    targets: Sequence[str],
    settings: Any = None,
    *,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    chunk: int = 10_000,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    alpha: float = 0.05,
    seed: int = 0,
    folds: int = 2,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Estimate every target's value on the logs (see the module docstring for the steps).

    ``logs``: exported ``.jsonl``/``.parquet`` paths or ``kafka:`` (read with ``settings``);
    ``targets``: names for :func:`learners.targets.make_target`; ``estimators``: names of
    :data:`learners.ope.ESTIMATORS`; ``chunk``: records held at a time; ``n_bootstrap`` and
    ``alpha``: the percentile bootstrap (``1 - alpha`` intervals); ``seed``: bootstrap and VW
    seeds; ``folds``: cross-fitting folds of the reward model.

    Raises :class:`ReplayError` for what must be fixed before anything can be estimated; bad
    records and lines are counted in ``excluded`` instead.
    """
    if not targets:
        raise ReplayError("no target to evaluate: give at least one --target (e.g. uniform)")
    if len(set(targets)) != len(targets):
        raise ReplayError(f"a target is given twice: {list(targets)}")
    if chunk < 1:
        raise ReplayError("chunk must be >= 1")
    try:
        estimator_objects = {name: make_estimator(name) for name in estimators}
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    if not estimator_objects:
        raise ReplayError("no estimator given")
    _check_sources(logs)
    try:
        target_objects = [make_target(spec, seed=seed) for spec in targets]
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
            n_valid = _pass_one(
                logs, settings, target_objects, model, problems, columns, chunk, spool, bar, task
            )
            if spool is not None:
                spool.close()
            if model is not None:
                task2 = bar.add_task("replay: reward model", total=n_valid)
                _pass_two(logs, settings, spool_path, model, columns, chunk, bar, task2)
    finally:
        if model is not None:
            model.close()
        if spool_path is not None:
            os.unlink(spool_path)
    last_problems[:] = problems.examples
    for example in problems.examples:
        log.warning("replay excluded %s", example)
    return _estimate(
        columns, target_objects, estimator_objects, problems, n_valid, n_bootstrap, alpha, seed
    )


def _pass_one(
    logs: Sequence[str],
    settings: Any,
    targets: Sequence[TargetPolicy],
    model: CrossFitRewardModel | None,
    problems: _Problems,
    columns: _Columns,
    chunk_size: int,
    spool: Any,
    bar: Progress,
    task: Any,
) -> int:
    n_valid = 0
    chunk = _Chunk(len(targets))
    for source in logs:
        for where, record in _read_source(source, settings, problems):
            bad = check_record(record)
            if bad is not None:
                problems.add(bad[0], where, bad[1])
                continue
            k = len(record["actions"])
            chosen = int(record["chosen"])
            chunk.reward.append(float(record["reward"]))
            chunk.propensity.append(float(record["propensity"]))
            chunk.chosen.append(chosen)
            chunk.sizes.append(k)
            pmf = record.get("pmf")
            chunk.logged_pmf.extend(pmf if pmf is not None else [math.nan] * k)
            for t, target in enumerate(targets):
                p = _checked_pmf(target, record, k)
                chunk.target_ok[t].append(p is not None)
                chunk.target_pmf[t].append(p if p is not None else np.zeros(k))
                target.update(record)
            if model is not None:
                model.learn(
                    n_valid,
                    record_shared(record),
                    record_actions(record),
                    chosen,
                    float(record["reward"]),
                )
            if spool is not None and source == KAFKA_LOG:
                spool.write(orjson.dumps(record) + b"\n")
            n_valid += 1
            if len(chunk.reward) >= chunk_size:
                chunk.flush(columns)
                bar.update(task, completed=n_valid)
    chunk.flush(columns)
    bar.update(task, completed=n_valid)
    return n_valid


def _pass_two(
    logs: Sequence[str],
    settings: Any,
    spool_path: str | None,
    model: CrossFitRewardModel,
    columns: _Columns,
    chunk_size: int,
    bar: Progress,
    task: Any,
) -> None:
    i = 0
    buffer: list[FloatArray] = []
    for source in logs:
        if source == KAFKA_LOG:
            assert spool_path is not None
            records: Iterator[tuple[str, dict[str, Any]]] = _read_jsonl(Path(spool_path), None)
        else:
            records = _read_source(source, settings, None)
        for _, record in records:
            if source != KAFKA_LOG and check_record(record) is not None:
                continue
            buffer.append(model.predict(i, record_shared(record), record_actions(record)))
            i += 1
            if len(buffer) >= chunk_size:
                columns.q_hat.append(np.concatenate(buffer))
                buffer = []
                bar.update(task, completed=i)
    if buffer:
        columns.q_hat.append(np.concatenate(buffer))
    bar.update(task, completed=i)


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _estimate(
    columns: _Columns,
    targets: Sequence[TargetPolicy],
    estimators: Mapping[str, Any],
    problems: _Problems,
    n_valid: int,
    n_bootstrap: int,
    alpha: float,
    seed: int,
) -> dict[str, Any]:
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
    for t, target in enumerate(targets):
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
        if not ok.all():
            data = data.subset(ok)
        entry: dict[str, Any] = {}
        for name, estimator in estimators.items():
            value = estimator.estimate_policy_value(data)
            low, high = estimator.estimate_interval(
                data, alpha=alpha, n_bootstrap=n_bootstrap, rng=np.random.default_rng(seed)
            )
            entry[name] = {
                "value": _json_float(value),
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
    return result


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
