"""Learner: examples/s of our learning path beside Vowpal Wabbit's own driver on the same examples.

**The examples.** ``--examples`` propensity-log records (docs/contracts.md §6), made
offline by the worker's pure decision core on the simulator's marketplace
(``--users`` users, ``--items`` items; as ``bench_worker``: 5,000 x 200): organic
traffic is folded into each user's state (``streams/user_state.py``), and every
``view`` gets a decision from :class:`~loopwise.streams.decisions.DecisionMaker`
(default arms, vw 0.9 / popularity 0.1, ``max_candidates`` 100, ``pmf_floor`` 0.001)
whose reward is the click drawn from the marketplace's hidden truth; the
generator's policies learn each record as it closes (a closed loop, so the
propensities are those of a learning policy, not uniform). Each record holds 100
candidates with their catalog features, the user's features and the context
(~10 KB of JSON). ``--holdout`` more records, never learned, are kept to compare
the models. Records go to a JSONL file and, rendered as VW text, to a ``.vw``
file; the timed loops read them in chunks of 1,000 (untimed), so memory stays
small and file reading is not timed (except by VW's driver, which reads its file
itself, from the page cache: the file is read once beforehand).

**What is timed**, each from a fresh model with the same VW arguments
(``--vw-args``, default the worker's: ``LOOPWISE_VW_ARGS`` or
:data:`~loopwise.learners.vw_policy.DEFAULT_ARGS`, plus ``--random_seed 0``):

* ``ours``: what ``streams/learner.py`` does per record for the VW arm, without
  Kafka or Redis: :meth:`LogRecord.from_json <loopwise.learners.log_record.LogRecord.from_json>`
  (orjson + the record's checks), ``shared()``, ``action_list()`` and
  :meth:`VWPolicy.learn <loopwise.learners.vw_policy.VWPolicy.learn>` (features,
  VW text, VW's parser and learner through its native binding);
* ``learner``: :meth:`Learner.learn <loopwise.streams.learner.Learner.learn>` itself,
  every policy of the default arms (vw, and the popularity holdout on its own arm's
  records), the pre-filter's popularity and the reward monitor (skip: ``--no-learner``);
* ``native vw``: VW's own C++ driver on the ``.vw`` file, ``-d FILE`` with the same
  arguments: a ``pylibvw.vw`` workspace made with them, then its ``run_parser()`` (timed
  alone). There is no ``vw`` command-line binary here: PyPI's ``vowpalwabbit`` wheel
  ships only the Python extension (its ``python -m vowpalwabbit ARGS`` stand-in makes a
  ``Workspace``, which does the same), and Debian (bookworm) has no ``vowpal-wabbit``
  package. ``run_parser`` is pylibvw's ``start_parser``, ``generic_driver``,
  ``end_parser``: the driver loop the ``vw`` binary runs, a parser thread feeding the
  learning thread (the binary's ``--onethread`` is not available through pylibvw).
  ``pyvw.Workspace(arg_str="... -d FILE")`` would call it inside its constructor; the
  native class is used so that only the run is timed;
* ``pyvw text loop`` (skip both pyvw rows: ``--no-pyvw``): the same VW text, already
  rendered, given to VW one example at a time in a Python loop through the native
  binding the adapter uses (``_parse``, ``learn_multi``, ``_finish_example_multi_ex``):
  ours without JSON and feature rendering;
* ``pyvw learn only``: each example parsed by VW (untimed), then only its ``learn_multi``
  timed, then finished (untimed): VW's learning alone.

Rates are examples per wall-clock second; ``CPU µs/example`` is this process's user +
system CPU time (all threads: VW's driver parses in a second thread) per example, and
``ctx switches/example`` its context switches (VW's driver hands parsed examples from
its parser thread to the learning thread). ``ours / native`` is the ratio of the rates, also
given by CPU time (on a shared machine wall time includes waiting for a core).

**Same work.** The ``.vw`` file holds, per record, exactly the text the adapter gives
VW (:func:`~loopwise.learners.features.vw_adf_lines` with the label
``chosen:-reward/reward_scale:propensity``, joined and stripped as in
``VWPolicy.learn``). After learning, every model gives its pmf over the candidates
of each held-out record; every pmf must equal ours within ``--tolerance`` (1e-9), each
VW workspace must have counted ``--examples`` examples, and their VW average losses
must agree; otherwise the bench fails (exit 1). The figures are measured, never
set: a model that learned other examples does not pass.

Writes ``bench/results/learner.json``. Run: ``make bench-learner`` or
``loopwise bench learner`` (20,000 examples: generating them takes about as long as all
the timed paths together, 1.5 to 3 minutes in all on 2 shared cores; a quick look:
``--examples 2000``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table
from vowpalwabbit import pyvw

from bench.common import write_json
from loopwise.config import load_settings
from loopwise.learners.arms import ArmAssigner
from loopwise.learners.features import vw_adf_lines
from loopwise.learners.log_record import LogRecord
from loopwise.learners.policy import Action, ActionTable
from loopwise.learners.popularity import PopularityPolicy
from loopwise.learners.vw_policy import DEFAULT_ARGS, VWPolicy
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.streams.decisions import DecisionMaker
from loopwise.streams.decoding import Event
from loopwise.streams.learner import Learner, build_policies
from loopwise.streams.reward_join import OpenDecision, RewardJoin, RewardRule
from loopwise.streams.user_state import StateRules, UserState, apply_event

console = Console(width=None if sys.stdout.isatty() else 120)  # logs: wide tables
RESULTS = Path(__file__).parent / "results"
NATIVE = pyvw.pylibvw.vw
CHUNK = 1000
SHORT = {
    "ours": "ours (from_json + VWPolicy.learn)",
    "learner": "Learner.learn (all arms)",
    "native": "native vw (-d FILE)",
    "pyvw_text": "pyvw text loop",
    "pyvw_learn": "pyvw learn only",
}
DEFAULT_ARMS = {"vw": 0.9, "popularity": 0.1}
HOLDOUT_ARM = "popularity"


# ------------------------------------------------------------------------------- examples


def example_text(record: LogRecord, table: ActionTable, reward_scale: float = 1.0) -> str:
    """The VW text ``VWPolicy.learn`` gives VW for this record (one multi-line example)."""
    label = (record.chosen, -float(record.reward) / reward_scale, float(record.propensity))
    actions = [table.intern(a) for a in record.action_list()]
    return "\n".join(vw_adf_lines(record.shared(), actions, label)).strip()


def query_text(record: LogRecord, table: ActionTable) -> str:
    """The unlabelled VW text of a record's decision (what ``VWPolicy.pmf`` gives VW)."""
    actions = [table.intern(a) for a in record.action_list()]
    return "\n".join(vw_adf_lines(record.shared(), actions, None)).strip()


def generate(
    n: int,
    holdout: int,
    records_path: Path,
    vw_path: Path,
    *,
    users: int = 5000,
    items: int = 200,
    seed: int = 5,
    vw_args: str = DEFAULT_ARGS,
    max_candidates: int = 100,
    pmf_floor: float = 0.001,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[bytes], dict[str, float]]:
    """Write ``n`` log records (JSONL) and their VW text (examples separated by a blank
    line); return ``holdout`` more records (not written) and a summary of the data."""
    market = Marketplace(MarketConfig(n_users=users, n_items=items, seed=seed))
    catalog = [Action(item, market.item_features(item)) for item in market.items]
    category = {a.id: str(a.features["category"]) for a in catalog}
    policies: dict[str, Any] = {
        "vw": VWPolicy(args=vw_args, seed=0),
        "popularity": PopularityPolicy(),
    }
    maker = DecisionMaker(
        policies,
        ArmAssigner(DEFAULT_ARMS).assign,
        pmf_floor=pmf_floor,
        max_candidates=max_candidates,
        default_arm=HOLDOUT_ARM,
        rng=np.random.default_rng(seed + 1),
    )
    rng = np.random.default_rng(seed + 2)
    rule, rules = RewardRule(), StateRules()
    join = RewardJoin(window_ms=0, rule=rule)  # only its record(): the writer's log record
    states: dict[str, UserState] = {}
    table = ActionTable()
    held: list[bytes] = []
    written = 0
    total_bytes = 0
    rewards = 0.0
    propensities: list[float] = []
    with records_path.open("wb") as records_out, vw_path.open("w") as vw_out:
        for raw_event in market.events():
            user_id = str(raw_event["user_id"])
            state = states.setdefault(user_id, UserState())
            event = Event(
                str(raw_event["event_id"]),
                str(raw_event["type"]),
                user_id,
                str(raw_event["item_id"]),
                int(raw_event["timestamp"]),
                raw_event,
            )
            apply_event(state, event, category.get(event.item_id), rules)
            if event.type != "view":
                continue
            decision = maker.decide(user_id, state, raw_event["context"], catalog, event.timestamp)
            clicked, purchased = market.draw_outcome(
                user_id, decision.item_id, raw_event["context"], rng
            )
            revenue = market.item_features(decision.item_id)["price"] if purchased else 0.0
            reward = rule(int(clicked), int(purchased), revenue)
            # Shown at once, closed with its outcome: the join's own log record.
            shown = OpenDecision(
                decision,
                event.timestamp,
                event.timestamp,
                decision.context,
                clicks=int(clicked),
                purchases=int(purchased),
                revenue=revenue,
            )
            record = join.record(shown)
            raw = record.to_json()
            parsed = LogRecord.from_json(raw)  # the record as the learner will read it
            # The generator's closed loop: its policies learn as the learner would.
            shared, actions = parsed.shared(), parsed.action_list()
            for arm, policy in policies.items():
                if arm != HOLDOUT_ARM or parsed.arm == HOLDOUT_ARM:
                    policy.learn(shared, actions, parsed.chosen, float(parsed.propensity), reward)
            maker.popularity.update(decision.item_id, max(reward, 0.0))
            if written < n:
                records_out.write(raw + b"\n")
                vw_out.write(example_text(parsed, table) + "\n\n")
                written += 1
                total_bytes += len(raw)
                rewards += reward
                propensities.append(float(parsed.propensity))
                if progress is not None:
                    progress(written)
            else:
                held.append(raw)
                if len(held) >= holdout:
                    break
    for policy in policies.values():
        if isinstance(policy, VWPolicy):
            policy.close()
    summary = {
        "records": float(written),
        "mean_record_bytes": total_bytes / max(written, 1),
        "mean_reward": rewards / max(written, 1),
        "median_propensity": float(np.median(propensities)) if propensities else math.nan,
        "candidates": float(min(max_candidates, items)),
        "vw_file_bytes": float(vw_path.stat().st_size),
    }
    return held, summary


def read_chunks(path: Path, size: int = CHUNK) -> Iterator[list[bytes]]:
    """The JSONL file's lines (without their newline), ``size`` at a time."""
    with path.open("rb", buffering=1 << 20) as lines:
        while True:
            chunk = [line.rstrip(b"\n") for line in itertools.islice(lines, size)]
            if not chunk:
                return
            yield chunk


def read_examples(path: Path, size: int = CHUNK) -> Iterator[list[str]]:
    """The VW file's multi-line examples (blank-line separated), ``size`` at a time."""
    with path.open("r", buffering=1 << 20) as lines:
        chunk: list[str] = []
        current: list[str] = []
        for line in lines:
            if line == "\n":
                if current:
                    chunk.append("".join(current).rstrip("\n"))
                    current = []
                    if len(chunk) >= size:
                        yield chunk
                        chunk = []
            else:
                current.append(line)
        if current:
            chunk.append("".join(current).rstrip("\n"))
        if chunk:
            yield chunk


# --------------------------------------------------------------------------------- timing


@dataclass
class Clock:
    """Wall-clock and CPU (user + system, every thread of this process) seconds, summed
    over the timed sections only."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    switches: int = 0  # context switches, voluntary and not (VW's driver hands examples over)
    _wall: float = field(default=0.0, repr=False)
    _usage: Any = field(default=None, repr=False)

    def __enter__(self) -> Clock:
        self._usage = resource.getrusage(resource.RUSAGE_SELF)
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s += time.perf_counter() - self._wall
        now, then = resource.getrusage(resource.RUSAGE_SELF), self._usage
        self.cpu_s += now.ru_utime - then.ru_utime + now.ru_stime - then.ru_stime
        self.switches += now.ru_nvcsw - then.ru_nvcsw + now.ru_nivcsw - then.ru_nivcsw


@dataclass
class Run:
    """One timed path: its clock, examples learned, and the model's pmfs on the held-out
    records (and VW's own counts, for the paths that own a VW workspace)."""

    name: str
    label: str
    examples: int
    clock: Clock
    pmfs: list[list[float]]
    vw_examples: float | None = None
    vw_average_loss: float | None = None

    @property
    def rate(self) -> float:
        return self.examples / self.clock.wall_s if self.clock.wall_s > 0 else math.nan

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.clock.cpu_s / self.examples if self.examples else math.nan


def vw_pmf(workspace: Any, text: str) -> list[float]:
    """A VW workspace's pmf of one unlabelled multi-line example, in action order."""
    raw = NATIVE._parse(workspace, text)
    try:
        NATIVE.predict_multi(workspace, raw)
        scores = raw[0].get_action_scores()
    finally:
        NATIVE._finish_example_multi_ex(workspace, raw)
    p = np.asarray(scores, dtype=np.float64)
    return (p / p.sum()).tolist()


def held_out_queries(held: Sequence[bytes]) -> list[tuple[LogRecord, str]]:
    table = ActionTable()
    out = []
    for raw in held:
        record = LogRecord.from_json(raw)
        out.append((record, query_text(record, table)))
    return out


def policy_pmfs(policy: VWPolicy, queries: Sequence[tuple[LogRecord, str]]) -> list[list[float]]:
    return [policy.pmf(r.shared(), r.action_list()).tolist() for r, _ in queries]


def workspace_run(
    name: str,
    label: str,
    workspace: Any,
    clock: Clock,
    queries: Sequence[tuple[LogRecord, str]],
) -> Run:
    examples = float(workspace.get_weighted_examples())
    loss = float(workspace.get_sum_loss()) / examples if examples else math.nan
    pmfs = [vw_pmf(workspace, text) for _, text in queries]
    return Run(name, label, int(examples), clock, pmfs, examples, loss)


def run_ours(records: Path, vw_args: str, queries: Sequence[tuple[LogRecord, str]], n: int) -> Run:
    policy = VWPolicy(args=vw_args, seed=0)
    clock = Clock()
    for chunk in read_chunks(records):
        with clock:
            for raw in chunk:
                record = LogRecord.from_json(raw)
                policy.learn(
                    record.shared(),
                    record.action_list(),
                    record.chosen,
                    float(record.propensity),
                    float(record.reward),
                )
    if policy.version != n:
        raise AssertionError(f"ours learned {policy.version} examples, not {n}")
    run = Run(
        "ours",
        "LogRecord.from_json + shared() + action_list() + VWPolicy.learn, per record",
        policy.version,
        clock,
        policy_pmfs(policy, queries),
    )
    policy.close()
    return run


def run_learner(
    records: Path, vw_args: str, queries: Sequence[tuple[LogRecord, str]], n: int
) -> Run:
    settings = load_settings(vw_args=vw_args, arms=DEFAULT_ARMS, holdout_arm=HOLDOUT_ARM)
    policies = build_policies(settings)
    learner = Learner(settings, cast(Any, None), policies)  # learn() never touches Redis
    clock = Clock()
    offset = 0
    for chunk in read_chunks(records):
        batch = [(0, offset + i, raw) for i, raw in enumerate(chunk)]
        offset += len(chunk)
        with clock:
            learned = learner.learn(batch)
        if learned != len(batch):
            raise AssertionError(f"the learner learned {learned} of {len(batch)} records")
    vw = policies["vw"]
    assert isinstance(vw, VWPolicy)
    if vw.version != n:
        raise AssertionError(f"the learner's VW learned {vw.version} examples, not {n}")
    run = Run(
        "learner",
        "Learner.learn: every arm (vw, the popularity holdout on its records), the "
        "pre-filter's popularity, the reward monitor",
        learner.learned,
        clock,
        policy_pmfs(vw, queries),
    )
    vw.close()
    return run


def run_sampled(records: Path, vw_args: str, rate: float) -> dict[str, Any]:
    """``Learner.learn`` over the same records at ``learn_sample_rate`` ``rate``: the log
    records consumed a second (what sizes a learner against the log) and those learned."""
    settings = load_settings(
        vw_args=vw_args, arms=DEFAULT_ARMS, holdout_arm=HOLDOUT_ARM, learn_sample_rate=rate
    )
    policies = build_policies(settings)
    learner = Learner(settings, cast(Any, None), policies)
    clock = Clock()
    offset = 0
    for chunk in read_chunks(records):
        batch = [(0, offset + i, raw) for i, raw in enumerate(chunk)]
        offset += len(chunk)
        with clock:
            learner.learn(batch)
    vw = policies["vw"]
    assert isinstance(vw, VWPolicy)
    if vw.version != learner.learned or learner.learned + learner.not_sampled != offset:
        raise AssertionError("the sampled learner lost count of its records")
    vw.close()
    return {
        "learn_sample_rate": rate,
        "records": offset,
        "learned": learner.learned,
        "records_per_s": offset / clock.wall_s,
        "cpu_us_per_record": 1e6 * clock.cpu_s / offset,
    }


def run_native(vw_file: Path, policy_args: str, queries: Sequence[tuple[LogRecord, str]]) -> Run:
    with vw_file.open("rb") as warm:  # into the page cache, as the other paths' chunks are
        while warm.read(1 << 24):
            pass
    workspace = NATIVE([*shlex.split(policy_args), "-d", str(vw_file)])
    clock = Clock()
    with clock:
        workspace.run_parser()
    run = workspace_run(
        "native",
        "VW's C++ driver on the .vw file: -d FILE, run_parser()",
        workspace,
        clock,
        queries,
    )
    workspace.finish()
    return run


def run_text_loop(vw_file: Path, policy_args: str, queries: Sequence[tuple[LogRecord, str]]) -> Run:
    workspace = NATIVE(shlex.split(policy_args))
    clock = Clock()
    for chunk in read_examples(vw_file):
        with clock:
            for text in chunk:
                raw = NATIVE._parse(workspace, text)
                NATIVE.learn_multi(workspace, raw)
                NATIVE._finish_example_multi_ex(workspace, raw)
    run = workspace_run(
        "pyvw_text",
        "the VW text, pre-rendered, through the native binding in a Python loop: _parse, "
        "learn_multi, finish",
        workspace,
        clock,
        queries,
    )
    workspace.finish()
    return run


def run_learn_only(
    vw_file: Path, policy_args: str, queries: Sequence[tuple[LogRecord, str]]
) -> Run:
    workspace = NATIVE(shlex.split(policy_args))
    clock = Clock()
    for chunk in read_examples(vw_file):
        for text in chunk:
            raw = NATIVE._parse(workspace, text)
            with clock:
                NATIVE.learn_multi(workspace, raw)
            NATIVE._finish_example_multi_ex(workspace, raw)
    run = workspace_run(
        "pyvw_learn",
        "learn_multi alone, on examples VW parsed beforehand (parse and finish untimed)",
        workspace,
        clock,
        queries,
    )
    workspace.finish()
    return run


# --------------------------------------------------------------------------------- checks


def disagreements(runs: Sequence[Run], n: int, tolerance: float) -> list[str]:
    """Why the runs did not do the same work (empty: they did): every pmf on the held-out
    records within ``tolerance`` of the first run's, every VW workspace counted ``n``
    examples, and the workspaces' average losses agree."""
    problems: list[str] = []
    reference = runs[0]
    for run in runs[1:]:
        if len(run.pmfs) != len(reference.pmfs):
            problems.append(f"{run.name}: {len(run.pmfs)} held-out pmfs, not {len(reference.pmfs)}")
            continue
        worst = max_pmf_difference(reference.pmfs, run.pmfs)
        if not worst <= tolerance:
            problems.append(
                f"{run.name}: held-out pmfs differ from {reference.name}'s by up to {worst:.3g}"
            )
    losses = [(r.name, r.vw_average_loss) for r in runs if r.vw_average_loss is not None]
    for run in runs:
        if run.vw_examples is not None and run.vw_examples != n:
            problems.append(f"{run.name}: VW counted {run.vw_examples:g} examples, not {n}")
    for name, loss in losses[1:]:
        first_name, first = losses[0]
        assert first is not None and loss is not None
        if not math.isclose(loss, first, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"{name}: VW average loss {loss!r}, {first_name}'s {first!r}")
    return problems


def max_pmf_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    worst = 0.0
    for pa, pb in zip(a, b, strict=True):
        if len(pa) != len(pb):
            return math.inf
        worst = max(worst, float(np.max(np.abs(np.asarray(pa) - np.asarray(pb)))))
    return worst


# ----------------------------------------------------------------------------------- core


def measure(
    n: int,
    *,
    holdout: int = 200,
    users: int = 5000,
    items: int = 200,
    seed: int = 5,
    vw_args: str = DEFAULT_ARGS,
    tolerance: float = 1e-9,
    learner: bool = True,
    python_vw: bool = True,
    sample_rate: float | None = None,
    workdir: Path | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Generate the examples, time every path, check they agree; the result (see the module
    docstring). Raises ``AssertionError`` naming what disagreed."""
    policy_args = VWPolicy(args=vw_args, seed=0).args  # what the adapter hands VW
    with tempfile.TemporaryDirectory(prefix="loopwise-learner-", dir=workdir) as tmp:
        records, vw_file = Path(tmp) / "records.jsonl", Path(tmp) / "examples.vw"
        say(f"generating {n:,} records (+{holdout} held out) with the decision core")
        started = time.perf_counter()
        held, data = generate(
            n, holdout, records, vw_file, users=users, items=items, seed=seed, vw_args=vw_args
        )
        data["generate_s"] = time.perf_counter() - started
        if int(data["records"]) != n:
            raise AssertionError(f"generated {data['records']:g} records, not {n}")
        queries = held_out_queries(held)
        runs: list[Run] = []
        steps: list[tuple[str, Callable[[], Run]]] = [
            ("ours", lambda: run_ours(records, vw_args, queries, n))
        ]
        if learner:
            steps.append(("learner", lambda: run_learner(records, vw_args, queries, n)))
        steps.append(("native vw", lambda: run_native(vw_file, policy_args, queries)))
        if python_vw:
            steps.append(("pyvw text loop", lambda: run_text_loop(vw_file, policy_args, queries)))
            steps.append(("pyvw learn only", lambda: run_learn_only(vw_file, policy_args, queries)))
        for name, step in steps:
            say(f"timing {name}")
            runs.append(step())
        sampled = None
        if sample_rate is not None:
            say(f"timing the learner at learn_sample_rate {sample_rate:g}")
            sampled = run_sampled(records, vw_args, sample_rate)
    problems = disagreements(runs, n, tolerance)
    by_name = {r.name: r for r in runs}
    native = by_name["native"].rate
    result: dict[str, Any] = {
        "examples": n,
        "holdout": len(queries),
        "users": users,
        "items": items,
        "seed": seed,
        "vw_args": policy_args,
        "vowpalwabbit": _vw_version(),
        "python": platform.python_version(),
        "data": data,
        "runs": {
            r.name: {
                "label": r.label,
                "examples": r.examples,
                "wall_s": r.clock.wall_s,
                "cpu_s": r.clock.cpu_s,
                "examples_per_s": r.rate,
                "cpu_us_per_example": r.cpu_us,
                "context_switches_per_example": r.clock.switches / max(r.examples, 1),
                "ratio_to_native": r.rate / native,
                "vw_examples": r.vw_examples,
                "vw_average_loss": r.vw_average_loss,
                "max_heldout_pmf_difference_to_ours": max_pmf_difference(runs[0].pmfs, r.pmfs),
            }
            for r in runs
        },
        "ours_over_native": by_name["ours"].rate / native,
        # On a shared machine wall time includes waiting for a core; CPU time does not.
        "ours_over_native_by_cpu": by_name["native"].cpu_us / by_name["ours"].cpu_us,
        "agree": not problems,
        "problems": problems,
        "tolerance": tolerance,
    }
    if sampled is not None:
        full = by_name.get("learner")
        if full is not None:
            sampled["ratio_to_learner"] = sampled["records_per_s"] / full.rate
        result["sampled"] = sampled
    return result


def _vw_version() -> str:
    from importlib.metadata import version

    return version("vowpalwabbit")


def report(result: dict[str, Any], out: Path) -> None:
    data = result["data"]
    table = Table(
        title=(
            f"{result['examples']:,} logged examples, {data['candidates']:.0f} candidates, "
            f"{data['mean_record_bytes'] / 1024:.1f} KB a record; VW {result['vowpalwabbit']}"
        )
    )
    table.add_column("path")
    table.add_column("examples/s", justify="right")
    table.add_column("CPU µs/example", justify="right")
    table.add_column("ctx switches/example", justify="right")
    table.add_column("vs native", justify="right")
    table.add_column("held-out pmf Δ vs ours", justify="right")
    for name, run in result["runs"].items():
        table.add_row(
            SHORT[name],
            f"{run['examples_per_s']:,.0f}",
            f"{run['cpu_us_per_example']:,.0f}",
            f"{run['context_switches_per_example']:.1f}",
            f"{run['ratio_to_native']:.2f}",
            f"{run['max_heldout_pmf_difference_to_ours']:.1e}",
        )
    console.print(table)
    for name, run in result["runs"].items():
        console.print(f"  {SHORT[name]}: {run['label']}")
    console.print(
        f"ours / native = {result['ours_over_native']:.2f} by examples/s, "
        f"{result['ours_over_native_by_cpu']:.2f} by CPU time; VW args: {result['vw_args']}; "
        f"generating the examples took {data['generate_s']:.0f} s (not timed)"
    )
    sampled = result.get("sampled")
    if sampled is not None:
        vs = sampled.get("ratio_to_learner")
        console.print(
            f"learner at learn_sample_rate {sampled['learn_sample_rate']:g}: "
            f"{sampled['records_per_s']:,.0f} log records/s consumed "
            f"({sampled['learned']:,} of {sampled['records']:,} learned; "
            f"{sampled['cpu_us_per_record']:,.0f} CPU µs a record"
            + (f"; {vs:.2f}x the learner learning every record)" if vs else ")")
        )
    if result["agree"]:
        console.print(
            f"models agree: {result['holdout']} held-out pmfs within {result['tolerance']:g}, "
            "VW's example counts and average losses equal"
        )
    else:
        for problem in result["problems"]:
            console.print(f"[red]DISAGREE[/red] {problem}")
    write_json(out, result, console, orjson.OPT_SERIALIZE_NUMPY)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--examples", type=int, default=20_000, help="logged examples to learn (20000)"
    )
    parser.add_argument(
        "--holdout",
        type=int,
        default=200,
        help="more records, not learned: the models' check (200)",
    )
    parser.add_argument("--users", type=int, default=5000, help="marketplace users (5000)")
    parser.add_argument(
        "--items", type=int, default=200, help="catalog items (200; candidates: at most 100)"
    )
    parser.add_argument("--seed", type=int, default=5, help="marketplace and decisions seed (5)")
    parser.add_argument(
        "--vw-args",
        default=None,
        help="VW arguments of every path (default: the worker's, LOOPWISE_VW_ARGS or "
        "DEFAULT_ARGS; the adapter adds --random_seed 0)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-9,
        help="largest held-out pmf difference allowed between models (1e-9)",
    )
    parser.add_argument(
        "--no-learner", action="store_true", help="skip the Learner.learn (every arm) row"
    )
    parser.add_argument(
        "--no-pyvw", action="store_true", help="skip the two pyvw rows (text loop, learn only)"
    )
    parser.add_argument(
        "--sample-rate",
        type=float,
        default=None,
        help="also time Learner.learn at this learn_sample_rate, in (0, 1]: log records "
        "consumed a second when the policies learn that share of them",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "learner.json", help="results JSON (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.examples < 1 or args.holdout < 1 or args.users < 1 or args.items < 2:
        parser.error("--examples, --holdout and --users must be >= 1, --items >= 2")
    if not args.tolerance >= 0:
        parser.error("--tolerance must be >= 0")
    if args.sample_rate is not None and not 0 < args.sample_rate <= 1:
        parser.error(f"--sample-rate must be in (0, 1], not {args.sample_rate:g}")
    logging.basicConfig(level=logging.WARNING)
    vw_args = args.vw_args or load_settings().vw_args or DEFAULT_ARGS
    result = measure(
        args.examples,
        holdout=args.holdout,
        users=args.users,
        items=args.items,
        seed=args.seed,
        vw_args=vw_args,
        tolerance=args.tolerance,
        learner=not args.no_learner,
        python_vw=not args.no_pyvw,
        sample_rate=args.sample_rate,
        say=lambda text: console.print(text),
    )
    report(result, args.out)
    if not result["agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
