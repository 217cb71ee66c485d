"""``loopwise replay --report DIR``: the HTML page, its PNG plots, and headless Chromium rendering.

Pure (no Kafka, no Redis): a synthetic log from :func:`bench.bench_ope.generate_log`, replayed
with :func:`loopwise.replay.replay_details`, written by :func:`loopwise.replay_report.write_report`.
The browser check needs Debian's ``chromium`` (``make system-deps`` installs it); without it the
test fails instead of skipping, since a skipped check is not a pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest
from matplotlib import image as mpimg

from bench.bench_ope import generate_log
from loopwise.replay import replay_details
from loopwise.replay_report import PLOT_FILES, write_report

N_RECORDS = 3_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM_TIMEOUT = 60
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of five candidates: full, partial (odd name) and no coverage of the log."""
    tmp = tmp_path_factory.mktemp("replay-report")
    log = tmp / "log.jsonl"
    generate_log(log, N_RECORDS, seed=0)
    # A peaked pmf for the first half of the decisions only, in a file whose name needs escaping.
    partial = tmp / 'half <b>&"$x.jsonl'
    partial.write_bytes(
        b"".join(
            orjson.dumps({"decision_id": f"d{i}", "pmf": [0.91] + [0.01] * 9}) + b"\n"
            for i in range(N_RECORDS // 2)
        )
    )
    nowhere = tmp / "nowhere.jsonl"  # no decision of the log: a candidate with no scored round
    nowhere.write_bytes(orjson.dumps({"decision_id": "absent", "pmf": [1.0]}) + b"\n")
    targets = [
        "uniform",
        "logged",
        "vw:--cb_explore_adf --squarecb",
        f"pmf:{partial}",
        f"pmf:{nowhere}",
    ]
    result, details = replay_details(
        [str(log)], targets, estimators=["ips", "snips", "dr"], n_bootstrap=200, progress=False
    )
    assert result["n"] == N_RECORDS
    out = tmp / "report" / "nested"  # parents are created
    index = write_report(result, details, out, title="Replay <test>", logs=[str(log)])
    assert index == out / "index.html"
    return out


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(
            "chromium is not on PATH: run `make system-deps` (installs Debian's chromium) to "
            "check that the replay report renders in a browser"
        )
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium timed out after {CHROMIUM_TIMEOUT} s: {command}\n{exc.stderr!r}")
    if done.returncode != 0:
        pytest.fail(f"chromium exited with {done.returncode}: {command}\n{done.stderr}")
    return done


def test_report_html_tables_and_plots(report: Path) -> None:
    page = (report / "index.html").read_text(encoding="utf-8")
    for src in PLOT_FILES:
        assert f'<img src="{src}"' in page
        data = (report / src).read_bytes()
        assert data.startswith(PNG_MAGIC), src
        assert 20_000 < len(data) < 2_000_000, (src, len(data))
        pixels = mpimg.imread(report / src)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 1000, (src, pixels.shape)
    assert "<h2>Estimates</h2>" in page and "<h2>Weight diagnostics</h2>" in page
    assert page.count("<table>") >= 2
    for header in ("ips", "snips", "dr", "ESS/n", "mean weight", "support deficiency"):
        assert f"<th>{header}</th>" in page
    assert "<code>vw:--cb_explore_adf --squarecb</code>" in page
    # Names are escaped everywhere: the odd file name never reaches the page as markup.
    assert "<b>" not in page and "half &lt;b&gt;&amp;&quot;$x.jsonl" in page
    assert "Replay &lt;test&gt;</h1>" in page
    assert "pmf_file_missing_decision" in page  # per-candidate exclusions
    assert "How to read this page" in page
    # No external resource: the page renders offline from disk.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    url = (report / "index.html").resolve().as_uri()
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", url, tmp=tmp_path).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:2000]
    loaded = re.search(r'data-plots-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-plots-total="(\d+)"', body.group(0))
    assert loaded and total, f"the load script did not run: {body.group(0)}"
    assert int(loaded.group(1)) == int(total.group(1)) >= len(PLOT_FILES)

    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", url, tmp=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 50_000, done.stderr
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    rgb = np.round(pixels[..., :3] * 255).astype(np.int64)
    non_white = float((rgb.min(axis=-1) < 235).mean())
    assert non_white > 0.03, f"screenshot is nearly blank ({non_white:.1%} non-white)"
    # The page's own text and tables are grey; colour comes from the plots' lines and bars
    # (~3% of this screenshot's pixels; the same page with its images missing: 0.05%).
    coloured = float((rgb.max(axis=-1) - rgb.min(axis=-1) > 50).mean())
    assert coloured > 0.01, f"only {coloured:.2%} coloured pixels: the plots were not drawn"


def test_report_of_an_empty_log(tmp_path: Path) -> None:
    log = tmp_path / "bad.jsonl"
    log.write_text('not json\n{"a": 1}\n[1, 2]\n', encoding="utf-8")
    result, details = replay_details(
        [str(log)], ["uniform", "logged"], estimators=["ips", "snips", "dr"], progress=False
    )
    assert result["n"] == 0
    index = write_report(result, details, tmp_path / "out", logs=[str(log)])
    page = index.read_text(encoding="utf-8")
    assert "No valid rounds in the log" in page
    assert "invalid_json" in page and "not_an_object" in page
    assert "<img" not in page
    assert not any((tmp_path / "out" / name).exists() for name in PLOT_FILES)
