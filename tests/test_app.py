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
