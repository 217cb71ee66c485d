"""Partitions spread over the workers: 3 workers on the 4-partition events topic each own one
or two (Faust's default, one standby replica, gave 2 + 2 + 0: the third worker sat idle)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from worker_helpers import wait_until

from loopwise.config import Settings, load_settings
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

ASSIGNED = re.compile(r"events partitions assigned to this worker: \[([\d, ]*)\]")


def latest_assignment(log: Path) -> set[int] | None:
    found = ASSIGNED.findall(log.read_text())
    if not found:
        return None
    return {int(p) for p in found[-1].split(",") if p.strip()}


def test_three_workers_on_four_partitions_each_own_one_or_two(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    s = load_settings(**{**isolated_settings.model_dump(), "decisions": False})
    assert s.topic_partitions == 4
    ensure_topics(s)
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for log in logs:  # one after the other: each joins a group whose members own all
            with log.open("wb") as out:
                workers.append(spawn_worker(s, output=out))
            wait_until(lambda log=log: latest_assignment(log) is not None, 120, f"{log.name}")

        def balanced() -> bool:
            owned = [latest_assignment(log) or set() for log in logs]
            everything = set().union(*owned)
            return (
                everything == {0, 1, 2, 3}
                and sum(map(len, owned)) == 4
                and all(1 <= len(o) <= 2 for o in owned)
            )

        wait_until(balanced, 90, "every worker owning one or two partitions")
        assert all(w.poll() is None for w in workers)
    finally:
        for worker in workers:
            stop_worker(worker)
