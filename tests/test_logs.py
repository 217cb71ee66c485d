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


def test_a_librarys_repeated_line_is_shown_once_per_window_with_the_count() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    conn = logging.getLogger("aiokafka.conn")
    own = logging.getLogger("loopwise.worker")

    def at(logger: logging.Logger, t: float, msg: str, *args: object) -> None:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, msg, args, None)
        record.created = t
        logger.handle(record)

    for i in range(1900):  # a broker down for 17 s, as aiokafka reports it
        at(conn, 1000.0 + i * 0.009, "Unable connect to %r: [Errno 111] attempt %d", "node 1", i)
        at(own, 1000.0 + i * 0.009, "retrying batch %d", i)
    at(conn, 1030.0, "Unable connect to %r: [Errno 111] attempt %d", "node 1", 1900)
    lines = out.getvalue().splitlines()
    library = [line for line in lines if "aiokafka.conn" in line]
    assert len(library) == 3  # t=1000, t=1010.008 (1,111 dropped before it), t=1030
    assert library[0].endswith("attempt 0")
    assert "attempt 1112 [1111 more like this in 10 s not shown]" in library[1]
    assert library[2].endswith("attempt 1900 [787 more like this in 20 s not shown]")
    assert sum("loopwise.worker" in line for line in lines) == 1900  # our own: every line


def test_vv_shows_every_repeated_line() -> None:
    out = io.StringIO()
    configure_logging(stream=out, verbosity=2)
    for i in range(50):
        logging.getLogger("aiokafka.conn").error("Unable connect: attempt %d", i)
    assert out.getvalue().count("Unable connect") == 50
