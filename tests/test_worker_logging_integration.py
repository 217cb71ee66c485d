"""A real worker process logs Loopwise's lines and no library's INFO; JSON mode is JSON only.

The worker runs against the session's broker and Redis until it says it is ready, then gets
SIGTERM; everything it wrote (stdout and stderr together) is checked line by line.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from worker_helpers import wait_until

from loopwise.config import Settings
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

LIBRARIES = ("faust", "mode", "aiokafka", "kafka")
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<level>[A-Z]+) (?P<logger>[\w.]+): ")


def run_worker_until_ready(settings: Settings, out: Path) -> str:
    with out.open("wb") as output:
        worker = spawn_worker(settings, output=output)
        try:
            wait_until(lambda: "worker ready" in out.read_text(), 120, "worker ready", worker)
        finally:
            code = stop_worker(worker)
    assert code == 0, out.read_text()
    return out.read_text()


def test_default_logs_show_loopwise_info_and_no_library_info(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    text = run_worker_until_ready(isolated_settings, tmp_path / "worker.log")
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = [TEXT_LINE.match(line) for line in lines]
    assert all(parsed), f"lines that are not log lines (a print, a banner?):\n{text}"
    ours = [m["logger"] for m in parsed if m and m["logger"].startswith("loopwise.")]
    assert "loopwise.worker" in ours and "loopwise.topics" in ours  # ready, created topics
    library_info = [
        line
        for line, m in zip(lines, parsed, strict=True)
        if m and m["logger"].split(".")[0] in LIBRARIES and m["level"] in ("INFO", "DEBUG")
    ]
    assert library_info == [], "\n".join(library_info)
    assert any("worker ready: group " in line for line in lines)
    assert "worker stopped" in lines[-1]


def test_json_logs_are_one_object_per_line(isolated_settings: Settings, tmp_path: Path) -> None:
    settings = isolated_settings.model_copy(update={"log_format": "json"})
    text = run_worker_until_ready(settings, tmp_path / "worker.jsonl")
    entries = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    assert entries
    for entry in entries:
        assert (
            {"time", "level", "logger", "message"}
            <= set(entry)
            <= {
                "time",
                "level",
                "logger",
                "message",
                "exc_info",
                "stack_info",
            }
        )
        assert not (entry["logger"].split(".")[0] in LIBRARIES and entry["level"] == "INFO")
    messages = [e["message"] for e in entries if e["logger"] == "loopwise.worker"]
    assert any(m.startswith("worker ready") for m in messages)
    assert messages[-1] == "worker stopped"
