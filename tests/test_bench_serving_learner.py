"""``loopwise bench serving`` and ``loopwise bench learner``: their help, and the learner
bench's core on a few examples (no Kafka, no Redis)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from bench.bench_learner import (
    example_text,
    generate,
    held_out_queries,
    measure,
    read_chunks,
    read_examples,
    report,
    run_native,
    run_ours,
)
from loopwise.cli import main
from loopwise.learners.log_record import LogRecord
from loopwise.learners.policy import ActionTable
from loopwise.learners.vw_policy import DEFAULT_ARGS, VWPolicy

SMALL = {"users": 60, "items": 30, "seed": 3}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        (
            "serving",
            ["--rate", "--seconds", "--idle-seconds", "--warmup-s", "--get-rate", "--out"],
        ),
        ("learner", ["--examples", "--holdout", "--vw-args", "--tolerance", "--no-pyvw", "--out"]),
    ],
)
def test_the_new_benchmarks_answer_help_with_their_own_options(
    name: str, options: list[str]
) -> None:
    result = CliRunner().invoke(main, ["bench", name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"usage: bench_{name}.py")
    for option in options:
        assert option in result.output


def test_the_learner_bench_times_every_path_on_the_same_examples(tmp_path: Path) -> None:
    result = measure(30, holdout=5, **SMALL)
    assert result["agree"], result["problems"]
    assert result["problems"] == []
    runs = result["runs"]
    assert set(runs) == {"ours", "learner", "native", "pyvw_text", "pyvw_learn"}
    for name, run in runs.items():
        assert run["examples"] == 30, name
        assert run["examples_per_s"] > 0 and run["cpu_us_per_example"] > 0, name
        assert run["max_heldout_pmf_difference_to_ours"] <= 1e-9, name
    for name in ("native", "pyvw_text", "pyvw_learn"):
        assert runs[name]["vw_examples"] == 30
    assert result["ours_over_native"] == pytest.approx(
        runs["ours"]["examples_per_s"] / runs["native"]["examples_per_s"]
    )
    assert result["data"]["candidates"] == 30
    out = tmp_path / "learner.json"
    report(result, out)
    assert orjson.loads(out.read_bytes())["examples"] == 30


def test_the_vw_file_holds_what_the_adapter_hands_vw(tmp_path: Path) -> None:
    records, vw_file = tmp_path / "r.jsonl", tmp_path / "e.vw"
    generate(12, 1, records, vw_file, **SMALL)
    raws = [raw for chunk in read_chunks(records, size=5) for raw in chunk]
    texts = [text for chunk in read_examples(vw_file, size=5) for text in chunk]
    assert len(raws) == len(texts) == 12
    policy = VWPolicy(args=DEFAULT_ARGS)
    table = ActionTable()
    for raw, text in zip(raws, texts, strict=True):
        record = LogRecord.from_json(raw)
        label = (record.chosen, -float(record.reward), float(record.propensity))
        lines = policy._lines_of(record.shared(), record.action_list(), label)
        assert text == "\n".join(lines).strip() == example_text(record, table)
    policy.close()


def test_the_check_fails_when_native_vw_learned_other_examples(tmp_path: Path) -> None:
    from bench.bench_learner import disagreements

    records, vw_file = tmp_path / "r.jsonl", tmp_path / "e.vw"
    held, _ = generate(20, 5, records, vw_file, **SMALL)
    queries = held_out_queries(held)
    policy_args = VWPolicy(args=DEFAULT_ARGS).args
    ours = run_ours(records, DEFAULT_ARGS, queries, 20)
    assert disagreements([ours, run_native(vw_file, policy_args, queries)], 20, 1e-9) == []
    # The same file without its last example: VW's driver learns 19, and the check says so.
    examples = [text for chunk in read_examples(vw_file) for text in chunk]
    short = tmp_path / "short.vw"
    short.write_text("".join(text + "\n\n" for text in examples[:-1]))
    problems = disagreements([ours, run_native(short, policy_args, queries)], 20, 1e-9)
    assert any("counted 19 examples" in p for p in problems), problems


class FakeRedis:
    """Answers GET from a dict; records the keys asked for."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values
        self.asked: list[str] = []

    def get(self, key: str) -> bytes | None:
        self.asked.append(key)
        return self.values.get(key)


def test_the_serving_client_alternates_and_falls_back_to_the_default_on_a_miss() -> None:
    from bench.bench_serving import WARM_REQUESTS, summarize, time_requests

    values = {"nba:a": b"x" * 30, "nba:__default__": b"d" * 20, "bare": b"y" * 30}
    fake = FakeRedis(values)
    signals: list[str] = []
    samples = time_requests(
        fake,  # type: ignore[arg-type]
        nba_keys=["nba:a", "nba:gone"],
        default_key="nba:__default__",
        bare_key="bare",
        seconds=0.05,
        get_rate=0,
        seed=1,
        signal=signals.append,
    )
    assert signals == ["measuring", "done"]
    asked = fake.asked[WARM_REQUESTS:]
    misses = asked.count("nba:gone")
    assert misses > 0 and asked.count("nba:a") > 0
    # every miss is followed by a GET of the default; every nba read by a bare GET
    assert asked.count("nba:__default__") == misses == int(samples["nba_fallback"].sum())
    assert len(samples["nba_ns"]) == misses + asked.count("nba:a")
    assert len(samples["bare_ns"]) in (len(samples["nba_ns"]), len(samples["nba_ns"]) - 1)
    assert set(samples["nba_bytes"].tolist()) == {30, 20}
    summary = summarize(samples, {})
    assert summary["nba_fallbacks"] == misses
    assert summary["nba_found_only"]["n"] == len(samples["nba_ns"]) - misses
    assert summary["nba"]["p50"] <= summary["nba"]["p99"] <= summary["nba"]["max"]
