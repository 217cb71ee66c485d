"""``loopwise report``: the closed-loop experiment report (reward rates, lift, oracle, uniform).

The closed-loop simulator writes one JSON line per decision::

    {"t": int (decision index), "timestamp": ms, "user_id", "arm": "vw" | "popularity" | …,
     "item_id", "propensity", "reward": float,
     "expected_reward": float  (ground-truth expected reward of the shown item),
     "oracle": float           (ground-truth expected reward of the best item for that user
                                and context),
     "uniform": float          (mean ground-truth expected reward over the candidates)}

:func:`build_report` summarizes it per arm, :func:`print_report` renders the summary as rich
tables and :func:`plot_report` draws the reward rate over time.

Statistics (``z = Φ⁻¹(0.975) ≈ 1.96``, intervals are 95%; per arm, ``x_i`` are its per-decision
values, treated as independent):

* mean with a normal interval: ``x̄ = Σ x_i / n``, ``s² = Σ (x_i - x̄)² / (n - 1)``,
  ``CI = x̄ ± z · s / √n`` (no interval when ``n < 2``);
* lift of arm ``a`` over the holdout ``h`` — **Welch normal approximation**, not a bootstrap:
  ``Δ = x̄_a - x̄_h``, ``SE_Δ = √(s_a²/n_a + s_h²/n_h)``, ``CI = Δ ± z · SE_Δ``, two-sided
  ``p = erfc(|Δ / SE_Δ| / √2)``;
* relative lift ``rel = x̄_a / x̄_h - 1`` with the delta method for the ratio of two independent
  means: ``SE_rel = √(SE_a² / x̄_h² + x̄_a² · SE_h² / x̄_h⁴)``, ``CI = rel ± z · SE_rel`` (none when
  ``x̄_h = 0``);
* both for the observed ``reward`` and for ``expected_reward`` (the ground truth of the shown
  item: the same comparison without the Bernoulli noise of the response, so much tighter);
* against the ground truth: ``vs_oracle = r̄ / ō`` and ``vs_uniform = r̄ / ū`` where ``ō`` and
  ``ū`` are the means of ``oracle`` and ``uniform`` over the arm's own decisions (observed
  reward ``r̄``; ``expected_vs_*`` use the mean expected reward ``ē`` instead), and
  ``gap_closed = (ē - ū) / (ō - ū)``: 0 is as good as choosing at random, 1 is the oracle.

Decisions are ordered by ``t``; "the last N decisions" are the N with the largest ``t`` over
all arms. Lines that are not JSON objects with ``t``, ``arm`` and a numeric ``reward`` (e.g. a
truncated last line of a run still writing) are skipped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

Z95 = 1.959963984540054  # Φ⁻¹(0.975)
_NUMERIC = ("expected_reward", "oracle", "uniform")


@dataclass(slots=True)
class Decisions:
    """The columns of a closed-loop decision file, sorted by ``t``.

    ``arm`` holds indices into ``arms``; missing ``expected_reward``/``oracle``/``uniform``
    values are NaN.
    """

    t: np.ndarray
    arm: np.ndarray
    arms: list[str]
    reward: np.ndarray
    expected_reward: np.ndarray
    oracle: np.ndarray
    uniform: np.ndarray
    invalid_lines: int = 0

    def __len__(self) -> int:
        return len(self.t)

    def tail(self, n: int) -> Decisions:
        """The last ``n`` decisions (largest ``t``)."""
        cut = slice(max(0, len(self) - n), None)
        return Decisions(
            self.t[cut],
            self.arm[cut],
            self.arms,
            self.reward[cut],
            self.expected_reward[cut],
            self.oracle[cut],
            self.uniform[cut],
            self.invalid_lines,
        )


def load_decisions(path: Path | str) -> Decisions:
    """Read a closed-loop decision file into arrays (see the module docstring for the format)."""
    path = Path(path)
    ts: list[int] = []
    arm_codes: list[int] = []
    arms: dict[str, int] = {}
    columns: dict[str, list[float]] = {"reward": [], **{name: [] for name in _NUMERIC}}
    invalid = 0
    with path.open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                t = row["t"]
                arm = str(row["arm"])
                reward = float(row["reward"])
                if isinstance(t, bool) or not isinstance(t, int) or not math.isfinite(reward):
                    raise ValueError
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                invalid += 1
                continue
            ts.append(t)
            arm_codes.append(arms.setdefault(arm, len(arms)))
            columns["reward"].append(reward)
            for name in _NUMERIC:
                value = row.get(name)
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                columns[name].append(float(value) if ok else math.nan)
    order = np.argsort(np.asarray(ts, dtype=np.int64), kind="stable")

    def column(values: list[Any], dtype: Any) -> np.ndarray:
        return np.asarray(values, dtype=dtype)[order]

    return Decisions(
        t=column(ts, np.int64),
        arm=column(arm_codes, np.int64),
        arms=list(arms),
        reward=column(columns["reward"], np.float64),
        expected_reward=column(columns["expected_reward"], np.float64),
        oracle=column(columns["oracle"], np.float64),
        uniform=column(columns["uniform"], np.float64),
        invalid_lines=invalid,
    )


# --- statistics ---------------------------------------------------------------------------------


def mean_ci(values: np.ndarray) -> dict[str, Any]:
    """``{"n", "mean", "se", "ci_low", "ci_high"}`` of the finite values: ``x̄ ± z·s/√n``."""
    x = values[np.isfinite(values)]
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "se": None, "ci_low": None, "ci_high": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "se": None, "ci_low": None, "ci_high": None}
    se = float(x.std(ddof=1)) / math.sqrt(n)
    return {"n": n, "mean": mean, "se": se, "ci_low": mean - Z95 * se, "ci_high": mean + Z95 * se}


def welch_lift(arm: dict[str, Any], holdout: dict[str, Any]) -> dict[str, Any] | None:
    """Difference and relative lift of two :func:`mean_ci` results (see the module docstring)."""
    if arm["se"] is None or holdout["se"] is None:
        return None
    ma, mh, sa, sh = arm["mean"], holdout["mean"], arm["se"], holdout["se"]
    diff = ma - mh
    se = math.hypot(sa, sh)
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    result: dict[str, Any] = {
        "diff": {"value": diff, "se": se, "ci_low": diff - Z95 * se, "ci_high": diff + Z95 * se},
        "relative": None,
        "z": z,
        "p_value": math.erfc(abs(z) / math.sqrt(2)),
    }
    if mh != 0:
        rel = ma / mh - 1
        rel_se = math.sqrt(sa**2 / mh**2 + ma**2 * sh**2 / mh**4)
        result["relative"] = {
            "value": rel,
            "se": rel_se,
            "ci_low": rel - Z95 * rel_se,
            "ci_high": rel + Z95 * rel_se,
        }
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _section(d: Decisions, label: str, holdout: str, window: int) -> dict[str, Any]:
    n = len(d)
    section: dict[str, Any] = {
        "label": label,
        "n": n,
        "t_first": int(d.t[0]) if n else None,
        "t_last": int(d.t[-1]) if n else None,
        "oracle": mean_ci(d.oracle),
        "uniform": mean_ci(d.uniform),
        "arms": {},
    }
    stats: dict[str, dict[str, Any]] = {}
    for code, name in enumerate(d.arms):
        mask = d.arm == code
        k = int(mask.sum())
        if k == 0:
            continue
        reward = d.reward[mask]
        expected = mean_ci(d.expected_reward[mask])
        oracle = mean_ci(d.oracle[mask])["mean"]
        uniform = mean_ci(d.uniform[mask])["mean"]
        rate = mean_ci(reward)
        gap = None
        if expected["mean"] is not None and oracle is not None and uniform is not None:
            gap = _ratio(expected["mean"] - uniform, oracle - uniform)
        stats[name] = {
            "n": k,
            "share": k / n,
            "reward": rate,
            "expected_reward": expected,
            "oracle": oracle,
            "uniform": uniform,
            "vs_oracle": _ratio(rate["mean"], oracle),
            "vs_uniform": _ratio(rate["mean"], uniform),
            "expected_vs_oracle": _ratio(expected["mean"], oracle),
            "expected_vs_uniform": _ratio(expected["mean"], uniform),
            "gap_closed": gap,
            "recent_reward": mean_ci(reward[-window:]),
            "lift": None,
        }
    base = stats.get(holdout)
    for name, arm in stats.items():
        if base is None or name == holdout:
            continue
        arm["lift"] = {
            "reward": welch_lift(arm["reward"], base["reward"]),
            "expected_reward": welch_lift(arm["expected_reward"], base["expected_reward"]),
        }
    # Holdout last, the others by decreasing traffic.
    order = sorted(stats, key=lambda a: (a == holdout, -stats[a]["n"], a))
    section["arms"] = {name: stats[name] for name in order}
    return section


def build_report(
    path: Path | str,
    *,
    holdout: str = "popularity",
    last: int | None = None,
    window: int = 2000,
) -> dict[str, Any]:
    """The closed-loop report of a decision file, as a JSON-ready dict.

    ``{"path", "holdout", "holdout_present", "confidence": 0.95, "interval": "welch-normal",
    "window", "n", "invalid_lines", "arms": [names], "sections": {"all": S, "last": S}}``
    (``"last"`` only when ``last`` is given), where each section ``S`` is
    ``{"label", "n", "t_first", "t_last", "oracle": M, "uniform": M, "arms": {arm: A}}``,
    ``M = {"n", "mean", "se", "ci_low", "ci_high"}`` (normal interval, module docstring) and
    ``A = {"n", "share", "reward": M, "expected_reward": M, "oracle", "uniform", "vs_oracle",
    "vs_uniform", "expected_vs_oracle", "expected_vs_uniform", "gap_closed", "recent_reward": M,
    "lift": {"reward": L, "expected_reward": L} | None}``; ``recent_reward`` is the reward rate
    over the arm's last ``window`` decisions (where its curve in :func:`plot_report` ends) and
    ``L = {"diff": {"value", "se", "ci_low", "ci_high"}, "relative": {…} | None, "z",
    "p_value"}`` is the Welch lift over ``holdout`` (None for the holdout itself, or when an
    arm has fewer than 2 decisions). Raises ``ValueError`` if the file has no valid decision.
    """
    if last is not None and last < 1:
        raise ValueError(f"last must be a positive number of decisions, not {last}")
    if window < 1:
        raise ValueError(f"window must be a positive number of decisions, not {window}")
    decisions = load_decisions(path)
    if len(decisions) == 0:
        raise ValueError(
            f"{path} has no decision lines ({decisions.invalid_lines} invalid): expected JSON "
            'lines like {"t": 0, "arm": "vw", "reward": 1.0, …} from the closed-loop simulator'
        )
    sections = {"all": _section(decisions, f"all {len(decisions):,} decisions", holdout, window)}
    if last is not None:
        tail = decisions.tail(last)
        sections["last"] = _section(tail, f"last {len(tail):,} decisions", holdout, window)
    return {
        "path": str(path),
        "holdout": holdout,
        "holdout_present": holdout in decisions.arms,
        "confidence": 0.95,
        "interval": "welch-normal",
        "window": window,
        "n": len(decisions),
        "invalid_lines": decisions.invalid_lines,
        "arms": list(decisions.arms),
        "sections": sections,
    }


# --- rendering ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(m: dict[str, Any] | None, digits: int = 4) -> str:
    if m is None or m.get("ci_low") is None:
        return "-"
    return f"[{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _pct_ci(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    return f"{100 * m['value']:+.1f}% [{100 * m['ci_low']:+.1f}, {100 * m['ci_high']:+.1f}]"


def _signed(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    return f"{m['value']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"


def _p(lift: dict[str, Any] | None) -> str:
    if lift is None:
        return "-"
    p = lift["p_value"]
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _lift_style(lift: dict[str, Any] | None) -> str:
    if lift is None:
        return ""
    diff = lift["diff"]
    if diff["ci_low"] > 0:
        return "green"
    if diff["ci_high"] < 0:
        return "red"
    return ""


def print_report(report: dict[str, Any], console: Console) -> None:
    """Render :func:`build_report`'s dict: per section, a table of arms and a table of lifts."""
    holdout = report["holdout"]
    console.print(
        f"[bold]Closed-loop report[/bold] {report['path']}: {report['n']:,} decisions, "
        f"arms {', '.join(report['arms'])}; 95% intervals (normal; lift: Welch)"
    )
    if report["invalid_lines"]:
        console.print(f"[yellow]{report['invalid_lines']:,} invalid lines skipped[/yellow]")
    if not report["holdout_present"]:
        console.print(f"[yellow]holdout arm {holdout!r} is not in the file: no lift[/yellow]")
    for section in report["sections"].values():
        span = f"t {section['t_first']:,} … {section['t_last']:,}"
        arms = Table(title=f"{section['label']} ({span})", title_justify="left")
        for header in ("arm", "n", "share", "reward rate", "95% CI", "expected", "95% CI"):
            arms.add_column(header, justify="left" if header == "arm" else "right")
        for header in ("÷ oracle", "÷ uniform", "gap closed"):
            arms.add_column(header, justify="right")
        for name, a in section["arms"].items():
            label = f"{name} (holdout)" if name == holdout else name
            arms.add_row(
                label,
                f"{a['n']:,}",
                f"{100 * a['share']:.1f}%",
                _num(a["reward"]["mean"]),
                _ci(a["reward"]),
                _num(a["expected_reward"]["mean"]),
                _ci(a["expected_reward"]),
                _num(a["vs_oracle"], 3),
                _num(a["vs_uniform"], 3),
                _num(a["gap_closed"], 3),
            )
        for name in ("oracle", "uniform"):
            ref = section[name]
            arms.add_row(
                f"[dim]{name} (ground truth)[/dim]",
                f"[dim]{section['n']:,}[/dim]",
                "",
                f"[dim]{_num(ref['mean'])}[/dim]",
                f"[dim]{_ci(ref)}[/dim]",
                f"[dim]{_num(ref['mean'])}[/dim]",
                f"[dim]{_ci(ref)}[/dim]",
                "",
                "",
                "",
            )
        console.print(arms)
        lifted = {name: a for name, a in section["arms"].items() if a["lift"] is not None}
        if not lifted:
            continue
        lifts = Table(title=f"lift over {holdout} ({section['label']})", title_justify="left")
        lifts.add_column("arm")
        for header in ("Δ reward [95% CI]", "relative", "p", "Δ expected [95% CI]", "relative"):
            lifts.add_column(header, justify="right")
        for name, a in lifted.items():
            observed, expected = a["lift"]["reward"], a["lift"]["expected_reward"]
            lifts.add_row(
                name,
                f"[{_lift_style(observed)}]{_signed(observed and observed['diff'])}[/]"
                if _lift_style(observed)
                else _signed(observed and observed["diff"]),
                _pct_ci(observed and observed["relative"]),
                _p(observed),
                _signed(expected and expected["diff"]),
                _pct_ci(expected and expected["relative"]),
            )
        console.print(lifts)


# --- plot ---------------------------------------------------------------------------------------


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """``m_k = mean(x_{k-w+1} … x_k)`` with ``w = window`` (the expanding mean while ``k < w``)."""
    x = np.asarray(values, dtype=np.float64)
    csum = np.concatenate(([0.0], np.cumsum(x)))
    k = np.arange(1, x.size + 1)
    lo = np.maximum(0, k - window)
    return (csum[k] - csum[lo]) / (k - lo)


def _thin(x: np.ndarray, y: np.ndarray, points: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= points:
        return x, y
    idx = np.unique(np.linspace(0, x.size - 1, points).round().astype(np.int64))
    return x[idx], y[idx]


_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_HOLDOUT_COLOR = "#ff7f0e"


def plot_report(
    path: Path | str,
    png: Path | str,
    window: int = 2000,
    *,
    holdout: str = "popularity",
    title: str | None = None,
) -> Path:
    """Draw the reward rate over time per arm to ``png``; return ``png``.

    Uses matplotlib's object API (a ``Figure`` rendered by Agg, no pyplot, no global backend
    change), so it works headless and from threads.

    Each arm's curve is the rolling mean of its observed reward over its own last ``window``
    decisions (``m_k`` of :func:`rolling_mean`, the expanding mean before ``window`` decisions;
    drawn once an arm has ``min(window, n_arm) / 5`` decisions), placed at the decision index
    ``t`` of the newest one, so every curve has the same noise whatever its traffic share. The
    oracle (dashed) and uniform (dotted) reference lines are rolling means over the last
    ``window`` decisions of all arms, the band between them shaded: the room a policy has.
    """
    if window < 1:
        raise ValueError(f"window must be a positive number of decisions, not {window}")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    d = load_decisions(path)
    if len(d) == 0:
        raise ValueError(f"{path} has no decision lines to plot")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 5.8), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    x_all = d.t.astype(np.float64)

    first = max(1, min(window, len(d)) // 5) - 1  # skip the noisiest start of the curves
    refs: dict[str, np.ndarray] = {}
    for name in ("oracle", "uniform"):
        values = getattr(d, name)
        ok = np.isfinite(values)
        if ok.any():
            refs[name] = np.full(len(d), np.nan)
            refs[name][ok] = rolling_mean(values[ok], window)
            refs[name][:first] = np.nan
    if "oracle" in refs and "uniform" in refs:
        xs, lo = _thin(x_all, refs["uniform"])
        _, hi = _thin(x_all, refs["oracle"])
        ax.fill_between(xs, lo, hi, color="#9aa5b1", alpha=0.12, linewidth=0, zorder=0)
    styles = {
        "oracle": {"color": "#222222", "linestyle": (0, (6, 3)), "linewidth": 1.4},
        "uniform": {"color": "#666666", "linestyle": (0, (1.5, 2)), "linewidth": 1.8},
    }
    for name, series in refs.items():
        xs, ys = _thin(x_all, series)
        mean = float(np.nanmean(getattr(d, name)))
        style = styles[name]
        ax.plot(
            xs,
            ys,
            label=f"{name} (ground truth)  {mean:.4f}",
            zorder=2,
            color=style["color"],
            linestyle=style["linestyle"],
            linewidth=style["linewidth"],
        )

    others = iter(_COLORS)
    order = sorted(range(len(d.arms)), key=lambda c: (d.arms[c] == holdout, d.arms[c]))
    expected_drawn = False
    for code in order:
        name = d.arms[code]
        mask = d.arm == code
        n_arm = int(mask.sum())
        if n_arm == 0:
            continue
        color = _HOLDOUT_COLOR if name == holdout else next(others, None)
        start = max(1, min(window, n_arm) // 5) - 1
        xs = x_all[mask][start:]
        expected = d.expected_reward[mask]
        if np.isfinite(expected).all():
            ex, ey = _thin(xs, rolling_mean(expected, window)[start:])
            ax.plot(ex, ey, color=color, linewidth=1.0, alpha=0.55, zorder=2.5)
            expected_drawn = True
        rx, ry = _thin(xs, rolling_mean(d.reward[mask], window)[start:])
        label = f"{name}{' (holdout)' if name == holdout else ''}"
        label += f"  {d.reward[mask].mean():.4f}  (n={n_arm:,})"
        ax.plot(rx, ry, color=color, linewidth=2.0, label=label, zorder=3)

    ax.set_xlabel("decision index t")
    ax.set_ylabel("reward rate (mean reward)")
    ax.set_title(
        title or f"Closed-loop reward rate per arm — {Path(path).name}",
        loc="left",
        fontsize=13,
        fontweight="bold",
        pad=20,
    )
    note = (
        f"{len(d):,} decisions · rolling means over each arm's last {window:,} decisions"
        " (references: over all decisions) · legend: whole-run means"
    )
    subtitle = ax.text(
        0.0, 1.012, note, transform=ax.transAxes, fontsize=9, color="#555555", va="bottom"
    )
    subtitle.set_in_layout(False)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlim(float(d.t[0]), float(d.t[-1]))
    ax.grid(True, alpha=0.25, linewidth=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    drawn = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()])
    top = float(np.nanmax(drawn)) if np.isfinite(drawn).any() else 0.0
    ax.set_ylim(0, top * 1.08 if top > 0 else 1)
    handles, labels = ax.get_legend_handles_labels()
    n_refs = len(refs)  # the reference lines were drawn first: list the arms first
    handles, labels = handles[n_refs:] + handles[:n_refs], labels[n_refs:] + labels[:n_refs]
    if expected_drawn:
        handles.append(Line2D([], [], color="#555555", linewidth=1.0, alpha=0.55))
        labels.append("thin: ground-truth expected reward of the shown items")
    fig.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    fig.savefig(png)
    return png
