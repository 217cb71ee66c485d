"""The built wheel installs one namespace: ``loopwise`` (its folders mapped under it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    # Build from a copy: pip builds in the source tree, and a stale build/ there could hide
    # a change to the package list.
    source = out / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "state", "demo-output", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (wheel,) = out.glob("loopwise-*.whl")
    return wheel


def test_wheel_installs_only_the_loopwise_namespace(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    top_level = {n.split("/", 1)[0] for n in names if ".dist-info/" not in n}
    assert top_level == {"loopwise"}
    (dist_info,) = {n.split("/", 1)[0] for n in names if ".dist-info/" in n}
    assert (tmp_path / "site" / dist_info / "top_level.txt").read_text().split() == ["loopwise"]
    # The promised folders are there, under the namespace; benchmarks and tests are not.
    for module in (
        "streams/app.py",
        "learners/vw_policy.py",
        "producers/sdk.py",
        "config/settings.py",
        "infra/kafka_broker.py",
        "cli.py",
    ):
        assert f"loopwise/{module}" in names, module
    assert not any(n.startswith(("loopwise/bench/", "loopwise/tests/")) for n in names)


def test_unpacked_wheel_imports_from_itself(tmp_path: Path) -> None:
    """Imports resolve inside the wheel's files: no module left at the top of site-packages."""
    wheel = _build_wheel(tmp_path)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import loopwise.streams.pipeline, loopwise.learners.policy, loopwise.config, "
        "loopwise.producers.sdk, loopwise.cli;"
        "mods = [m for m in sys.modules.values() if getattr(m, '__file__', None)];"
        "ours = [m.__name__ for m in mods if m.__file__.startswith(sys.argv[1])];"
        "assert all(n == 'loopwise' or n.startswith('loopwise.') for n in ours), ours;"
        "assert 'loopwise.streams.pipeline' in ours, ours;"
        "print(len(ours))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(site)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: its folders must not shadow the wheel's
    )
    assert int(result.stdout) >= 5
