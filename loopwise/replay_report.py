"""``loopwise replay --report DIR``: the replay result as an HTML page with plots.

:func:`write_report` takes what :func:`loopwise.replay.replay_details` returns and writes into
``DIR``::

    index.html       the page: estimates and diagnostics tables, the plots, the records
                     excluded from the log, the inputs and a short guide to reading it
    estimates.png    per candidate, each estimator's value with its 95% interval; the logged
                     policy's on-policy average reward as a reference line
    weights.png      per candidate, the distribution of its importance weights
                     ``w = pi(a|x) / p`` (log-scaled when they span orders of magnitude),
                     their mean marked (about 1 for a sound log)
    cumulative.png   per candidate, the running estimate over the log (IPS, SNIPS and DR where
                     present) against the running on-policy mean of the logged reward

The page only references the PNG files beside it by relative path: no external CSS, script or
font, so ``DIR/index.html`` opens from disk, offline, and ``DIR`` can be copied or archived as
a whole. Every piece of text that comes from the log or the command line (target names, log
paths, exclusion reasons) is HTML-escaped. A tiny inline script, run on the window's ``load``
event, writes how many ``<img>`` elements decoded into ``<body data-plots-loaded>`` (and how
many there are into ``data-plots-total``), so a headless browser's ``--dump-dom`` shows whether
the plots render.

Plots use matplotlib's object API (a ``Figure`` rendered by Agg, no pyplot, no global backend
change), as :func:`loopwise.report.plot_report` does, so they work headless and from threads.
Curves are downsampled to at most :data:`MAX_POINTS` points (a 1M-round log plots in about a
second) and skip non-finite values (e.g. SNIPS before the first non-zero weight).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from loopwise.learners.policy import FloatArray
from loopwise.replay import CandidateRounds, ReplayDetails

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["MAX_POINTS", "PLOT_FILES", "write_report"]

MAX_POINTS: Final = 2_000
"""At most this many points per curve of ``cumulative.png``."""
PLOT_FILES: Final = ("estimates.png", "weights.png", "cumulative.png")
"""The images :func:`write_report` writes beside ``index.html`` (none when the log is empty)."""

ESS_SHARE_WARN: Final = 0.1
"""Diagnostics below this ESS share are highlighted: the estimate rests on few rounds."""
MEAN_WEIGHT_WARN: Final = 0.1
"""Mean weights further than this from 1 are highlighted."""

_RUNNING: Final = ("ips", "snips", "dr")  # the estimators drawn in cumulative.png, if present
_COLORS: Final = {
    "ips": "#1f77b4",
    "clipped_ips": "#17becf",
    "snips": "#2ca02c",
    "dm": "#8c564b",
    "dr": "#9467bd",
    "sndr": "#e377c2",
    "switch_dr": "#bcbd22",
}
_OTHER_COLORS: Final = ("#ff7f0e", "#7f7f7f", "#aec7e8", "#98df8a", "#c5b0d5")
_ON_POLICY_COLOR: Final = "#222222"
_MEAN_COLOR: Final = "#d62728"
_HIST_COLOR: Final = "#4c78a8"
_DPI: Final = 150
_WIDTH: Final = 11.0  # inches: 1,650 px at 150 dpi, shown at most 1,100 px wide


def write_report(
    result: Mapping[str, Any],
    details: ReplayDetails | None,
    out_dir: Path,
    *,
    title: str = "Loopwise replay",
    logs: Sequence[str] = (),
) -> Path:
    """Write the HTML report of a replay into ``out_dir``; return the path of its ``index.html``.

    ``result`` and ``details`` are what :func:`loopwise.replay.replay_details` returns (``details``
    None, as with ``keep_rounds=False``: only the estimates are plotted, without the on-policy
    reference); ``title`` heads the page; ``logs`` are the inputs, listed on the page.
    ``out_dir`` is created (with its parents) if needed; ``index.html`` and the images of
    :data:`PLOT_FILES` in it are overwritten, images of an earlier report that this one does
    not draw are removed. A log with no valid round gives a page that says so, without plots.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    n = int(result.get("n") or 0)
    candidates: Mapping[str, Mapping[str, Any]] = result.get("candidates") or {}
    plots: list[tuple[str, str, str]] = []  # (file, alt text, caption)
    if n > 0 and candidates:
        on_policy = _on_policy_mean(details)
        _save(_plot_estimates(result, on_policy), out_dir / "estimates.png")
        plots.append(
            (
                "estimates.png",
                "Estimated value of each candidate per estimator, with 95% intervals",
                "Estimated value (mean reward per decision) of each candidate, per estimator, "
                "with its 95% bootstrap interval. Dashed line: the logged policy's own average "
                "reward (on-policy).",
            )
        )
        if details is not None:
            _save(_plot_weights(result, details), out_dir / "weights.png")
            plots.append(
                (
                    "weights.png",
                    "Distribution of the importance weights of each candidate",
                    "Importance weights w = π(a|x) / p of the rounds each candidate scored. "
                    "Red line: their mean, which should be close to 1 (dotted).",
                )
            )
            _save(_plot_cumulative(result, details), out_dir / "cumulative.png")
            plots.append(
                (
                    "cumulative.png",
                    "Running estimate of each candidate over the log",
                    "Estimate over the first k rounds of the log, as k grows; dashed: the "
                    "running average of the logged reward. A trustworthy estimate settles "
                    "into a flat line well before the end of the log.",
                )
            )
    page = _page(result, details, title=title, logs=logs, plots=plots)
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


# --- helpers ------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _estimators(result: Mapping[str, Any]) -> list[str]:
    """The estimator names of the result, in order of first appearance."""
    names: dict[str, None] = {}
    for entry in (result.get("candidates") or {}).values():
        for key in entry:
            if key != "diagnostics":
                names.setdefault(key, None)
    return list(names)


def _colors(estimators: Sequence[str]) -> dict[str, str]:
    others = iter(_OTHER_COLORS * (1 + len(estimators) // len(_OTHER_COLORS)))
    return {name: _COLORS.get(name) or next(others) for name in estimators}


def _on_policy_mean(details: ReplayDetails | None) -> float | None:
    if details is None or details.reward.size == 0:
        return None
    return _finite(float(np.mean(details.reward)))


def _label(text: str, limit: int = 44) -> str:
    """``text`` for a matplotlib label: one line, at most ``limit`` characters, ``$`` literal."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(text))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _thin(x: FloatArray, y: FloatArray, points: int = MAX_POINTS) -> tuple[FloatArray, FloatArray]:
    """The finite points of ``(x, y)``, at most ``points`` of them evenly spaced (ends kept)."""
    ok = np.isfinite(y)
    if not ok.all():
        x, y = x[ok], y[ok]
    if x.size > points:
        idx = np.unique(np.linspace(0, x.size - 1, points).round().astype(np.int64))
        x, y = x[idx], y[idx]
    return x, y


def _grid(count: int) -> tuple[int, int]:
    """(rows, columns) of small multiples for ``count`` candidates."""
    cols = min(3, max(1, count))
    return math.ceil(max(1, count) / cols), cols


def _new_figure(height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(_WIDTH, height), dpi=_DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", facecolor="white")


def _style(ax: Axes) -> None:
    ax.grid(True, alpha=0.25, linewidth=0.8)
    ax.spines[["top", "right"]].set_visible(False)


def _empty_panel(ax: Axes, name: str, message: str) -> None:
    ax.set_title(_label(name), loc="left", fontsize=10, fontweight="bold")
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_color("#dddddd")


def _rounds(details: ReplayDetails, name: str) -> CandidateRounds | None:
    rounds = details.candidates.get(name)
    return rounds if rounds is not None and rounds.rounds.size > 0 else None


# --- plots --------------------------------------------------------------------------------------


def _plot_estimates(result: Mapping[str, Any], on_policy: float | None) -> Figure:
    """Grouped horizontal error bars: candidates top to bottom, one colour per estimator."""
    from matplotlib.lines import Line2D

    candidates: Mapping[str, Mapping[str, Any]] = result["candidates"]
    names = list(candidates)
    estimators = _estimators(result)
    colors = _colors(estimators)
    k = max(1, len(estimators))
    height = max(2.8, 1.2 + len(names) * (0.24 * k + 0.3))
    fig = _new_figure(height)
    ax = fig.add_subplot()
    band = 0.8  # of each candidate's unit of height, shared by its estimators
    step = band / k
    xs: list[float] = []
    for row, name in enumerate(names):
        entry = candidates[name]
        drawn = False
        for j, estimator in enumerate(estimators):
            cell = entry.get(estimator) or {}
            value = _finite(cell.get("value"))
            if value is None:
                continue
            y = row - band / 2 + step * (j + 0.5)
            low, high = _finite(cell.get("ci_low")), _finite(cell.get("ci_high"))
            if low is not None and high is not None:
                err = [[max(0.0, value - low)], [max(0.0, high - value)]]
                ax.errorbar(
                    [value],
                    [y],
                    xerr=err,
                    fmt="o",
                    color=colors[estimator],
                    markersize=5,
                    elinewidth=2.2,
                    capsize=3.5,
                    capthick=1.4,
                    zorder=3,
                )
                xs += [low, high]
            else:
                ax.plot([value], [y], "o", color=colors[estimator], markersize=5, zorder=3)
            xs.append(value)
            drawn = True
        if not drawn:
            ax.text(
                0.5,
                row,
                "no estimate (no scored rounds)",
                transform=ax.get_yaxis_transform(),
                ha="center",
                va="center",
                color="#777777",
                fontsize=9,
            )
        if row:
            ax.axhline(row - 0.5, color="#e5e5e5", linewidth=0.8, zorder=0)
    handles: list[Any] = [
        Line2D([], [], color=colors[e], marker="o", linewidth=2.2, label=e) for e in estimators
    ]
    if on_policy is not None:
        ax.axvline(on_policy, color=_ON_POLICY_COLOR, linestyle=(0, (5, 3)), linewidth=1.3)
        xs.append(on_policy)
        handles.append(
            Line2D(
                [],
                [],
                color=_ON_POLICY_COLOR,
                linestyle=(0, (5, 3)),
                linewidth=1.3,
                label=f"logged policy, on-policy average  {on_policy:.4f}",
            )
        )
    ax.set_yticks(range(len(names)), [_label(name) for name in names])
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.tick_params(axis="y", length=0)
    if xs:
        lo, hi = min(xs), max(xs)
        pad = 0.08 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("estimated value (mean reward per decision), 95% interval")
    ax.grid(True, axis="x", alpha=0.25, linewidth=0.8)
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.set_title(
        "Estimated value per candidate", loc="left", fontsize=12, fontweight="bold", pad=10
    )
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(4, len(handles)),
        frameon=False,
        fontsize=9,
    )
    return fig


def _plot_weights(result: Mapping[str, Any], details: ReplayDetails) -> Figure:
    """One histogram of importance weights per candidate, its mean and 1 marked."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    names = list(result["candidates"])
    rows, cols = _grid(len(names))
    thousands = FuncFormatter(lambda v, _: f"{v:,.0f}")
    fig = _new_figure(0.7 + 2.7 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        rounds = _rounds(details, name)
        if rounds is None:
            _empty_panel(ax, name, "no scored rounds")
            continue
        w = rounds.weight[np.isfinite(rounds.weight)]
        positive = w[w > 0]
        zeros = int((w == 0).sum())
        ax.set_title(_label(name), loc="left", fontsize=10, fontweight="bold")
        if positive.size == 0:
            _empty_panel(ax, name, f"all {w.size:,} weights are 0")
            continue
        lo, hi = float(positive.min()), float(positive.max())
        mean = float(w.mean())
        constant = hi - lo <= 1e-9 * max(hi, 1.0)  # e.g. ``logged``: every weight is 1
        log_x = not constant and hi / lo > 20
        if constant:
            edges = np.array([lo - 0.01 * hi, hi + 0.01 * hi])
        elif log_x:
            edges = np.geomspace(lo, hi, 50)
        else:
            edges = np.linspace(lo, hi, 41)
        counts, edges = np.histogram(positive, bins=edges)
        ax.stairs(counts, edges, fill=True, color=_HIST_COLOR, alpha=0.75, linewidth=0)
        ax.axvline(1.0, color="#555555", linestyle=(0, (1.5, 2)), linewidth=1.4)
        ax.axvline(mean, color=_MEAN_COLOR, linewidth=1.6)
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif constant:
            ax.set_xlim(min(1.0, lo) - 0.5 * hi, max(1.0, hi) + 0.5 * hi)
        else:
            left, right = min(lo, 1.0, mean), max(hi, 1.0, mean)
            ax.set_xlim(left - 0.05 * (right - left), right + 0.05 * (right - left))
        top = float(w.max())
        note = f"n = {w.size:,}\nmean w = {mean:.3f}"
        note += f"\nmax w = {top:,.0f}" if top >= 1000 else f"\nmax w = {top:.3g}"
        share = _finite((result["candidates"][name].get("diagnostics") or {}).get("ess_share"))
        if share is not None:
            note += f"\nESS/n = {share:.3f}"
        if zeros:
            note += f"\n{zeros:,} with w = 0 (not shown)"
        lines = note.count("\n") + 1
        ax.set_ylim(0, (1.05 + 0.1 * lines) * max(1, int(counts.max())))  # room for the note
        ax.yaxis.set_major_formatter(thousands)
        ax.text(
            0.98,
            0.96,
            note,
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="#333333",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
        )
        ax.set_xlabel("weight w (log scale)" if log_x else "weight w", fontsize=9)
        ax.set_ylabel("rounds", fontsize=9)
        ax.tick_params(labelsize=8)
        _style(ax)
    fig.suptitle(
        "Importance-weight distribution per candidate  (w = π(a|x) / p)",
        x=0.01,
        ha="left",
        fontsize=12,
        fontweight="bold",
    )
    handles = [
        Line2D([], [], color=_MEAN_COLOR, linewidth=1.6, label="mean weight"),
        Line2D(
            [],
            [],
            color="#555555",
            linestyle=(0, (1.5, 2)),
            linewidth=1.4,
            label="w = 1 (the mean of a sound log)",
        ),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False, fontsize=9)
    return fig


def _plot_cumulative(result: Mapping[str, Any], details: ReplayDetails) -> Figure:
    """Per candidate, the running estimates and the running on-policy mean, one y scale."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    names = list(result["candidates"])
    estimators = _estimators(result)
    drawn = [e for e in _RUNNING if e in estimators] or estimators[:3]
    colors = _colors(estimators)
    n = int(details.reward.size)
    burn_in = max(20, n // 20)  # the noisy start: drawn, but not used to choose the y range
    rows, cols = _grid(len(names))
    fig = _new_figure(0.9 + 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    x_all = np.arange(n, dtype=np.float64)
    on_x, on_y = _thin(x_all, np.cumsum(details.reward) / np.arange(1, n + 1))
    settled: list[FloatArray] = [on_y[on_x >= burn_in] if (on_x >= burn_in).any() else on_y]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(on_x, on_y, color=_ON_POLICY_COLOR, linestyle=(0, (5, 3)), linewidth=1.2)
        ax.set_title(_label(name), loc="left", fontsize=10, fontweight="bold")
        _style(ax)
        ax.tick_params(labelsize=8)
        rounds = _rounds(details, name)
        if rounds is None:
            ax.text(
                0.5,
                0.5,
                "no scored rounds",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="#777777",
            )
            continue
        x = rounds.rounds.astype(np.float64)
        for estimator in drawn:
            running = rounds.running.get(estimator)
            if running is None or running.size != x.size:
                continue
            cx, cy = _thin(x, running.astype(np.float64, copy=False))
            if cx.size == 0:
                continue
            ax.plot(cx, cy, color=colors[estimator], linewidth=1.5)
            late = cx >= burn_in
            settled.append(cy[late] if late.any() else cy)
    values = np.concatenate(settled) if settled else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        pad = 0.12 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
        axes.flat[0].set_ylim(lo - pad, hi + pad)
    axes.flat[0].set_xlim(0, max(1, n - 1))
    thousands = FuncFormatter(lambda v, _: f"{v:,.0f}")
    for ax in axes.flat[: len(names)]:
        ax.xaxis.set_major_formatter(thousands)
    for col in range(cols):  # the lowest panel of each column shows the x axis
        bottom = axes[min(rows - 1, (len(names) - 1 - col) // cols), col]
        bottom.xaxis.set_tick_params(labelbottom=True)
        bottom.set_xlabel("round (valid rounds of the log, in order)", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("estimate so far", fontsize=9)
    fig.suptitle(
        "Cumulative estimate over the log",
        x=0.01,
        ha="left",
        fontsize=12,
        fontweight="bold",
    )
    handles = [Line2D([], [], color=colors[e], linewidth=1.5, label=e) for e in drawn]
    handles.append(
        Line2D(
            [],
            [],
            color=_ON_POLICY_COLOR,
            linestyle=(0, (5, 3)),
            linewidth=1.2,
            label="logged reward, running on-policy average",
        )
    )
    fig.legend(
        handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9
    )
    return fig


# --- HTML ---------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    number = _finite(value)
    return "—" if number is None else f"{number:,.{digits}f}"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _e(value)


def _reasons(counts: Mapping[str, Any] | None) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{_e(reason)}&nbsp;{_count(k)}" for reason, k in counts.items())


_CSS: Final = """
:root { color-scheme: light; }
body { margin: 0; background: #f6f7f9; color: #1d2330;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #dde1e7; }
.sub { color: #5b6472; margin: 0 0 18px; }
.guide { background: #fff; border-left: 4px solid #4c78a8; padding: 12px 16px; margin: 18px 0;
  border-radius: 4px; }
.empty { background: #fff4e5; border-left: 4px solid #e8a33d; padding: 12px 16px;
  border-radius: 4px; font-weight: 600; }
table { border-collapse: collapse; background: #fff; margin: 8px 0 6px; font-size: 14px;
  box-shadow: 0 1px 2px rgba(0,0,0,.06); }
th, td { padding: 6px 12px; border-bottom: 1px solid #e8ebef; text-align: right;
  vertical-align: top; }
th { background: #eef1f5; font-weight: 600; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td { font-variant-numeric: tabular-nums; }
td .ci { color: #5b6472; font-size: 13px; white-space: nowrap; }
tr.ref td { color: #5b6472; font-style: italic; }
td.warn { background: #fde8e8; color: #9b1c1c; font-weight: 600; }
code { font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
td:first-child { max-width: 340px; }
th.reasons, td.reasons { text-align: left; max-width: 280px; }
figure { margin: 14px 0 8px; background: #fff; padding: 12px; border-radius: 4px;
  box-shadow: 0 1px 2px rgba(0,0,0,.06); }
figure img { display: block; width: 100%; height: auto; }
figcaption { color: #5b6472; font-size: 13px; margin-top: 6px; }
.note { color: #5b6472; font-size: 13px; }
ul.inputs { margin: 6px 0; padding-left: 20px; }
footer { margin-top: 40px; color: #8a93a1; font-size: 12px; }
"""

_SCRIPT: Final = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.dataset.plotsLoaded = String(loaded.length);
  document.body.dataset.plotsTotal = String(images.length);
});
"""

_GUIDE: Final = (
    "<strong>How to read this page.</strong> Each candidate policy's value (its mean reward per "
    "decision, had it made the decisions in this log) is estimated from the logged decisions "
    "alone, by reweighting each round with the importance weight <em>w = π(a|x) / p</em>: the "
    "candidate's probability of the logged action over the logging policy's. Compare each "
    "candidate with the logged policy's own average reward (the dashed line); intervals are 95% "
    "bootstrap intervals. An interval only accounts for noise, not for a broken comparison: "
    "an estimate is <strong>not trustworthy</strong> when its <em>ESS share</em> (ESS/n, the "
    f"fraction of the log it effectively rests on) is small (below ~{ESS_SHARE_WARN:g}), when "
    "its <em>mean weight</em> is far from 1 (it is 1 in expectation for a sound log: otherwise "
    "the logged propensities or the candidate's probabilities are off), or when its <em>support "
    "deficiency</em> is above 0 (the candidate picks actions the logger could not, which no "
    "reweighting can evaluate). Such cells are highlighted in the diagnostics. In the "
    "cumulative plot a trustworthy estimate settles into a flat line well before the end of the "
    "log; a curve that still drifts or jumps at the end needs a longer log."
)


def _estimates_table(result: Mapping[str, Any], on_policy: float | None) -> str:
    candidates: Mapping[str, Mapping[str, Any]] = result["candidates"]
    estimators = _estimators(result)
    head = "".join(f"<th>{_e(e)}</th>" for e in estimators)
    rows = []
    for name, entry in candidates.items():
        cells = []
        for estimator in estimators:
            cell = entry.get(estimator) or {}
            low, high = _finite(cell.get("ci_low")), _finite(cell.get("ci_high"))
            ci = f"[{low:.4f}, {high:.4f}]" if low is not None and high is not None else "[—]"
            cells.append(f'<td>{_num(cell.get("value"))}<br><span class="ci">{ci}</span></td>')
        scored = _count((entry.get("diagnostics") or {}).get("n", "—"))
        rows.append(f"<tr><td><code>{_e(name)}</code></td><td>{scored}</td>{''.join(cells)}</tr>")
    if on_policy is not None:
        blank = "<td></td>" * max(0, len(estimators) - 1)
        rows.append(
            f'<tr class="ref"><td>logged policy (on-policy average reward)</td>'
            f"<td>{_count(result['n'])}</td><td>{on_policy:.4f}</td>{blank}</tr>"
        )
    return (
        "<table><thead><tr><th>candidate</th><th>rounds scored</th>"
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="note">Each cell: the estimate, and below it its 95% interval.</p>'
    )


def _diagnostics_table(result: Mapping[str, Any]) -> str:
    rows = []
    for name, entry in result["candidates"].items():
        d: Mapping[str, Any] = entry.get("diagnostics") or {}
        share, mean = _finite(d.get("ess_share")), _finite(d.get("mean_weight"))
        deficiency = _finite(d.get("support_deficiency"))
        warn_share = share is not None and share < ESS_SHARE_WARN
        warn_mean = mean is not None and abs(mean - 1.0) > MEAN_WEIGHT_WARN
        warn_support = deficiency is not None and deficiency > 0
        excluded = _reasons(d.get("excluded"))
        if d.get("pmf_file_unused"):
            excluded += f"; {_count(d['pmf_file_unused'])} pmf-file entries unused"

        def cell(text: str, warn: bool) -> str:
            return f'<td class="warn">{text}</td>' if warn else f"<td>{text}</td>"

        rows.append(
            f"<tr><td><code>{_e(name)}</code></td><td>{_count(d.get('n', '—'))}</td>"
            f"<td>{_num(d.get('ess'), 1)}</td>{cell(_num(share, 3), warn_share)}"
            f"{cell(_num(mean, 3), warn_mean)}<td>{_num(d.get('max_weight'), 2)}</td>"
            f"{cell(_num(deficiency, 3), warn_support)}"
            f'<td class="reasons">{excluded}</td></tr>'
        )
    return (
        "<table><thead><tr><th>candidate</th><th>n</th><th>ESS</th><th>ESS/n</th>"
        "<th>mean weight</th><th>max weight</th><th>support deficiency</th>"
        '<th class="reasons">rounds excluded</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<p class="note">n: rounds the candidate scored; ESS: Kish\'s effective sample size '
        "(Σw)² / Σw²; support deficiency: share of rounds where the candidate puts mass on an "
        "action the logger gave probability 0; rounds excluded: rounds the candidate could not "
        f"score, by reason. Highlighted: ESS/n &lt; {ESS_SHARE_WARN:g}, "
        f"|mean weight &minus; 1| &gt; {MEAN_WEIGHT_WARN:g}, support deficiency &gt; 0.</p>"
    )


def _excluded_table(result: Mapping[str, Any]) -> str:
    excluded: Mapping[str, Any] = result.get("excluded") or {}
    n = int(result.get("n") or 0)
    total = n + sum(int(v) for v in excluded.values() if isinstance(v, int))
    if not excluded:
        return f"<p>None: all {total:,} records read were valid.</p>"
    rows = "".join(
        f"<tr><td><code>{_e(reason)}</code></td><td>{_count(k)}</td>"
        f"<td>{(100 * k / total if total and isinstance(k, int) else 0):.2f}%</td></tr>"
        for reason, k in excluded.items()
    )
    return (
        f"<p>{total - n:,} of the {total:,} records read were excluded and never used "
        f"({n:,} valid rounds).</p><table><thead><tr><th>reason</th><th>records</th>"
        f"<th>share of records read</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _inputs(result: Mapping[str, Any], logs: Sequence[str]) -> str:
    items = "".join(f"<li><code>{_e(path)}</code></li>" for path in logs)
    listing = f'<ul class="inputs">{items}</ul>' if logs else "<p>(not recorded)</p>"
    candidates = ", ".join(f"<code>{_e(name)}</code>" for name in result.get("candidates") or {})
    estimators = ", ".join(f"<code>{_e(name)}</code>" for name in _estimators(result))
    return (
        f"<p>Logs:</p>{listing}<p>Candidates (targets): {candidates or '—'}<br>"
        f"Estimators: {estimators or '—'}</p>"
    )


def _page(
    result: Mapping[str, Any],
    details: ReplayDetails | None,
    *,
    title: str,
    logs: Sequence[str],
    plots: Sequence[tuple[str, str, str]],
) -> str:
    n = int(result.get("n") or 0)
    candidates = result.get("candidates") or {}
    on_policy = _on_policy_mean(details)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    figures = {
        file: (
            f'<figure><img src="{_e(file)}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
        for file, alt, caption in plots
    }
    summary = f"{n:,} valid rounds · {len(candidates)} candidate{'s' * (len(candidates) != 1)}"
    if on_policy is not None:
        summary += f" · logged policy's average reward {on_policy:.4f}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>",
        "<body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">Off-policy evaluation of the propensity log · {_e(summary)}</p>',
    ]
    if n == 0:
        parts.append(
            '<p class="empty">No valid rounds in the log: there is nothing to estimate or plot. '
            "See below why the records were excluded.</p>"
        )
    else:
        parts.append(f'<p class="guide">{_GUIDE}</p>')
        if candidates:
            parts += ["<h2>Estimates</h2>", _estimates_table(result, on_policy)]
            parts.append(figures.get("estimates.png", ""))
            parts += ["<h2>Weight diagnostics</h2>", _diagnostics_table(result)]
            parts.append(figures.get("weights.png", ""))
            if "cumulative.png" in figures:
                parts += ["<h2>Cumulative estimate over the log</h2>", figures["cumulative.png"]]
    parts += ["<h2>Records excluded from the log</h2>", _excluded_table(result)]
    parts += ["<h2>Inputs</h2>", _inputs(result, logs)]
    parts.append(f"<footer>Written by <code>loopwise replay --report</code> · {stamp}</footer>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
