"""Logging for every ``loopwise`` command: Loopwise's own lines, and only the libraries' warnings.

One handler on the root logger, writing to stderr:

* by default, Loopwise's loggers (``loopwise.*``: worker, loop, learner, infra, ...) at INFO and
  every other library (faust, mode, aiokafka, kafka, ...) at WARNING (a few, :data:`QUIETED`,
  at ERROR);
* ``-v`` (``verbosity=1``): Loopwise at DEBUG, the libraries at INFO; ``-vv``: all at DEBUG;
* the ``text`` format is ``12:00:01 INFO loopwise.worker: message``; the ``json`` format
  (``--log-format json`` or ``LOOPWISE_LOG_FORMAT=json``) writes one JSON object per line,
  ``{"time", "level", "logger", "message"}`` plus ``"exc_info"`` (the formatted traceback) when
  the record carries an exception.

A library that fails on every retry (aiokafka while a broker is down: ~1,900 ERROR lines in
17 s) is summarized: a line of a library logger repeated within :data:`REPEAT_WINDOW_S` (same
logger, level and message template) is not shown, and the next one shown after the window says
how many were not (:class:`RepeatFilter`; off with ``-vv``).

Faust's worker must not set logging up again: ``loopwise.streams.worker`` passes it
``override_logging=False``, or it would replace this handler with its own colored one at its own
level (and turn ``print`` into log lines).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Final, TextIO

import orjson

LOG_FORMATS: Final = ("text", "json")
LIBRARY_LEVEL: Final = logging.WARNING
"""The least level of a library's record shown by default (faust, mode, aiokafka, kafka...)."""
QUIETED: Final = {"kafka.net.selector": logging.ERROR}
"""Library loggers whose warnings are their own diagnostics, shown from ``-v`` on:
kafka-python's IO loop warns whenever one of its tasks ran over 0.1 s (a busy machine)."""


REPEAT_WINDOW_S: Final = 10.0


class RepeatFilter(logging.Filter):
    """Shows a library's repeated line once per ``window_s``: a record of a logger outside
    ``loopwise`` whose (logger, level, message template) was shown less than ``window_s`` ago
    is dropped and counted; the next one shown carries ``[N more like this in T s not
    shown]``. Loopwise's own lines and CRITICAL ones always pass."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self.shown: dict[tuple[str, int, str], tuple[float, int]] = {}  # -> (when, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL or record.name.partition(".")[0] == "loopwise":
            return True
        key = (record.name, record.levelno, str(record.msg))
        last = self.shown.get(key)
        if last is not None and record.created - last[0] < self.window_s:
            self.shown[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            elapsed = record.created - last[0]
            record.msg = f"{record.msg} [{last[1]} more like this in {elapsed:.0f} s not shown]"
        if len(self.shown) > 10_000:  # templates are few; ids in messages are not
            self.shown.clear()
        self.shown[key] = (record.created, 0)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC, ms), ``level``, ``logger``,
    ``message``, and ``exc_info`` / ``stack_info`` as formatted text when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class _Handler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (and replaces when called again)."""


class _StderrHandler(_Handler):
    """Writes to ``sys.stderr`` as it is when a record comes (click's test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(
    verbosity: int = 0,
    log_format: str = "text",
    level: int | str = logging.INFO,
    stream: TextIO | None = None,
) -> None:
    """Route every logger to one stderr handler at the levels above; safe to call again.

    ``level`` is Loopwise's own least level without ``-v`` (the worker's ``worker_log_level``);
    libraries then show ``max(WARNING, level)``. Calling again replaces the handler this
    function installed before (and no other, so a test runner's capture keeps working).
    ``stream``: write there instead of to ``sys.stderr``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    own = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if verbosity >= 2:
        own = libraries = logging.DEBUG
    elif verbosity == 1:
        own, libraries = logging.DEBUG, logging.INFO
    else:
        libraries = max(LIBRARY_LEVEL, own)

    handler = _Handler(stream) if stream is not None else _StderrHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    if verbosity < 2:
        handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(libraries)
    logging.getLogger("loopwise").setLevel(own)
    for name, quiet in QUIETED.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbosity else max(quiet, libraries))
    logging.captureWarnings(True)  # warnings.warn(...) as py.warnings records, in this format
