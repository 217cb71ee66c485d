"""Report math and plot; the export layout; and export against the real broker.

The report tests use small files whose means, intervals and lifts are computed by hand here.
The integration test produces propensity-log records (and some broken messages) to a fresh
topic, exports them to JSONL and Parquet, reads both back and compares with what was produced.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaProducer
from rich.console import Console

from loopwise.config import Settings, load_settings
from loopwise.export import (
    ExportError,
    LogRange,
    check_suffix,
    export_log,
    iter_kafka_log,
    parse_time,
    read_log,
    write_parquet,
)
from loopwise.learners.log_record import FIELDS
from loopwise.replay import ReplayError, replay
from loopwise.report import build_report, mean_ci, plot_report, print_report, rolling_mean
from loopwise.streams.topics import ensure_topics

Z = 1.959963984540054


# --- report: hand-computed statistics -----------------------------------------------------------


def _decision(t: int, arm: str, reward: float, expected: float) -> dict[str, Any]:
    return {
        "t": t,
        "timestamp": 1_700_000_000_000 + t,
        "user_id": f"u{t % 3}",
        "arm": arm,
        "item_id": f"i{t}",
        "propensity": 0.5,
        "reward": reward,
        "expected_reward": expected,
        "oracle": 0.9,
        "uniform": 0.1,
    }


def _write(path: Path, rows: list[dict[str, Any]], extra: bytes = b"") -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows) + extra)
    return path


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    """vw rewards 1,0,1,1 (expected .6,.6,.8,.8); popularity 0,1,0,0 (.3,.3,.2,.2); shuffled."""
    rows = [
        _decision(0, "vw", 1, 0.6),
        _decision(1, "popularity", 0, 0.3),
        _decision(2, "vw", 0, 0.6),
        _decision(3, "popularity", 1, 0.3),
        _decision(4, "vw", 1, 0.8),
        _decision(5, "popularity", 0, 0.2),
        _decision(6, "vw", 1, 0.8),
        _decision(7, "popularity", 0, 0.2),
    ]
    random.Random(3).shuffle(rows)
    # A truncated last line (a run still writing) is skipped and counted.
    return _write(tmp_path / "decisions.jsonl", rows, b'{"t": 8, "arm": "vw", "rew')


def test_mean_ci_by_hand() -> None:
    import numpy as np

    m = mean_ci(np.array([1.0, 0.0, 1.0, 1.0]))
    # x̄ = 0.75, s² = (3·0.25² + 0.75²)/3 = 0.25, SE = 0.5/√4 = 0.25
    assert m["n"] == 4
    assert m["mean"] == pytest.approx(0.75)
    assert m["se"] == pytest.approx(0.25)
    assert (m["ci_low"], m["ci_high"]) == pytest.approx((0.75 - Z * 0.25, 0.75 + Z * 0.25))
    one = mean_ci(np.array([0.3]))
    assert one["mean"] == pytest.approx(0.3) and one["ci_low"] is None
    assert mean_ci(np.array([math.nan]))["n"] == 0


def test_report_per_arm_means_intervals_and_ground_truth(small_file: Path) -> None:
    report = build_report(small_file)
    assert report["n"] == 8 and report["invalid_lines"] == 1
    assert report["holdout_present"] and report["interval"] == "welch-normal"
    section = report["sections"]["all"]
    assert list(section["arms"]) == ["vw", "popularity"]  # holdout last
    vw, pop = section["arms"]["vw"], section["arms"]["popularity"]
    assert (vw["n"], pop["n"], vw["share"]) == (4, 4, 0.5)
    assert vw["reward"]["mean"] == pytest.approx(0.75)
    assert pop["reward"]["mean"] == pytest.approx(0.25)
    assert vw["reward"]["ci_low"] == pytest.approx(0.75 - Z * 0.25)
    assert pop["reward"]["ci_high"] == pytest.approx(0.25 + Z * 0.25)
    # expected rewards: vw .6,.6,.8,.8 → mean .7, s = √(4·0.01/3), SE = s/2
    se = math.sqrt(0.04 / 3) / 2
    assert vw["expected_reward"]["mean"] == pytest.approx(0.7)
    assert vw["expected_reward"]["se"] == pytest.approx(se)
    assert pop["expected_reward"]["mean"] == pytest.approx(0.25)
    # ground truth: oracle .9 and uniform .1 everywhere
    assert section["oracle"]["mean"] == pytest.approx(0.9)
    assert section["uniform"]["mean"] == pytest.approx(0.1)
    assert vw["vs_oracle"] == pytest.approx(0.75 / 0.9)
    assert vw["vs_uniform"] == pytest.approx(7.5)
    assert vw["expected_vs_oracle"] == pytest.approx(0.7 / 0.9)
    assert vw["gap_closed"] == pytest.approx((0.7 - 0.1) / (0.9 - 0.1))
    assert pop["gap_closed"] == pytest.approx((0.25 - 0.1) / 0.8)


def test_report_lift_over_holdout_by_hand(small_file: Path) -> None:
    section = build_report(small_file)["sections"]["all"]
    assert section["arms"]["popularity"]["lift"] is None
    lift = section["arms"]["vw"]["lift"]["reward"]
    # Δ = .75 - .25 = .5; SE_Δ = √(.25² + .25²); relative = .75/.25 - 1 = 2,
    # SE_rel = √(SE_a²/x̄_h² + x̄_a²·SE_h²/x̄_h⁴) = √(1 + 9) = √10
    se = math.hypot(0.25, 0.25)
    assert lift["diff"]["value"] == pytest.approx(0.5)
    assert lift["diff"]["se"] == pytest.approx(se)
    assert (lift["diff"]["ci_low"], lift["diff"]["ci_high"]) == pytest.approx(
        (0.5 - Z * se, 0.5 + Z * se)
    )
    assert lift["relative"]["value"] == pytest.approx(2.0)
    assert lift["relative"]["se"] == pytest.approx(math.sqrt(10))
    assert lift["p_value"] == pytest.approx(math.erfc(0.5 / se / math.sqrt(2)))
    assert lift["diff"]["ci_low"] < 0 < lift["diff"]["ci_high"]  # 4 vs 4: not significant
    expected = section["arms"]["vw"]["lift"]["expected_reward"]
    assert expected["diff"]["value"] == pytest.approx(0.45)
    assert expected["diff"]["ci_low"] > 0  # the ground truth is much less noisy


def test_report_last_decisions_are_the_largest_t(small_file: Path) -> None:
    report = build_report(small_file, last=4)
    last = report["sections"]["last"]
    assert (last["n"], last["t_first"], last["t_last"]) == (4, 4, 7)
    assert last["arms"]["vw"]["reward"]["mean"] == pytest.approx(1.0)  # t=4, 6
    assert last["arms"]["popularity"]["reward"]["mean"] == pytest.approx(0.0)  # t=5, 7
    assert last["arms"]["vw"]["expected_reward"]["mean"] == pytest.approx(0.8)
    # Zero variance in both arms: the interval collapses to the point, the sign is certain.
    lift = last["arms"]["vw"]["lift"]["reward"]
    assert lift["diff"]["value"] == pytest.approx(1.0) and lift["p_value"] == 0.0
    assert lift["relative"] is None  # the holdout's mean is 0


def test_report_lift_sign_on_a_larger_file(tmp_path: Path) -> None:
    rows = []
    for t in range(4000):
        arm = "vw" if t % 2 else "popularity"
        # vw: reward 1 on 3 of 10 decisions; popularity: 1 of 10.
        reward = float((t // 2) % 10 < (3 if arm == "vw" else 1))
        rows.append(_decision(t, arm, reward, 0.3 if arm == "vw" else 0.1))
    worse = [dict(r, arm="worse") if r["arm"] == "vw" else r for r in rows]
    better = build_report(_write(tmp_path / "a.jsonl", rows))["sections"]["all"]["arms"]
    lift = better["vw"]["lift"]["reward"]
    assert better["vw"]["reward"]["mean"] == pytest.approx(0.3)
    assert better["popularity"]["reward"]["mean"] == pytest.approx(0.1)
    assert lift["diff"]["value"] == pytest.approx(0.2) and lift["diff"]["ci_low"] > 0
    assert lift["relative"]["value"] == pytest.approx(2.0) and lift["relative"]["ci_low"] > 0
    # The same data seen from the other side: holdout = the good arm, negative lift.
    flipped = build_report(_write(tmp_path / "b.jsonl", worse), holdout="worse")
    neg = flipped["sections"]["all"]["arms"]["popularity"]["lift"]["reward"]
    assert neg["diff"]["value"] == pytest.approx(-0.2) and neg["diff"]["ci_high"] < 0


def test_report_without_the_holdout_or_decisions(tmp_path: Path, small_file: Path) -> None:
    report = build_report(small_file, holdout="nobody")
    assert not report["holdout_present"]
    assert all(a["lift"] is None for a in report["sections"]["all"]["arms"].values())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    with pytest.raises(ValueError, match="no decision lines"):
        build_report(empty)


def test_print_report_renders_the_numbers(small_file: Path) -> None:
    console = Console(record=True, width=200)
    print_report(build_report(small_file, last=4), console)
    text = console.export_text()
    assert "vw" in text and "popularity (holdout)" in text and "oracle (ground truth)" in text
    assert "0.7500" in text and "0.2500" in text and "+0.5000" in text
    assert "lift over popularity" in text and "last 4 decisions" in text


def test_rolling_mean_is_the_trailing_window_mean() -> None:
    import numpy as np

    got = rolling_mean(np.array([1.0, 0.0, 1.0, 1.0, 0.0]), 2)
    assert got.tolist() == pytest.approx([1.0, 0.5, 0.5, 1.0, 0.5])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rng = random.Random(7)
    rows = []
    for t in range(6000):
        arm = "popularity" if rng.random() < 0.2 else "vw"
        p = 0.05 + (0.05 * t / 6000 if arm == "vw" else 0.01)
        rows.append(_decision(t, arm, float(rng.random() < p), p))
    source = _write(tmp_path / "run.jsonl", rows)
    png = plot_report(source, tmp_path / "plots" / "run.png", window=500)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1650, 870)
    assert 30_000 < len(data) < 2_000_000


# --- export: layout and arguments, no broker ----------------------------------------------------


def _records(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """Propensity-log records of docs/contracts.md, with the variations a real log may hold."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = 2 + i % 4
        weights = [rng.random() + 0.01 for _ in range(k)]
        pmf = [w / sum(weights) for w in weights]
        chosen = rng.randrange(k)
        record: dict[str, Any] = {
            "decision_id": f"d-{i:05d}",
            "timestamp": 1_700_000_000_000 + 1000 * i,
            "user_id": f"u-{i % 37}",
            "arm": "popularity" if i % 5 == 0 else "vw",
            "policy_version": f"vw-{i // 100}",
            "context": {"device": ["mobile", "desktop"][i % 2], "hour": i % 24, "wk": i % 7 > 4},
            "actions": [
                {"id": f"item-{(i + j) % 50}", "features": {"category": f"c{j}", "price": 1.5 * j}}
                for j in range(k)
            ],
            "chosen": chosen,
            "propensity": pmf[chosen],
            "pmf": pmf,
            "reward": float(rng.random() < 0.2),
            "reward_components": {"click": rng.random() < 0.2, "purchase": 0.0},
        }
        if i % 11 == 0:
            record["policy_version"] = i // 100  # an integer: kept exactly, via extra_json
        if i % 13 == 0:
            record["reward"] = 1  # an int reward
        if i % 17 == 0:
            record["future_field"] = {"nested": [1, "two", None]}  # unknown: kept
        if i % 19 == 0:
            record["reward_components"] = None
        if i % 23 == 0:
            del record["actions"][0]["features"]  # an action without features
        if i % 29 == 0:
            record["actions"][0]["features"] = {}
        if i % 31 == 0:
            del record["policy_version"]  # absent stays absent
        if i % 37 == 0:
            record["reward"] = None  # null stays null
        if i % 41 == 0:
            record["actions"] = [{"id": 7, "features": {}}]  # an int id: kept via extra_json
        if i % 3 == 0:  # as the worker writes it (no column of its own: kept via extra_json)
            record["user_features"] = {"user_id": record["user_id"], "views": i % 5}
        out.append(record)
    return out


def test_parquet_layout_round_trips_exactly(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    records = _records(300)
    path = tmp_path / "log.parquet"
    assert write_parquet(records, path, row_group_size=64) == 300
    back = list(read_log(path))
    assert back == records
    meta = pq.ParquetFile(path)
    assert meta.num_row_groups == 5  # 300 rows in groups of 64
    schema = meta.schema_arrow
    assert str(schema.field("actions").type) == (
        "list<element: struct<id: string, features_json: string>>"
    )
    assert str(schema.field("pmf").type) == "list<element: double>"
    assert str(schema.field("context").type) == "string"
    assert schema.metadata[b"loopwise.format"] == b"loopwise.propensity-log/1"
    typed = [name for name in FIELDS if name != "user_features"]  # the record's, in order
    assert schema.names[: len(typed)] == typed and "user_features" not in schema.names
    row = pq.read_table(path).slice(1, 1).to_pylist()[0]
    assert orjson.loads(row["context"]) == records[1]["context"]
    assert row["extra_json"] is None  # an ordinary record needs nothing extra


def test_read_log_jsonl(tmp_path: Path) -> None:
    records = _records(20)
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + b"\n")
    assert list(read_log(path)) == records
    path.write_bytes(b'{"decision_id": "a"}\n[1]\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: not a JSON object"):
        list(read_log(path))


def test_bad_suffix_is_a_clear_error_before_any_connection(tmp_path: Path) -> None:
    settings = load_settings(bootstrap_servers="127.0.0.1:1")  # nothing listens there
    started = time.monotonic()
    for name in ("log.csv", "log", "log.json"):
        with pytest.raises(ExportError, match=r"must end with \.jsonl .* or \.parquet"):
            export_log(settings, tmp_path / name, progress=False)
    assert time.monotonic() - started < 5
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"\.jsonl"):
        read_log(tmp_path / "log.csv").__next__()
    assert check_suffix("a/B.PARQUET") == "parquet"


def test_bad_ranges_and_times() -> None:
    with pytest.raises(ExportError, match="empty"):
        LogRange(start_offset=5, end_offset=5)
    with pytest.raises(ExportError, match=r"time range \[10, 3\) is empty"):
        LogRange(start_ms=10, end_ms=3)
    with pytest.raises(ExportError, match="negative"):
        LogRange(start_ms=-1)
    with pytest.raises(ExportError, match="no partition"):
        LogRange(partitions=())
    with pytest.raises(ExportError, match="partition -1 is negative"):
        LogRange(partitions=(2, -1))
    with pytest.raises(ExportError, match="not a time"):
        LogRange.parse(start="yesterday")
    assert LogRange.parse().everything
    assert LogRange.parse(partitions=[3, 1, 3]) == LogRange(partitions=(1, 3))
    assert LogRange.parse("2024-06-01", "1717200000001", 4, None, ()) == LogRange(
        start_ms=1_717_200_000_000, end_ms=1_717_200_000_001, start_offset=4
    )
    window = LogRange(start_ms=10, end_ms=20)
    assert [window.holds_time(t) for t in (9, 10, 19, 20)] == [False, True, True, False]
    assert not window.everything
    assert parse_time("1717171717000") == 1_717_171_717_000
    assert parse_time("2024-06-01T00:00:00Z") == 1_717_200_000_000
    assert parse_time("2024-06-01") == 1_717_200_000_000
    assert parse_time("2024-06-01T02:00:00+02:00") == 1_717_200_000_000
    with pytest.raises(ExportError, match="ISO 8601"):
        parse_time("yesterday")


# --- export against the real broker -------------------------------------------------------------


def _produce(settings: Settings, n: int) -> tuple[list[dict[str, Any]], int, dict[str, int]]:
    """Produce ``n`` messages; return the valid ones (record + where/when), the base time and
    the counts of broken ones by reason."""
    ensure_topics(settings)
    base = int(time.time() * 1000) - 3_600_000  # an hour ago: within the broker's limits
    records = _records(n, seed=5)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    sent: list[tuple[Any, dict[str, Any] | None, int]] = []
    broken = {"invalid_json": 0, "not_an_object": 0}
    broken_ts.clear()
    try:
        for i, record in enumerate(records):
            # Timestamps mostly rising, some 40 s early: time ranges must still be exact.
            ts = base + 1000 * i - (40_000 if i % 7 == 3 else 0)
            if i % 25 == 24:
                value, kept = orjson.dumps(record)[:-7], None  # truncated
                broken["invalid_json"] += 1
            elif i % 50 == 10:
                value, kept = b"NaN", None
                broken["invalid_json"] += 1
            elif i % 60 == 30:
                value, kept = b'["not", "an", "object"]', None
                broken["not_an_object"] += 1
            else:
                value, kept = orjson.dumps(record), record
            key = str(record["user_id"]).encode()
            future = producer.send(
                settings.propensity_log_topic, key=key, value=value, timestamp_ms=ts
            )
            sent.append((future, kept, ts))
        producer.flush()
    finally:
        producer.close()
    valid = []
    for future, kept, ts in sent:
        meta = future.get(timeout=30)
        if kept is not None:
            valid.append(
                {"record": kept, "partition": meta.partition, "offset": meta.offset, "ts": ts}
            )
        else:
            broken_ts.append(ts)
    return valid, base, broken


broken_ts: list[int] = []
"""Kafka timestamps of the broken messages of the last :func:`_produce`."""


def _by_id(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: r["decision_id"])


@pytest.mark.integration
def test_export_against_the_real_broker(isolated_settings: Settings, tmp_path: Path) -> None:
    s = isolated_settings
    valid, base, broken = _produce(s, 500)
    expected = _by_id([v["record"] for v in valid])
    assert len(expected) == 500 - sum(broken.values()) and broken["not_an_object"] > 0

    # Everything, to JSONL and to Parquet (small chunks and row groups: streamed).
    jsonl = export_log(s, tmp_path / "all.jsonl", progress=False, chunk=37)
    parquet = export_log(
        s, tmp_path / "out" / "all.parquet", progress=False, chunk=50, row_group_size=100
    )
    assert _by_id(list(read_log(tmp_path / "all.jsonl"))) == expected
    assert _by_id(list(read_log(tmp_path / "out" / "all.parquet"))) == expected
    for report in (jsonl, parquet):
        assert report.records_written == len(expected)
        assert report.skipped == broken
        assert len(report.examples) == min(20, sum(broken.values()))
        assert all(": invalid_json: " in e or ": not_an_object: " in e for e in report.examples)
        assert report.out_of_time_range == 0
        per_partition = {p: 0 for p in range(s.topic_partitions)}
        for v in valid:
            per_partition[v["partition"]] += 1
        assert report.written == per_partition
        assert sum(report.read.values()) == 500
        assert report.first_timestamp_ms == min(v["ts"] for v in valid)
        assert report.last_timestamp_ms == max(v["ts"] for v in valid)
        assert report.first_decision_ms == min(r["timestamp"] for r in expected)
        assert report.bytes > 0
        assert orjson.loads(orjson.dumps(report.as_dict()))["records_written"] == len(expected)
    assert not list(tmp_path.glob("**/.*.partial"))
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "out" / "all.parquet").num_row_groups >= 4

    # A time range [start, end): exactly the messages whose Kafka timestamp is in it.
    start, end = base + 100_000, base + 300_000
    window = LogRange(start_ms=start, end_ms=end)
    timed = export_log(s, tmp_path / "time.parquet", window, progress=False)
    want = _by_id([v["record"] for v in valid if start <= v["ts"] < end])
    assert 150 < len(want) < 210
    assert _by_id(list(read_log(tmp_path / "time.parquet"))) == want
    assert timed.records_written == len(want)
    assert start <= timed.first_timestamp_ms and timed.last_timestamp_ms < end  # type: ignore[operator]

    # An offset range [20, 60) in every partition, and in partition 1 only.
    offsets = LogRange(start_offset=20, end_offset=60)
    export_log(s, tmp_path / "offsets.jsonl", offsets, progress=False)
    want = _by_id([v["record"] for v in valid if 20 <= v["offset"] < 60])
    assert _by_id(list(read_log(tmp_path / "offsets.jsonl"))) == want
    in_p1 = LogRange(start_offset=20, end_offset=60, partitions=(1,))
    part = export_log(s, tmp_path / "p1.jsonl", in_p1, progress=False)
    want = _by_id([v["record"] for v in valid if 20 <= v["offset"] < 60 and v["partition"] == 1])
    assert _by_id(list(read_log(tmp_path / "p1.jsonl"))) == want
    assert list(part.ranges) == [1]

    # Straight from the topic, as `replay kafka:` will read it.
    assert _by_id(list(iter_kafka_log(s, window))) == _by_id(
        [v["record"] for v in valid if start <= v["ts"] < end]
    )

    # `replay kafka:` over that range estimates what the exported range file gives, and counts
    # the range's broken messages under `excluded` instead of dropping them.
    options: dict[str, Any] = {"estimators": ["ips", "snips"], "n_bootstrap": 50}
    options["progress"] = False
    from_kafka = replay(
        ["kafka:"], ["uniform", "logged"], s, kafka_range=window,
        **options,
    )  # fmt: skip
    from_file = replay([str(tmp_path / "time.parquet")], ["uniform", "logged"], **options)
    assert from_kafka["n"] == from_file["n"] > 0
    assert from_kafka["n"] + sum(from_file["excluded"].values()) == timed.records_written
    for name in ("uniform", "logged"):
        for estimator in ("ips", "snips"):
            assert from_kafka["candidates"][name][estimator]["value"] == pytest.approx(
                from_file["candidates"][name][estimator]["value"], rel=1e-12
            )
    in_range = sum(start <= ts < end for ts in broken_ts)
    undecodable = {k: v for k, v in from_kafka["excluded"].items() if k in broken}
    assert in_range > 0 and sum(undecodable.values()) == in_range
    invalid = {k: v for k, v in from_kafka["excluded"].items() if k not in broken}
    assert invalid == from_file["excluded"]
    with pytest.raises(ReplayError, match="applies to kafka: only"):
        replay([str(tmp_path / "time.parquet")], ["uniform"], kafka_range=LogRange(start_ms=1))

    # A range past the end: an empty, valid file.
    past = LogRange(start_ms=base + 10_000_000)
    empty = export_log(s, tmp_path / "none.parquet", past, progress=False)
    assert empty.records_written == 0 and list(read_log(tmp_path / "none.parquet")) == []

    # Errors a user can act on: a bad suffix, a topic that does not exist.
    with pytest.raises(ExportError, match=r"\.jsonl .* or \.parquet"):
        export_log(s, tmp_path / "all.csv", progress=False)
    missing = load_settings(**{**s.model_dump(), "propensity_log_topic": "no.such.topic.x1"})
    with pytest.raises(ExportError, match="does not exist"):
        export_log(missing, tmp_path / "missing.jsonl", progress=False)
    assert not (tmp_path / "missing.jsonl").exists()
