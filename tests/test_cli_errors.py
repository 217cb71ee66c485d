"""The command line splits errors by kind: what a user can fix is one line and exit 2; a bug is
exit 1 with how to get its traceback (or the traceback itself with -v)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import kafka.errors
import orjson
import pytest
from click.testing import CliRunner, Result

from loopwise import cli, summary
from loopwise.cli import BUG_HINT, main


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` configures the root logger; give the next test the one it had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    own_level = logging.getLogger("loopwise").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("loopwise").setLevel(own_level)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    # A free port nobody listens on: Redis and Kafka are unreachable unless a test says so.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base: dict[str, str | None] = {
        "LOOPWISE_CONFIG": None,
        "LOOPWISE_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "LOOPWISE_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        "LOOPWISE_LOG_FORMAT": None,
    }
    return CliRunner().invoke(main, list(args), env={**base, **(env or {})})


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def inject(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    """``loopwise stats`` raises ``exc`` where it would read Redis (settings already loaded)."""

    def read_summary(*_: object, **__: object) -> None:
        raise exc

    monkeypatch.setattr(summary, "read_summary", read_summary)


# --- user errors: one line, exit 2, no traceback -------------------------------------------


def test_a_missing_log_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    result = run("replay", str(missing), "--target", "uniform")
    assert result.exit_code == 2
    assert lines(result.stderr) == [f"error: log file {str(missing)!r} does not exist"]


def test_an_invalid_setting_is_one_line_naming_the_setting_and_its_variable() -> None:
    result = run("stats", env={"LOOPWISE_BATCH_SIZE": "abc"})
    assert result.exit_code == 2
    [line] = lines(result.stderr)
    assert "setting 'batch_size' (LOOPWISE_BATCH_SIZE) = 'abc'" in line


def test_an_unknown_variable_is_an_error_naming_it_and_the_nearest_setting() -> None:
    result = run("stats", env={"LOOPWISE_BATCHSIZE": "10"})
    assert result.exit_code == 2
    [line] = lines(result.stderr)
    assert "LOOPWISE_BATCHSIZE is not a Loopwise setting; did you mean LOOPWISE_BATCH_SIZE?" in line


def test_an_unknown_config_key_is_an_error_naming_it_and_the_nearest_setting(
    tmp_path: Path,
) -> None:
    config = tmp_path / "loopwise.toml"
    config.write_text('[loopwise]\nredis_ur = "redis://x"\n')
    result = run("--config", str(config), "stats")
    assert result.exit_code == 2
    [line] = lines(result.stderr)
    assert f"config file {config}: redis_ur is not a Loopwise setting" in line
    assert "did you mean redis_url?" in line


def test_secrets_are_never_printed() -> None:
    secret = "hunter2-do-not-print"
    for env in (
        {"LOOPWISE_SNAPSHOT_KEY": secret, "LOOPWISE_BATCH_SIZE": "abc"},
        {"LOOPWISE_REDIS_PASSWORD": secret, "LOOPWISE_BATCH_SIZE": "abc"},
        {"LOOPWISE_SNAPSHOT_KEY": secret},
        {"LOOPWISE_PSEUDONYM_KEY": secret + "-long-enough", "LOOPWISE_BATCH_SIZE": "abc"},
        {"LOOPWISE_PSEUDONYM_KEY": secret[:8]},  # too short: refused, not shown
    ):
        result = run("stats", env=env)
        assert result.exit_code == 2
        assert secret[:8] not in result.output + result.stderr
    assert secret not in run("worker", "--help", env={"LOOPWISE_SNAPSHOT_KEY": secret}).output
    shown = run("pseudonym", "u-42", env={"LOOPWISE_PSEUDONYM_KEY": secret + "-long-enough"})
    assert shown.exit_code == 0 and secret not in shown.output + shown.stderr


def test_a_setting_that_is_not_json_names_the_setting() -> None:
    result = run("stats", env={"LOOPWISE_ARMS": "vw=1"})
    assert result.exit_code == 2
    [line] = lines(result.stderr)
    assert "setting 'arms' (LOOPWISE_ARMS) = 'vw=1': not valid JSON" in line


def test_an_unreachable_redis_names_its_address_and_setting() -> None:
    result = run("stats", env={"LOOPWISE_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"})
    assert result.exit_code == 2
    [line] = lines(result.stderr)
    assert line.startswith("error: cannot reach Redis at redis://:***@127.0.0.1:1/0")
    assert "LOOPWISE_REDIS_URL" in line and "hunter2" not in line


def test_an_unreachable_kafka_broker_names_its_address(monkeypatch: pytest.MonkeyPatch) -> None:
    inject(monkeypatch, kafka.errors.KafkaTimeoutError("Unable to bootstrap from 10.9.9.9:9092"))
    result = run("stats", env={"LOOPWISE_BOOTSTRAP_SERVERS": "10.9.9.9:9092"})
    assert result.exit_code == 2
    [line] = lines(result.stderr)
    assert line.startswith("error: cannot reach the Kafka broker at 10.9.9.9:9092")
    assert "LOOPWISE_BOOTSTRAP_SERVERS" in line


def test_a_file_that_cannot_be_opened_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    inject(monkeypatch, PermissionError(13, "Permission denied", "/srv/loopwise/out.jsonl"))
    result = run("stats")
    assert result.exit_code == 2
    assert lines(result.stderr) == ["error: /srv/loopwise/out.jsonl: Permission denied"]


def test_a_decisions_file_without_decisions_is_a_user_error(tmp_path: Path) -> None:
    empty = tmp_path / "decisions.jsonl"
    empty.write_text('{"not": "a decision"}\n')
    result = run("report", str(empty))
    assert result.exit_code == 2
    [line] = lines(result.stderr)
    assert line.startswith(f"error: {empty} has no decision lines")


def test_user_errors_print_no_traceback_even_with_v(tmp_path: Path) -> None:
    result = run("-v", "replay", str(tmp_path / "missing.jsonl"), "--target", "uniform")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# --- bugs: exit 1, the hint; the traceback with -v -------------------------------------------


@pytest.mark.parametrize(
    "bug", [KeyError("arm"), TypeError("unsupported operand"), ValueError("deep inside")]
)
def test_a_bug_is_exit_1_with_a_summary_and_the_hint(
    monkeypatch: pytest.MonkeyPatch, bug: Exception
) -> None:
    inject(monkeypatch, bug)
    result = run("stats")
    assert result.exit_code == 1
    summary_line, hint = lines(result.stderr)
    assert summary_line.startswith(f"error: unexpected {type(bug).__name__}: ")
    assert "test_cli_errors.py" not in summary_line  # where: Loopwise's innermost frame
    assert "(at loopwise/cli.py:" in summary_line
    assert hint.startswith(BUG_HINT) and "loopwise -v stats" in hint
    assert "Traceback" not in result.output


def test_a_bug_with_v_prints_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    inject(monkeypatch, KeyError("arm"))
    result = run("-v", "stats")
    assert result.exit_code == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "in read_summary" in result.stderr and "KeyError: 'arm'" in result.stderr
    assert "this is a bug in Loopwise" in lines(result.stderr)[-1]


def test_json_logs_carry_errors_as_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    inject(monkeypatch, KeyError("arm"))
    result = run("--log-format", "json", "stats")
    assert result.exit_code == 1
    [entry] = [orjson.loads(line) for line in lines(result.stderr)]
    assert entry["level"] == "ERROR" and entry["logger"] == "loopwise.cli"
    assert "unexpected KeyError" in entry["message"]
    assert "Traceback (most recent call last)" in entry["exc_info"]

    result = run("stats", env={"LOOPWISE_LOG_FORMAT": "json", "LOOPWISE_BATCH_SIZE": "abc"})
    assert result.exit_code == 2
    [entry] = [orjson.loads(line) for line in lines(result.stderr)]
    assert "batch_size" in entry["message"] and "exc_info" not in entry


def test_usage_errors_are_still_clicks(tmp_path: Path) -> None:
    result = run("report", str(tmp_path / "missing.jsonl"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.output


def test_user_error_message_leaves_bugs_alone() -> None:
    assert cli.user_error_message(KeyError("x"), None) is None
    assert cli.user_error_message(RuntimeError("x"), None) is None
    assert cli.user_error_message(cli.UserError("fix it"), None) == "fix it"
