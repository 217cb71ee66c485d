"""``loopwise export``: copy the propensity log from Kafka to a JSONL or Parquet file.

The propensity log (topic ``settings.propensity_log_topic``) holds one JSON record per closed
decision (:mod:`loopwise.learners.log_record`, docs/contracts.md §6); the export copies the
messages as they are, valid or not, unknown fields included.

:func:`export_log` reads every partition of the topic with kafka-python, without a consumer
group (partitions are assigned, never subscribed, and no offset is committed), from a start
position to the end offsets captured when it starts, so records produced during the export are
left for the next one. It streams: at most ``chunk`` messages are in memory at a time, so a log
larger than memory exports fine. :func:`read_log` reads both formats back, and
:func:`iter_kafka_log` yields the same records straight from the topic.

Which messages are exported (a :class:`LogRange`; every condition must hold, the ranges are
half-open):

* offset range ``start_offset <= offset < end_offset``, applied to each partition;
* time range ``start_ms <= ts < end_ms``, where ``ts`` is the Kafka message timestamp (ms since
  the epoch; the producer's CreateTime unless the topic uses LogAppendTime). Reading starts at
  ``offsets_for_times(start_ms)``, the first offset whose timestamp is ``>= start_ms``, and every
  message is checked, so the result is exact even when timestamps are not monotonic within a
  partition (messages after the last one in range are read and dropped).

Messages that are not valid JSON, JSON values that are not objects and tombstones are skipped and
counted by reason in :class:`ExportReport`; nothing else is changed: a JSONL line is the record
re-serialized by orjson (one line, no whitespace).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
from kafka import TopicPartition
from rich.console import Console

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.learners.log_record import FIELD_KINDS, FIELDS
from loopwise.progress import progress_bar

SUFFIXES = (".jsonl", ".parquet")
PARQUET_FORMAT = "loopwise.propensity-log/1"
STALL_TIMEOUT_S = 60.0  # no message and no progress for this long: the broker is gone

# kafka-python checks batch CRC-32Cs in pure Python unless the ``crc32c`` C extension is
# installed: that takes 2/3 of an export's time. Without it the check is skipped (the broker
# verified each batch's CRC when it was appended, and every record is JSON-decoded here).
_FAST_CRC32C = find_spec("crc32c") is not None

# The record fields with a typed Parquet column, in record order, typed by their kind in the
# record module; the rest (unknown fields too) go to ``extra_json``. ``user_features`` has no
# column: the /1 layout keeps it in ``extra_json`` (docs/contracts.md §7), and a column of its
# own would hide it from the readers of that layout.
_FIELDS = tuple(name for name in FIELDS if name != "user_features")
_STRINGS = tuple(name for name in _FIELDS if FIELD_KINDS[name] == "string")
_INTS = tuple(name for name in _FIELDS if FIELD_KINDS[name] == "integer")
_FLOATS = tuple(name for name in _FIELDS if FIELD_KINDS[name] == "number")
_JSONS = tuple(name for name in _FIELDS if FIELD_KINDS[name] == "object")
_INT64 = (-(2**63), 2**63 - 1)


class ExportError(ValueError):
    """The export cannot run as asked (bad suffix, bad range, missing topic); says what to do."""


@dataclass(slots=True)
class ExportReport:
    """What an export read and wrote.

    ``ranges`` maps each partition to the offsets ``[start, end)`` it read; ``read`` and
    ``written`` count messages per partition; ``out_of_time_range`` counts messages read but
    outside ``[start_ms, end_ms)``; ``skipped`` counts unusable messages by reason
    (``invalid_json``, ``not_an_object``, ``tombstone``), with the first 20 in ``examples``.
    ``first_timestamp_ms``/``last_timestamp_ms`` are the smallest and largest Kafka timestamps
    of the written records, ``first_decision_ms``/``last_decision_ms`` those of their
    ``timestamp`` field (the decision's event time); all None when nothing was written.
    """

    out: str
    format: str
    topic: str
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    read: dict[int, int] = field(default_factory=dict)
    written: dict[int, int] = field(default_factory=dict)
    out_of_time_range: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    first_timestamp_ms: int | None = None
    last_timestamp_ms: int | None = None
    first_decision_ms: int | None = None
    last_decision_ms: int | None = None
    bytes: int = 0
    seconds: float = 0.0

    @property
    def records_written(self) -> int:
        return sum(self.written.values())

    @property
    def records_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (partition keys as strings), with the totals."""
        data = asdict(self)
        for name in ("ranges", "read", "written"):
            data[name] = {str(p): v for p, v in sorted(data[name].items())}
        data["ranges"] = {p: list(r) for p, r in data["ranges"].items()}
        data["records_written"] = self.records_written
        data["records_skipped"] = self.records_skipped
        return data

    def _skip(self, reason: str, partition: int, offset: int, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"partition {partition} offset {offset}: {reason}: {detail}")

    def _wrote(self, partition: int, kafka_ts: int, record: dict[str, Any]) -> None:
        self.written[partition] = self.written.get(partition, 0) + 1
        if self.first_timestamp_ms is None or kafka_ts < self.first_timestamp_ms:
            self.first_timestamp_ms = kafka_ts
        if self.last_timestamp_ms is None or kafka_ts > self.last_timestamp_ms:
            self.last_timestamp_ms = kafka_ts
        ts = record.get("timestamp")
        if isinstance(ts, int) and not isinstance(ts, bool):
            if self.first_decision_ms is None or ts < self.first_decision_ms:
                self.first_decision_ms = ts
            if self.last_decision_ms is None or ts > self.last_decision_ms:
                self.last_decision_ms = ts


@dataclass(slots=True, frozen=True)
class LogMessage:
    """One propensity-log message: where it is, its Kafka timestamp, and its decoded record.

    ``record`` is None when the message is unusable; ``problem`` then is ``(reason, detail)``.
    """

    partition: int
    offset: int
    timestamp_ms: int
    record: dict[str, Any] | None
    problem: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class LogRange:
    """Which propensity-log messages to read; every bound is optional, both ranges half-open.

    * offsets ``start_offset <= offset < end_offset``, in each partition read;
    * Kafka timestamps ``start_ms <= ts < end_ms`` (ms since the epoch; the producer's
      CreateTime unless the topic uses LogAppendTime);
    * ``partitions``: only these (sorted, without repeats), or None for every partition.

    Validated when built (:class:`ExportError`): no negative bound, no empty range (the end is
    exclusive and must exceed the start), at least one partition when ``partitions`` is given.
    ``LogRange()`` is the whole log. :meth:`parse` builds one from command-line options.
    """

    start_ms: int | None = None
    end_ms: int | None = None
    start_offset: int | None = None
    end_offset: int | None = None
    partitions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_range("offset", self.start_offset, self.end_offset)
        _check_range("time", self.start_ms, self.end_ms)
        if self.partitions is not None:
            partitions = tuple(sorted(set(self.partitions)))
            if not partitions:
                raise ExportError("no partition to read: give at least one, or none for all")
            if partitions[0] < 0:
                raise ExportError(f"partition {partitions[0]} is negative")
            object.__setattr__(self, "partitions", partitions)

    @classmethod
    def parse(
        cls,
        start: str | None = None,
        end: str | None = None,
        start_offset: int | None = None,
        end_offset: int | None = None,
        partitions: Sequence[int] = (),
    ) -> LogRange:
        """From command-line options: times as :func:`parse_time` reads them, offsets, and the
        partitions given (none: every partition)."""
        return cls(
            start_ms=parse_time(start) if start is not None else None,
            end_ms=parse_time(end) if end is not None else None,
            start_offset=start_offset,
            end_offset=end_offset,
            partitions=tuple(partitions) or None,
        )

    @property
    def everything(self) -> bool:
        """True when no bound is set: the whole log."""
        return self == LogRange()

    def holds_time(self, ts: int) -> bool:
        """Whether a message with Kafka timestamp ``ts`` is in the time range."""
        return (self.start_ms is None or ts >= self.start_ms) and (
            self.end_ms is None or ts < self.end_ms
        )


# --- public entry points ------------------------------------------------------------------------


def check_suffix(out: Path | str) -> str:
    """The output format (``"jsonl"`` or ``"parquet"``) of ``out``, or :class:`ExportError`."""
    suffix = Path(out).suffix.lower()
    if suffix not in SUFFIXES:
        raise ExportError(
            f"cannot write {str(out)!r}: the file name must end with .jsonl (JSON lines) or "
            f".parquet (Apache Parquet), not {suffix or 'no suffix'!r}"
        )
    return suffix[1:]


def parse_time(text: str) -> int:
    """A time given on the command line as ms since the epoch (``1717171717000``) or ISO 8601
    (``2024-06-01``, ``2024-06-01T12:00:00+02:00``; UTC when no zone is given), in ms."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(
            f"{text!r} is not a time: give ms since the epoch (e.g. 1717171717000) "
            "or ISO 8601 (e.g. 2024-06-01T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def export_log(
    settings: Settings,
    out: Path,
    log_range: LogRange | None = None,
    *,
    progress: bool = True,
    console: Console | None = None,
    chunk: int = 5_000,
    row_group_size: int = 20_000,
) -> ExportReport:
    """Export the propensity log of ``settings`` to ``out`` (``.jsonl`` or ``.parquet``).

    Selects the messages of ``log_range`` (:class:`LogRange`; None: the whole log). Reads up to
    the end offsets of the moment it starts, ``chunk`` messages at a time,
    and writes to a temporary file in the same folder, renamed to ``out`` only when complete
    (a failed export leaves no partial ``out``). The progress bar (``progress``) goes to
    ``console``, by default standard error, so standard output stays clean for ``--json``.

    **JSONL**: one record per line, as orjson serializes the decoded record.

    **Parquet** (zstd, row groups of ``row_group_size`` rows, written as they fill by a
    ``pyarrow.parquet.ParquetWriter``; file metadata ``loopwise.format`` =
    ``loopwise.propensity-log/1`` and ``loopwise.topic``), one row per record:

    ====================  =======================================  ==============================
    column                type                                     holds
    ====================  =======================================  ==============================
    decision_id           string                                   as is
    timestamp             int64                                    ms since epoch, as is
    user_id, arm          string                                   as is
    policy_version        string                                   as is
    context               string                                   the object as JSON text
    actions               list<struct<id: string,                  one struct per action; its
                          features_json: string>>                  ``features`` as JSON text
    chosen                int64                                    index into actions
    propensity            double                                   as is
    pmf                   list<double>                             as is
    reward                double                                   as is
    reward_components     string                                   the object as JSON text
    extra_json            string                                   JSON object of what the typed
                                                                   columns cannot hold, or null
    kafka_partition       int32                                    provenance, not part of the
    kafka_offset          int64                                    record: ``read_log`` drops
    kafka_timestamp       int64                                    these three
    ====================  =======================================  ==============================

    A null typed column means the field is absent from the record. ``extra_json`` keeps the
    file an exact copy of the log: it holds unknown fields (forward compatibility), fields whose
    value is null, and values of another type than their column's (e.g. an integer
    ``policy_version``, or an action with keys other than ``id``/``features``); the column is
    then null. A JSON-text column holds any JSON value (``"null"`` for a null one), and a
    ``features_json`` of null means the action has no ``features``. :func:`read_log` applies the
    inverse: typed columns, then JSON texts decoded, then ``extra_json`` merged over them, so
    reading back a Parquet export gives records equal to the JSONL export of the same messages
    (an int in a double column comes back as the equal float: ``1`` → ``1.0``).

    Raises :class:`ExportError` for a bad suffix (before connecting), a partition the topic does
    not have, or a topic that does not exist; :class:`TimeoutError` if the broker stops answering.
    """
    fmt = check_suffix(out)
    log_range = log_range or LogRange()
    out = Path(out)
    report = ExportReport(out=str(out), format=fmt, topic=settings.propensity_log_topic)
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    sink: _Sink = (
        _JsonlSink(partial)
        if fmt == "jsonl"
        else _ParquetSink(partial, settings.propensity_log_topic, row_group_size)
    )
    try:
        with _Reader(settings, log_range, chunk) as reader:
            report.ranges = dict(reader.ranges)
            report.read = {p: 0 for p in reader.ranges}
            report.written = {p: 0 for p in reader.ranges}
            bar = progress_bar(
                "[bold]export[/bold] {task.fields[topic]}",
                "{task.fields[written]} written, {task.fields[skipped]} skipped",
                enabled=progress,
                console=console or Console(stderr=True),
            )
            with bar:
                task = bar.add_task(
                    "export", total=reader.total, topic=report.topic, written=0, skipped=0
                )
                for batch in reader.batches():
                    for msg in batch:
                        report.read[msg.partition] += 1
                        if msg.record is None:
                            assert msg.problem is not None
                            report._skip(msg.problem[0], msg.partition, msg.offset, msg.problem[1])
                        elif not log_range.holds_time(msg.timestamp_ms):
                            report.out_of_time_range += 1
                        else:
                            sink.write(msg)
                            report._wrote(msg.partition, msg.timestamp_ms, msg.record)
                    bar.update(
                        task,
                        completed=reader.done,
                        written=f"{report.records_written:,}",
                        skipped=f"{report.records_skipped:,}",
                    )
                bar.update(task, completed=reader.total)
        sink.close()
        os.replace(partial, out)
    except BaseException:
        sink.close()
        partial.unlink(missing_ok=True)
        raise
    report.bytes = out.stat().st_size
    report.seconds = time.monotonic() - started
    return report


def iter_kafka_log(
    settings: Settings, log_range: LogRange | None = None, *, chunk: int = 5_000
) -> Iterator[dict[str, Any]]:
    """The records :func:`export_log` would write, straight from the topic.

    Unusable messages are left out; :func:`iter_kafka_messages` yields them with their reason.
    """
    for msg in iter_kafka_messages(settings, log_range, chunk=chunk):
        if msg.record is not None:
            yield msg.record


def iter_kafka_messages(
    settings: Settings, log_range: LogRange | None = None, *, chunk: int = 5_000
) -> Iterator[LogMessage]:
    """Every message of the range (as :func:`export_log` selects it), usable or not.

    A message whose ``record`` is None carries its ``problem`` (``tombstone``,
    ``invalid_json``, ``not_an_object``); ``loopwise replay kafka:`` counts those.
    """
    log_range = log_range or LogRange()
    with _Reader(settings, log_range, chunk) as r:
        for batch in r.batches():
            for msg in batch:
                if log_range.holds_time(msg.timestamp_ms):
                    yield msg


def read_log(path: Path | str, *, batch_size: int = 10_000) -> Iterator[dict[str, Any]]:
    """Yield the log records (docs/contracts.md) of an exported ``.jsonl`` or ``.parquet`` file.

    Streams both formats (Parquet ``batch_size`` rows at a time). JSONL blank lines are
    ignored; a line that is not a JSON object raises ``ValueError`` naming the line. Parquet
    rows are turned back into records by the exact inverse of the layout described in
    :func:`export_log` (the ``kafka_*`` provenance columns are dropped).
    """
    path = Path(path)
    fmt = check_suffix(path)
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_parquet(path, batch_size)


# --- reading Kafka ------------------------------------------------------------------------------


class _Reader:
    """Assigned (group-less) kafka-python consumer over a fixed offset range per partition."""

    def __init__(self, settings: Settings, log_range: LogRange, chunk: int) -> None:
        self.topic = settings.propensity_log_topic
        self.chunk = max(1, chunk)
        self.consumer = kafka_clients.consumer(
            settings,
            client_id="loopwise-export",
            max_poll_records=self.chunk,
            check_crcs=_FAST_CRC32C,
            **kafka_clients.GROUPLESS,
        )
        try:
            self.ranges = self._plan(log_range)
        except BaseException:
            self.consumer.close()
            raise
        self.total = sum(end - start for start, end in self.ranges.values())
        self.done = 0

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close()

    def _plan(self, log_range: LogRange) -> dict[int, tuple[int, int]]:
        """Offsets ``[start, end)`` to read per partition, from the offsets of this moment."""
        consumer = self.consumer
        # topics() lists what exists; partitions_for_topic alone could auto-create the topic.
        if self.topic not in consumer.topics():
            raise ExportError(
                f"topic {self.topic!r} does not exist on {consumer.config['bootstrap_servers']}: "
                "nothing has been logged yet, or the settings name another topic/broker"
            )
        known = sorted(consumer.partitions_for_topic(self.topic) or ())
        if log_range.partitions is not None:
            missing = sorted(set(log_range.partitions) - set(known))
            if missing:
                raise ExportError(f"topic {self.topic!r} has partitions {known}, not {missing}")
            known = list(log_range.partitions)
        tps = [TopicPartition(self.topic, p) for p in known]
        firsts = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)
        start_offset, end_offset = log_range.start_offset, log_range.end_offset
        starts = {tp: max(firsts[tp], start_offset or 0) for tp in tps}
        if log_range.start_ms is not None:
            found = consumer.offsets_for_times({tp: log_range.start_ms for tp in tps})
            for tp in tps:
                at = found.get(tp)
                starts[tp] = max(starts[tp], ends[tp] if at is None else at.offset)
        stops = {tp: ends[tp] if end_offset is None else min(ends[tp], end_offset) for tp in tps}
        ranges = {tp.partition: (starts[tp], max(starts[tp], stops[tp])) for tp in tps}
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, ranges[tp.partition][0])
        return ranges

    def batches(self) -> Iterator[list[LogMessage]]:
        """Chunks of decoded messages until every partition reached its end offset."""
        consumer = self.consumer
        pending = {
            TopicPartition(self.topic, p): end
            for p, (start, end) in self.ranges.items()
            if start < end
        }
        done = {TopicPartition(self.topic, p): 0 for p in self.ranges}
        consumer.pause(*[tp for tp in done if tp not in pending])
        last_progress = time.monotonic()
        while pending:
            polled = consumer.poll(timeout_ms=500, max_records=self.chunk)
            batch: list[LogMessage] = []
            for tp, messages in polled.items():
                end = pending.get(tp)
                if end is None:
                    continue
                for m in messages:
                    if m.offset >= end:
                        break
                    batch.append(_decode(m.partition, m.offset, m.timestamp, m.value))
            # Positions, not the last offsets seen: compaction and transaction markers leave gaps.
            for tp, end in list(pending.items()):
                position = consumer.position(tp)
                start = self.ranges[tp.partition][0]
                done[tp] = min(position, end) - start
                if position >= end:
                    del pending[tp]
                    consumer.pause(tp)
            self.done = sum(done.values())
            if batch or polled:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
                raise TimeoutError(
                    f"no message from {consumer.config['bootstrap_servers']} for "
                    f"{STALL_TIMEOUT_S:.0f} s while exporting {self.topic!r}; "
                    f"{sum(pending.values())} offsets still to read"
                )
            if batch:
                yield batch


def _decode(partition: int, offset: int, timestamp: int, value: bytes | None) -> LogMessage:
    if value is None:
        return LogMessage(partition, offset, timestamp, None, ("tombstone", "null value"))
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return LogMessage(partition, offset, timestamp, None, ("invalid_json", str(exc)))
    if not isinstance(record, dict):
        kind = type(record).__name__
        return LogMessage(partition, offset, timestamp, None, ("not_an_object", f"a JSON {kind}"))
    return LogMessage(partition, offset, timestamp, record)


def _check_range(what: str, start: int | None, end: int | None) -> None:
    for name, value in (("start", start), ("end", end)):
        if value is not None and value < 0:
            raise ExportError(f"{what} range: {name} {value} is negative")
    if start is not None and end is not None and end <= start:
        raise ExportError(
            f"{what} range [{start}, {end}) is empty: "
            "the end is exclusive and must be greater than the start"
        )


# --- writing ------------------------------------------------------------------------------------


class _Sink(Protocol):
    def write(self, msg: LogMessage) -> None: ...

    def close(self) -> None: ...


class _JsonlSink:
    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] | None = path.open("wb", buffering=1 << 20)

    def write(self, msg: LogMessage) -> None:
        assert self._file is not None
        self._file.write(orjson.dumps(msg.record) + b"\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def parquet_schema() -> Any:
    """The Arrow schema of an exported Parquet file (see :func:`export_log`)."""
    import pyarrow as pa

    action = pa.struct([("id", pa.string()), ("features_json", pa.string())])
    of_kind = {
        "string": pa.string(),
        "integer": pa.int64(),
        "number": pa.float64(),
        "object": pa.string(),  # JSON text
        "numbers": pa.list_(pa.float64()),
        "actions": pa.list_(action),
    }
    return pa.schema(
        [(name, of_kind[FIELD_KINDS[name]]) for name in _FIELDS]
        + [
            ("extra_json", pa.string()),
            ("kafka_partition", pa.int32()),
            ("kafka_offset", pa.int64()),
            ("kafka_timestamp", pa.int64()),
        ]
    )


class _ParquetSink:
    def __init__(self, path: Path, topic: str, row_group_size: int) -> None:
        import pyarrow.parquet as pq

        self._schema = parquet_schema().with_metadata(
            {"loopwise.format": PARQUET_FORMAT, "loopwise.topic": topic}
        )
        self._writer: Any = pq.ParquetWriter(path, self._schema, compression="zstd")
        self._rows: list[dict[str, Any]] = []
        self._size = max(1, row_group_size)

    def write(self, msg: LogMessage) -> None:
        assert msg.record is not None
        row = record_to_row(msg.record)
        row["kafka_partition"] = msg.partition
        row["kafka_offset"] = msg.offset
        row["kafka_timestamp"] = msg.timestamp_ms
        self._rows.append(row)
        if len(self._rows) >= self._size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            table = pa.Table.from_pylist(self._rows, schema=self._schema)
            self._writer.write_table(table, row_group_size=self._size)
            self._rows = []

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._flush()
        finally:
            self._writer.close()
            self._writer = None


def write_parquet(
    records: Iterable[dict[str, Any]], path: Path, row_group_size: int = 20_000
) -> int:
    """Write records to ``path`` in the export's Parquet layout (provenance columns null)."""
    sink = _ParquetSink(Path(path), "", row_group_size)
    n = 0
    try:
        for record in records:
            sink.write(LogMessage(0, n, 0, record))
            n += 1
    finally:
        sink.close()
    return n


# --- the Parquet layout, both ways --------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return (
        isinstance(value, int) and not isinstance(value, bool) and _INT64[0] <= value <= _INT64[1]
    )


def _is_float(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (isinstance(value, float) or _INT64[0] <= value <= _INT64[1])
        and math.isfinite(value)
    )


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _actions_to_column(actions: Any) -> list[dict[str, Any]] | None:
    """``actions`` as list<struct<id, features_json>>, or None when it does not fit."""
    if not isinstance(actions, list):
        return None
    out = []
    for action in actions:
        if (
            not isinstance(action, dict)
            or not isinstance(action.get("id"), str)
            or not set(action) <= {"id", "features"}
        ):
            return None
        features = _json(action["features"]) if "features" in action else None
        out.append({"id": action["id"], "features_json": features})
    return out


def record_to_row(record: dict[str, Any]) -> dict[str, Any]:
    """One record as a Parquet row (without the provenance columns); see :func:`export_log`."""
    row: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in record.items():
        if name not in _FIELDS:
            extra[name] = value
        elif value is None and name not in _JSONS:
            extra[name] = None
        elif name in _STRINGS:
            if isinstance(value, str):
                row[name] = value
            else:
                extra[name] = value
        elif name in _INTS:
            if _is_int(value):
                row[name] = value
            else:
                extra[name] = value
        elif name in _FLOATS:
            if _is_float(value):
                row[name] = float(value)
            else:
                extra[name] = value
        elif name in _JSONS:
            row[name] = _json(value)
        elif FIELD_KINDS[name] == "numbers":
            if isinstance(value, list) and all(_is_float(p) for p in value):
                row[name] = [float(p) for p in value]
            else:
                extra[name] = value
        elif FIELD_KINDS[name] == "actions":
            column = _actions_to_column(value)
            if column is None:
                extra[name] = value
            else:
                row[name] = column
    row["extra_json"] = _json(extra) if extra else None
    return row


def row_to_record(row: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`record_to_row` (provenance columns ignored)."""
    record: dict[str, Any] = {}
    for name in _FIELDS:
        value = row.get(name)
        if value is None:
            continue
        if name in _JSONS:
            record[name] = orjson.loads(value)
        elif FIELD_KINDS[name] == "actions":
            actions = []
            for action in value:
                item: dict[str, Any] = {"id": action["id"]}
                if action.get("features_json") is not None:
                    item["features"] = orjson.loads(action["features_json"])
                actions.append(item)
            record[name] = actions
        else:
            record[name] = value
    if row.get("extra_json") is not None:
        record.update(orjson.loads(row["extra_json"]))
    return record


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            yield record


def _read_parquet(path: Path, batch_size: int) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        names = set(parquet.schema_arrow.names)
        missing = {"decision_id", "extra_json"} - names
        if missing:
            raise ValueError(
                f"{path} is not a Loopwise propensity-log export (no column {sorted(missing)})"
            )
        columns = [c for c in (*_FIELDS, "extra_json") if c in names]
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            for row in batch.to_pylist():
                yield row_to_record(row)
