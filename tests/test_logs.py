"""Logging: Loopwise's own lines at INFO, other libraries' at WARNING; -v for more; JSON lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from loopwise.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    own_level = logging.getLogger("loopwise").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("loopwise").setLevel(own_level)


def emit_everything() -> None:
    """What a worker's loggers say: Loopwise's, Faust's, mode's timers, the Kafka clients'."""
    for name in ("loopwise.worker", "faust.worker", "mode.timers", "aiokafka.consumer", "kafka"):
        logger = logging.getLogger(name)
        logger.debug("%s debug", name)
        logger.info("%s info", name)
        logger.warning("%s warning", name)


def shown(**options: object) -> str:
    out = io.StringIO()
    configure_logging(stream=out, **options)  # type: ignore[arg-type]
    emit_everything()
    return out.getvalue()


def test_default_shows_loopwise_info_and_only_the_libraries_warnings() -> None:
    text = shown()
    assert "loopwise.worker info" in text and "loopwise.worker debug" not in text
    for library in ("faust.worker", "mode.timers", "aiokafka.consumer", "kafka"):
        assert f"{library} info" not in text
        assert f"{library} warning" in text
    first = text.splitlines()[0]
    assert first.endswith(" INFO loopwise.worker: loopwise.worker info")


def test_v_shows_loopwise_debug_and_library_info_and_vv_everything() -> None:
    text = shown(verbosity=1)
    assert "loopwise.worker debug" in text and "faust.worker info" in text
    assert "faust.worker debug" not in text
    text = shown(verbosity=2)
    assert "faust.worker debug" in text and "kafka debug" in text


def test_a_worker_log_level_above_info_quiets_loopwise_and_the_libraries() -> None:
    text = shown(level="error")
    assert text == ""
    text = shown(level="warning")
    assert "loopwise.worker info" not in text and "loopwise.worker warning" in text


def test_json_format_is_one_parseable_object_per_line_with_the_traceback() -> None:
    out = io.StringIO()
    configure_logging(log_format="json", stream=out)
    log = logging.getLogger("loopwise.worker")
    log.info("batch of %d events", 3)
    try:
        {}["missing"]
    except KeyError:
        log.exception("batch failed")
    logging.getLogger("faust.agents").info("not shown")
    first, second = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["level"] == "INFO" and first["logger"] == "loopwise.worker"
    assert first["message"] == "batch of 3 events"
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["level"] == "ERROR" and "KeyError: 'missing'" in second["exc_info"]


def test_configuring_again_replaces_the_handler_instead_of_adding_one() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    configure_logging(stream=second)
    logging.getLogger("loopwise.x").info("once")
    assert first.getvalue() == "" and second.getvalue().count("once") == 1


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        configure_logging(log_format="xml")


def test_kafka_pythons_slow_task_diagnostics_wait_for_v() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    selector = logging.getLogger("kafka.net.selector")
    selector.warning("Task ran for 0.225s (>0.100s threshold)")
    selector.error("IO loop crashed")
    assert "threshold" not in out.getvalue() and "IO loop crashed" in out.getvalue()
    configure_logging(verbosity=1, stream=out)
    selector.warning("Task ran for 0.3s (>0.100s threshold)")
    assert "0.3s" in out.getvalue()
