"""``loopwise bench``: the group's help lists the benchmarks; a benchmark's --help is its own."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from loopwise.cli import BENCHMARKS, main


def test_bench_help_lists_every_benchmark() -> None:
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    for name, what in BENCHMARKS.items():
        assert f"{name:10} {what}" in result.output


@pytest.mark.parametrize(
    ("name", "help_flag", "options"),
    [
        ("worker", "--help", ["--events", "--repeat"]),
        ("policies", "-h", ["--jobs"]),
        ("faults", "--help", ["--events", "--kills", "--seed", "--out"]),
        ("profile", "--help", ["--events", "--state-only", "--reclassify"]),
    ],
)
def test_a_benchmarks_help_is_its_own_argparse_help(
    name: str, help_flag: str, options: list[str]
) -> None:
    result = CliRunner().invoke(main, ["bench", name, help_flag])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"usage: bench_{name}.py")
    assert "Usage: loopwise bench" not in result.output
    for option in options:
        assert option in result.output


def test_an_unknown_benchmark_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["bench", "nope", "--events", "1"])
    assert result.exit_code == 2
    assert "'nope' is not one of" in result.output
