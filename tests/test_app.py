"""The worker's Faust app, built without a broker (Faust connects only when started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopwise.config import load_settings
from loopwise.streams.app import build_app


def test_faust_keeps_its_data_folder_under_state_dir_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    state = tmp_path / "state"
    app = build_app(load_settings(state_dir=state, decisions=False, app_id="loopwise-x"))
    assert app.conf.datadir == state / "loopwise-x-data"
    app.conf.datadir.mkdir(exist_ok=True)  # what Faust does on start: its parent exists
    assert list(cwd.iterdir()) == []


def test_a_batch_keeps_only_the_events_of_partitions_still_assigned() -> None:
    """Events taken before a rebalance revoked their partition are left to its new owner."""
    from types import SimpleNamespace

    from loopwise.streams.app import owned_only

    def event(topic: str, partition: int, offset: int) -> SimpleNamespace:
        return SimpleNamespace(
            message=SimpleNamespace(topic=topic, partition=partition, offset=offset)
        )

    batch = [event("ev", 0, 1), event("ev", 1, 7), event("ev", 0, 2), event("other", 1, 3)]
    kept = owned_only(batch, {("ev", 0), ("other", 1)})
    assert [(e.message.partition, e.message.offset) for e in kept] == [(0, 1), (0, 2), (1, 3)]
    assert owned_only(batch, set()) == []
