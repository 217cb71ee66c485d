"""``loopwise bench scale``: its help, and its pure helpers on synthetic data."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from bench.bench_scale import (
    Publication,
    Seen,
    example_count,
    partition_of,
    percentile,
    propagation,
    rates,
    summarize,
)
from loopwise.cli import BENCHMARKS, main


def test_scale_is_listed_and_its_help_is_its_own() -> None:
    assert "scale" in BENCHMARKS
    result = CliRunner().invoke(main, ["bench", "scale", "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("usage: bench_scale.py")
    for option in (
        "--events",
        "--workers",
        "--propagation-seconds",
        "--propagation-rate",
        "--poll-ms",
    ):
        assert option in result.output
    assert "2 cores" in result.output  # says what two cores allow


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([7.0], 50) == 7.0
    assert math.isnan(percentile([], 50))
    assert summarize([1.0, 2.0, 3.0]) == {"n": 3, "p50": 2.0, "p90": 2.8, "max": 3.0}


def test_rates_from_first_applied_batch_to_the_total() -> None:
    # 0 before the first batch; 1000 events/s from t=10 until 10000 at t=19.
    samples = [(9.0, 0), *[(10.0 + i, 1000 * (i + 1)) for i in range(10)], (20.0, 10_000)]
    r = rates(samples, 10_000)
    assert r["events_per_s"] == pytest.approx(9000 / 9)
    assert r["seconds"] == pytest.approx(9.0)
    assert r["middle_events_per_s"] == pytest.approx(1000.0)  # 2000 at 11 s .. 8000 at 17 s
    assert r["longest_stall_s"] == 0.0
    stalled = [(1.0, 100), (1.5, 100), (2.0, 100), (2.5, 200), (3.0, 1000)]
    assert rates(stalled, 1000)["longest_stall_s"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="never reach"):
        rates(samples[:5], 10_000)
    with pytest.raises(ValueError, match="one batch"):
        rates([(1.0, 10_000)], 10_000)


def test_a_users_partition_is_kafkas_default_partitioners() -> None:
    from kafka.partitioner.default import DefaultPartitioner

    class Cluster:
        def topics(self) -> set[str]:
            return {"t"}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return set(range(6))

        def available_partitions_for_topic(self, topic: str) -> set[int]:
            return set(range(6))

    partitioner = DefaultPartitioner()
    for user in ("user-001", "user-042", "user-199", "u"):
        expected = partitioner.partition("t", None, user.encode(), None, None, Cluster())
        assert partition_of(user, 6) == expected


def test_example_count_reads_the_arms_policy_version() -> None:
    assert example_count("vw/vw/1234") == 1234
    assert example_count("popularity/popularity/12") is None
    assert example_count("vw/vw/") is None
    assert example_count("") is None


def test_propagation_first_decision_per_partition_worker_and_everyone() -> None:
    owners = {"worker 1": (0, 1), "worker 2": (2,)}
    pubs = [
        Publication(version=1, count=100, published_ms=1_000),
        Publication(version=2, count=100, published_ms=5_000),  # no new example: skipped
        Publication(version=3, count=250, published_ms=10_000),
    ]
    seen = [
        Seen(0, 900, 0),  # before: an older model
        Seen(0, 1_400, 100),
        Seen(1, 1_100, 0),
        Seen(1, 1_900, 100),
        Seen(2, 2_300, 100),
        Seen(0, 10_200, 250),
        Seen(2, 10_900, 300),  # a newer version counts: it includes this one
        # partition 1 never decides with 250 or more
    ]
    rows = propagation(pubs, seen, owners)
    assert [r["version"] for r in rows] == [1, 3]
    first = rows[0]
    assert first["per_partition_ms"] == {0: 400, 1: 900, 2: 1_300}
    assert first["per_worker_ms"] == {"worker 1": 400, "worker 2": 1_300}
    assert first["complete"]
    assert first["every_worker_ms"] == 1_300
    assert first["every_partition_ms"] == 1_300
    second = rows[1]
    assert second["per_partition_ms"] == {0: 200, 2: 900}
    assert second["per_worker_ms"] == {"worker 1": 200, "worker 2": 900}
    assert not second["complete"]  # partition 1 never showed it
    assert second["every_worker_ms"] is None and second["every_partition_ms"] is None
