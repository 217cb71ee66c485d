"""Where the worker's time goes: the real worker under py-spy, stage by stage, µs per event.

One run (real Kafka broker, real Redis, started here on free ports):

1. a backlog of ``--events`` simulator events is published first (``bench_worker``'s
   traffic: 5,000 users, 200 items, the catalog first);
2. the real worker (``loopwise worker``, the full loop with the default arms, or
   ``--state-only``: decisions off) starts under ``py-spy record --format raw --rate 200
   --subprocesses --nonblocking --idle --threads --full-filenames`` with the settings in its
   environment (as :func:`loopwise.streams.worker.spawn_worker` hands them), and consumes
   the backlog;
3. from the first applied batch to the last, the worker's CPU time (all threads, and its
   event-loop thread alone) is read from ``/proc`` along with the wall time, and Redis's own
   CPU time from ``INFO cpu``; then the worker gets SIGTERM and py-spy writes the stacks;
4. the same worker runs again without py-spy on a fresh group (``--skip-baseline``: not),
   measured the same way: the profiler's overhead;
5. every sampled stack is put in one stage by :data:`RULES` (below; the first rule that
   matches wins), and each stage's share of the active (not idle) samples is turned into
   CPU µs per event: share x worker CPU seconds in the window / events in the window.

Idle is the event loop waiting in ``select`` (for Kafka, for Redis's replies, for input):
it costs no CPU, so its row is wall time: wall - event-loop-thread CPU per event, from
``/proc`` (the sampled idle share is shown beside it as a check). Startup (imports, app
build, snapshot load) and shutdown samples are left out of the shares.

A stack no rule matches is "other"; its top functions are printed so that the rules can be
improved. ``--reclassify`` applies the rules again to the kept raw profile (no new run).

Run: ``make bench-profile`` or ``.venv/bin/python -m bench.bench_profile [--state-only]``.
Writes ``bench/results/profile.json`` (``profile-state-only.json``), the raw stacks beside
it (``.raw.txt``, not committed), and ``docs/profile.png`` (the modes measured so far).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bench.bench_worker import fresh, preload
from bench.common import bench_settings, own_infra
from loopwise.config import Settings
from loopwise.redis_clients import redis_client

console = Console()
RESULTS = Path(__file__).parent / "results"
DOCS = Path(__file__).parent.parent / "docs"
RATE = 200  # samples per second

# --- classification -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One stage's match: a frame whose function name matches ``func`` and whose file name
    matches ``file`` (``None``: any), searched for ``where``:

    - ``"any"``: anywhere in the stack (the time under that call, callees included);
    - ``"leaf"``: the innermost frame only (the function's own lines);
    - ``"inner"``: the innermost frame that is not the standard library's (the library whose
      code asked for the time, e.g. Faust calling asyncio's queue), within what the event
      loop runs now (the frames after its last ``Handle._run``);
    - ``"root"``: the first frame of what the event loop runs now (a task's coroutine, or a
      callback).

    Function names are py-spy's qualified ones (``RedisStore.commit``); a pattern matches
    the whole name or its last dotted part.
    """

    stage: str
    where: str
    func: str | None = None
    file: str | None = None


RULES: list[Rule] = [
    # The event loop (or a helper thread) waiting: no CPU.
    Rule(
        "idle",
        "leaf",
        r"select|poll|wait|sleep|_worker|get|accept|serve_forever",
        r"/(selectors|threading|queue|socketserver|thread)\.py$",
    ),
    # Not per-event: imports, building the app, restoring the snapshot, stopping.
    Rule(
        "startup / shutdown",
        "any",
        r"_find_and_load|build_app|open_epoch|ensure_topics|_wait_for_group_coordinator|load_snapshot|_stop_on_signal|_shutdown_loop|on_worker_shutdown|stop_and_shutdown",
    ),
    # Faust runs aiokafka's consumer in a thread of its own (mode's ServiceThread, with its
    # own event loop): fetching, parsing records, handing them to the main loop.
    Rule(
        "consumer thread (aiokafka fetch + parse, hand-over)",
        "any",
        r"_start_thread",
        r"/mode/threads\.py$",
    ),
    # The learner agent on the propensity log (its stream iteration included) and snapshots.
    Rule(
        "learner agent (learn, snapshot)",
        "any",
        r"learn|snapshot_and_ack|snapshot_when_idle",
        r"/streams/app\.py$",
    ),
    Rule("learner agent (learn, snapshot)", "any", None, r"/streams/learner\.py$"),
    # Decisions: VW's pmf, then the rest of deciding (features, sampling, serialization).
    Rule("decisions: VW pmf", "any", None, r"/learners/vw_policy\.py$|/vowpalwabbit/"),
    Rule("decisions: candidates (top-k)", "any", r"candidates", r"/streams/decisions\.py$"),
    Rule(
        "decisions: features, sampling, JSON",
        "any",
        r"decide|default_decision|nba_json|Decision\.to_json|_remember|_item_versions|_delete_replaced|_too_large",
        r"/streams/(decisions|reward_join|loop)\.py$",
    ),
    Rule(
        "decisions: features, sampling, JSON",
        "any",
        None,
        r"/learners/(features|popularity|arms|policy)\.py$",
    ),
    # The reward join: stored decisions, views and rewards joined, due decisions closed.
    Rule("reward join / close_due", "any", None, r"/streams/reward_join\.py$"),
    Rule(
        "reward join / close_due",
        "any",
        r"_plan_join|_stored_decisions|own|reads|missing_item_versions",
        r"/streams/loop\.py$",
    ),
    Rule("decisions: features, sampling, JSON", "any", r"plan", r"/streams/loop\.py$"),
    # The 1-second timer (does nothing while batches flow).
    Rule("timers", "any", r"close_idle_decisions|tick", r"/streams/(app|pipeline)\.py$"),
    # The outbox: read from Redis, parsed, sent to the log, trimmed.
    Rule(
        "outbox: Kafka producer (send_log, Faust producer, aiokafka)",
        "any",
        r"send_log|send_deadletters",
        r"/streams/app\.py$",
    ),
    Rule(
        "outbox: Kafka producer (send_log, Faust producer, aiokafka)",
        "any",
        None,
        r"/aiokafka/producer/|/faust/transport/producer\.py$",
    ),
    Rule(
        "outbox: publish (Redis outbox, parse, trim)",
        "any",
        r"publish",
        r"/streams/(checkpoint|pipeline)\.py$",
    ),
    # Redis: the batch's one read pipeline and its one MULTI/EXEC (redis-py packing included).
    Rule(
        "Redis commit (MULTI/EXEC, packing)",
        "any",
        r"commit",
        r"/streams/(redis_store|checkpoint)\.py$",
    ),
    Rule("Redis read (one pipeline)", "any", r"read|item_versions", r"/streams/redis_store\.py$"),
    # Positions (redeliveries) and dedupe bookkeeping.
    Rule(
        "positions / dedupe",
        "any",
        r"_load_positions|positions|_went_back|_check_gaps|_committed|_drop_positions|event_digest|_seen_keys",
        r"/streams/(pipeline|redis_store)\.py$",
    ),
    # The fold: events into user states, catalog updates.
    Rule(
        "fold (user state, catalog)",
        "any",
        r"fold_users|apply_event|drop_forgotten|item_features|_take_catalog",
        r"/streams/(pipeline|user_state)\.py$",
    ),
    Rule("fold (user state, catalog)", "any", None, r"/streams/(user_state|catalog)\.py$"),
    # Decoding and validation (orjson is C: its time is in its caller's line).
    Rule(
        "decode / triage",
        "any",
        None,
        r"/streams/(decoding|deadletter)\.py$|/loopwise/pseudonyms\.py$",
    ),
    Rule("decode / triage", "any", r"triage", r"/streams/pipeline\.py$"),
    # The rest of a batch's own code (building Reads, the plan's positions, retry).
    Rule(
        "pipeline glue (_process own lines, retry)",
        "any",
        None,
        r"/streams/(pipeline|plan|errors)\.py$",
    ),
    # Faust: the per-event ack, the batching, the agent's own lines, the per-event machinery.
    Rule("Faust per-event ack", "any", r"ack", r"/faust/"),
    Rule("take_now batching", "any", None, r"/streams/batching\.py$"),
    Rule("events agent (Message objects, metrics)", "leaf", None, r"/streams/app\.py$"),
    Rule("events agent (Message objects, metrics)", "inner", None, r"/prometheus_client/"),
    Rule(
        "Faust consumer: drain + conductor (per message)",
        "any",
        None,
        r"/faust/transport/(consumer|conductor|drivers/aiokafka)\.py$|/faust/serializers/",
    ),
    Rule(
        "Faust stream iteration (stream, channel, event)",
        "any",
        None,
        r"/faust/(streams|channels|events|topics)\.py$",
    ),
    Rule("Faust/mode other (agents, services, wait_first)", "inner", None, r"/(faust|mode)/"),
    # Tasks that only wait: mode's wait_first makes three per call (the awaited thing, the
    # service's stopped and crashed events) around an asyncio.wait.
    Rule(
        "short-lived waiting tasks (wait_first: Event.wait, asyncio.wait, Queue.get)",
        "root",
        r"Event\.wait|wait|_wait|Queue\.get|sleep|_on_completion|<genexpr>",
        r"/asyncio/(locks|tasks|queues)\.py$|/mode/utils/locks\.py$",
    ),
    Rule("aiokafka (consumer commits, metadata, protocol)", "inner", None, r"/(aiokafka|kafka)/"),
    Rule("redis-py (other)", "inner", None, r"/(redis|hiredis)/"),
    Rule("logging", "inner", None, r"/logging/"),
    Rule("asyncio event loop (scheduling, task steps)", "inner", None, r"/asyncio/"),
]
"""The stages, as rules tried in order on every sampled stack: the first that matches
names its stage; none: "other". Order matters: a specific call (``RedisStore.commit``) comes
before what calls it (the events agent, Faust's agent machinery), the libraries last."""

STARTUP = "startup / shutdown"
NATIVE = "no Python frame (py-spy saw native code only)"
IDLE = "idle"
OTHER = "other"

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    func: str
    file: str
    line: int

    @classmethod
    def parse(cls, text: str) -> Frame:
        m = FRAME.match(text)
        if m is None:
            return cls(text, "", 0)
        return cls(m["func"], m["file"], int(m["line"] or 0))

    def __str__(self) -> str:
        return f"{self.func} ({short(self.file)})"


def short(path: str) -> str:
    """A file name without the machine's prefix: ``faust/streams.py``, ``streams/app.py``."""
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    for root in (str(Path(__file__).resolve().parent.parent) + "/",):
        if path.startswith(root):
            return path[len(root) :]
    return path


def is_stdlib(frame: Frame) -> bool:
    return frame.file.startswith("<") or (
        "/lib/python3" in frame.file and "/site-packages/" not in frame.file
    )


_compiled: dict[str | None, re.Pattern[str] | None] = {}


def _pattern(text: str | None) -> re.Pattern[str] | None:
    if text not in _compiled:
        _compiled[text] = None if text is None else re.compile(text)
    return _compiled[text]


def _matches(rule: Rule, frame: Frame) -> bool:
    func, file = _pattern(rule.func), _pattern(rule.file)
    if file is not None and not file.search(frame.file):
        return False
    if func is None:
        return True
    name = frame.func
    return bool(func.fullmatch(name) or func.fullmatch(name.rsplit(".", 1)[-1]))


def _task_frames(frames: list[Frame]) -> list[Frame]:
    """The frames of what the event loop runs now: those after its last ``Handle._run`` (a
    callback, or a task's step); none when the loop itself runs (``_run_once``'s own lines).
    A stack without an event loop (a helper thread): all of it."""
    start = 0
    for i, f in enumerate(frames):
        name = f.func.rsplit(".", 1)[-1]
        if f.file.endswith("/asyncio/base_events.py") and name == "_run_once":
            start = len(frames)  # the loop's own work, unless a callback runs below
        elif f.file.endswith("/asyncio/events.py") and name == "_run":
            start = i + 1
    return frames[start:]


def classify(frames: list[Frame]) -> str:
    """The stage of one stack (root first): the first rule of :data:`RULES` that matches."""
    if not frames:
        return NATIVE
    task = _task_frames(frames)
    inner = next((f for f in reversed(task) if not is_stdlib(f)), None)
    in_loop = any("/asyncio/" in f.file for f in frames)
    for rule in RULES:
        if rule.where == "leaf":
            if _matches(rule, frames[-1]):
                return rule.stage
        elif rule.where == "root":
            if task and _matches(rule, task[0]):
                return rule.stage
        elif rule.where == "inner":
            if inner is not None and _matches(rule, inner):
                return rule.stage
            if inner is None and in_loop and rule.file == r"/asyncio/":
                return rule.stage  # only the standard library: the event loop itself
        elif any(_matches(rule, f) for f in frames):
            return rule.stage
    return OTHER


@dataclass
class Sample:
    thread: str
    frames: list[Frame]
    count: int


def read_raw(path: Path) -> list[Sample]:
    """py-spy's raw (collapsed) stacks: ``process ...;thread (tid): name;frame;... count``."""
    samples = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = "?"
        while parts and (parts[0].startswith("process ") or parts[0].startswith("thread (")):
            head = parts.pop(0)
            if head.startswith("thread ("):
                thread = head.split(": ", 1)[1] if ": " in head else head
        samples.append(Sample(thread, [Frame.parse(p) for p in parts], int(count)))
    return samples


def aggregate(samples: list[Sample], measured: dict[str, Any]) -> dict[str, Any]:
    """Stages, shares and µs per event from the stacks and the /proc measurements."""
    by_stage: Counter[str] = Counter()
    main_by_stage: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    other_leaves: Counter[str] = Counter()
    other_inner: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    stage_leaves: dict[str, Counter[str]] = {}
    for s in samples:
        stage = classify(s.frames)
        by_stage[stage] += s.count
        if s.thread == "MainThread":
            main_by_stage[stage] += s.count
        if stage in (IDLE, STARTUP):
            continue
        threads[s.thread] += s.count
        leaf = str(s.frames[-1]) if s.frames else "?"
        leaves[leaf] += s.count
        stage_leaves.setdefault(stage, Counter())[leaf] += s.count
        if stage == OTHER:
            other_leaves[leaf] += s.count
            ours = next((f for f in reversed(s.frames) if not is_stdlib(f)), None)
            other_inner[str(ours) if ours else leaf] += s.count
    active = sum(n for stage, n in by_stage.items() if stage not in (IDLE, STARTUP))
    events = measured["events"]
    cpu_us = measured["cpu_s"] * 1e6 / events
    wall_us = measured["wall_s"] * 1e6 / events
    main_cpu_us = measured["main_thread_cpu_s"] * 1e6 / events
    main_window = sum(n for stage, n in main_by_stage.items() if stage != STARTUP)
    stages = []
    for stage in [
        *dict.fromkeys([r.stage for r in RULES if r.stage not in (IDLE, STARTUP)]),
        NATIVE,
        OTHER,
    ]:
        n = by_stage.get(stage, 0)
        share = n / active if active else 0.0
        stages.append(
            {
                "stage": stage,
                "samples": n,
                "share_of_active": share,
                "cpu_us_per_event": share * cpu_us,
            }
        )
    stages.sort(key=lambda r: -r["samples"])
    idle = {
        "stage": IDLE,
        "samples": by_stage.get(IDLE, 0),
        "main_thread_samples": main_by_stage.get(IDLE, 0),
        "sampled_share_of_main_thread": main_by_stage.get(IDLE, 0) / main_window
        if main_window
        else 0.0,
        "wall_us_per_event": max(wall_us - main_cpu_us, 0.0),
        "share_of_wall_from_proc": max(1 - measured["main_thread_cpu_s"] / measured["wall_s"], 0.0),
    }
    return {
        "stages": stages,
        "idle": idle,
        "totals": {
            "active_samples": active,
            "startup_shutdown_samples": by_stage.get(STARTUP, 0),
            "all_samples": sum(by_stage.values()),
            "cpu_us_per_event": cpu_us,
            "main_thread_cpu_us_per_event": main_cpu_us,
            "wall_us_per_event": wall_us,
            "redis_server_cpu_us_per_event": measured.get("redis_cpu_s", 0.0) * 1e6 / events,
        },
        "threads_active_samples": dict(threads.most_common()),
        "top_leaf_functions": [
            {"function": f, "samples": n, "share_of_active": n / active}
            for f, n in leaves.most_common(30)
        ],
        "top_leaves_by_stage": {
            stage: [{"function": f, "samples": n} for f, n in counter.most_common(5)]
            for stage, counter in stage_leaves.items()
        },
        "top_other": [
            {"function": f, "samples": n, "share_of_active": n / active}
            for f, n in other_leaves.most_common(15)
        ],
        "top_other_innermost_non_stdlib": [
            {"function": f, "samples": n, "share_of_active": n / active}
            for f, n in other_inner.most_common(15)
        ],
    }


# --- the run --------------------------------------------------------------------------------


def _cpu_ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (or one of its threads), in clock ticks."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def _child_of(parent: int, timeout_s: float = 30) -> int:
    """The pid of ``parent``'s (py-spy's) child process: the worker."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return int(entry.name)
        time.sleep(0.05)
    raise RuntimeError("py-spy started no worker process")


def _redis_cpu_s(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def py_spy() -> str:
    found = Path(sys.executable).parent / "py-spy"
    if found.is_file():
        return str(found)
    which = shutil.which("py-spy")
    if which is None:
        raise SystemExit("py-spy is not installed: `make install` (it is one of the dev tools)")
    return which


def profile_worker(settings: Settings, n: int, raw: Path | None) -> dict[str, Any]:
    """The worker under py-spy over the backlog (``raw``: where py-spy writes the stacks;
    ``None``: the worker alone, to see py-spy's overhead); the /proc and Redis measurements."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWISE_")}
    env.update(settings.as_env())
    env["LOOPWISE_WORKER_LOG_LEVEL"] = "warning"
    worker_command = [sys.executable, "-m", "loopwise.cli", "worker"]
    command = worker_command if raw is None else [
        py_spy(), "record", "--format", "raw", "--rate", str(RATE), "--subprocesses",
        "--nonblocking", "--idle", "--threads", "--full-filenames", "-o", str(raw),
        "--", *worker_command,
    ]  # fmt: skip
    client = redis_client(settings)
    spy = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    stats_key = settings.key("stats")
    try:
        worker = spy.pid if raw is None else _child_of(spy.pid)
        first: tuple[float, int, int, int, float, int] | None = None
        deadline = time.monotonic() + 900
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not finish in 900 s")
            if spy.poll() is not None:
                raise RuntimeError(f"py-spy (or the worker) exited with {spy.returncode}")
            consumed = int(client.hget(stats_key, "consumed") or 0)
            now = time.perf_counter()
            if consumed:
                ticks, main = _cpu_ticks(worker), _cpu_ticks(worker, worker)
                redis_cpu, spy_ticks = _redis_cpu_s(client), _cpu_ticks(spy.pid)
                if first is None:
                    first = (now, consumed, ticks, main, redis_cpu, spy_ticks)
                elif consumed >= n:
                    break
            time.sleep(0.02)
        assert first is not None
        hz = os.sysconf("SC_CLK_TCK")
        t0, c0, ticks0, main0, redis0, spy0 = first
        measured = {
            "events": consumed - c0,
            "wall_s": now - t0,
            "cpu_s": (ticks - ticks0) / hz,
            "main_thread_cpu_s": (main - main0) / hz,
            "redis_cpu_s": redis_cpu - redis0,
            "py_spy_cpu_s": (spy_ticks - spy0) / hz,
            "consumed_at_start_of_window": c0,
            "consumed": consumed,
            "stats": {_text(k): _text(v) for k, v in client.hgetall(stats_key).items()},
        }
        if raw is None:
            measured["py_spy_cpu_s"] = 0.0
        os.kill(worker, signal.SIGTERM)  # py-spy writes the stacks once its child exits
        spy.wait(timeout=120)
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
        client.close()
    if measured["events"] <= 0 or measured["wall_s"] <= 0:
        raise RuntimeError("one batch held everything: use more --events")
    return measured


# --- report ---------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> None:
    m, totals, idle = result["measured"], result["totals"], result["idle"]
    mode = "state only" if result["config"]["state_only"] else "full loop"
    table = Table(
        title=f"worker ({mode}): {m['events']:,} events in {m['wall_s']:.1f} s "
        f"({m['events'] / m['wall_s']:,.0f}/s); CPU {m['cpu_s']:.1f} s "
        f"(event loop {m['main_thread_cpu_s']:.1f} s)"
    )
    table.add_column("stage")
    table.add_column("% of CPU samples", justify="right")
    table.add_column("CPU µs/event", justify="right")
    for row in result["stages"]:
        if row["samples"]:
            table.add_row(
                row["stage"],
                f"{100 * row['share_of_active']:.1f}",
                f"{row['cpu_us_per_event']:.1f}",
            )
    table.add_row(
        "[bold]worker CPU, all stages", "100.0", f"[bold]{totals['cpu_us_per_event']:.1f}"
    )
    table.add_row(
        "not on a CPU (wall - loop thread CPU)",
        f"({100 * idle['sampled_share_of_main_thread']:.0f}% of loop samples)",
        f"{idle['wall_us_per_event']:.1f} wall",
    )
    table.add_row("[bold]wall per event", "", f"[bold]{totals['wall_us_per_event']:.1f}")
    table.add_row(
        "Redis server CPU (INFO cpu)", "", f"{totals['redis_server_cpu_us_per_event']:.1f}"
    )
    spy_us = m.get("py_spy_cpu_s", 0.0) * 1e6 / m["events"]
    table.add_row("py-spy's own CPU (/proc)", "", f"{spy_us:.1f}")
    console.print(table)
    if "without_py_spy" in m:
        b = m["without_py_spy"]
        cpu, wall = b["cpu_s"] * 1e6 / b["events"], b["wall_s"] * 1e6 / b["events"]
        console.print(
            f"without py-spy: {b['events'] / b['wall_s']:,.0f} events/s, worker CPU "
            f"{cpu:.1f} µs/event, wall {wall:.1f} µs/event "
            f"(under py-spy: {m['events'] / m['wall_s']:,.0f} events/s)"
        )
    other = next(r for r in result["stages"] if r["stage"] == OTHER)
    console.print(
        f"other: {100 * other['share_of_active']:.1f}% of CPU samples; its top functions:"
    )
    for row in result["top_other_innermost_non_stdlib"][:8]:
        console.print(f"  {100 * row['share_of_active']:5.1f}%  {row['function']}")
    console.print(f"threads (active samples): {result['threads_active_samples']}")


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [orjson.loads(p.read_bytes()) for p in paths if p.is_file()]
    if not results:
        return
    stages = [r["stage"] for r in results[0]["stages"]]
    for r in results[1:]:
        stages += [s["stage"] for s in r["stages"] if s["stage"] not in stages]
    stages = [s for s in stages if any(_us(r, s) > 0 for r in results)]
    stages.reverse()
    fig, ax = plt.subplots(figsize=(12, 0.3 * len(stages) + 1.6), constrained_layout=True)
    height = 0.8 / len(results)
    for i, r in enumerate(results):
        mode = "state only" if r["config"]["state_only"] else "full loop"
        m = r["measured"]
        ax.barh(
            [k + i * height for k in range(len(stages))],
            [_us(r, s) for s in stages],
            height=height,
            label=f"{mode}: {r['totals']['cpu_us_per_event']:.0f} CPU µs/event, "
            f"{m['events'] / m['wall_s']:,.0f} events/s",
        )
    ax.set_yticks([k + height * (len(results) - 1) / 2 for k in range(len(stages))], stages)
    ax.set_xlabel("worker CPU µs per event (py-spy samples x /proc CPU time)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Where the worker's time goes", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def markdown(paths: list[Path]) -> str:
    """The README's table: CPU µs per event (share) per stage, one column per mode measured."""
    results = [orjson.loads(p.read_bytes()) for p in paths if p.is_file()]
    if not results:
        return ""
    modes = ["state only" if r["config"]["state_only"] else "full loop" for r in results]
    stages = list(
        dict.fromkeys(s["stage"] for r in results for s in r["stages"] if s["samples"] > 0)
    )
    lines = [
        "| stage | " + " | ".join(f"{m}: CPU µs/event (share)" for m in modes) + " |",
        "| --- |" + " ---: |" * len(results),
    ]
    for stage in stages:
        cells = []
        for r in results:
            row = next((s for s in r["stages"] if s["stage"] == stage), None)
            if row is None or not row["samples"]:
                cells.append("-")
            else:
                share = 100 * row["share_of_active"]
                cells.append(f"{row['cpu_us_per_event']:.1f} ({share:.1f}%)")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    rows = [
        ("**worker CPU, all stages** (/proc)", "cpu_us_per_event", "**{:.1f}**"),
        (
            "not on a CPU: select, or waiting for a core or the GIL (wall - loop thread CPU)",
            None,
            "{:.1f} wall",
        ),
        ("**wall per event**", "wall_us_per_event", "**{:.1f}**"),
        ("Redis server CPU (INFO cpu)", "redis_server_cpu_us_per_event", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        values = [
            r["idle"]["wall_us_per_event"] if key is None else r["totals"][key] for r in results
        ]
        lines.append(f"| {label} | " + " | ".join(fmt.format(v) for v in values) + " |")
    spy, rates, alone = [], [], []
    for r in results:
        m = r["measured"]
        spy.append(f"{m.get('py_spy_cpu_s', 0.0) * 1e6 / m['events']:.1f}")
        rates.append(f"{m['events'] / m['wall_s']:,.0f}")
        b = m.get("without_py_spy")
        alone.append(
            f"{b['events'] / b['wall_s']:,.0f} events/s, {b['cpu_s'] * 1e6 / b['events']:.0f}"
            if b
            else "-"
        )
    lines.append("| py-spy's own CPU (/proc) | " + " | ".join(spy) + " |")
    lines.append("| events/s under py-spy | " + " | ".join(rates) + " |")
    lines.append("| without py-spy: events/s, worker CPU µs/event | " + " | ".join(alone) + " |")
    return "\n".join(lines)


def _us(result: dict[str, Any], stage: str) -> float:
    return next((r["cpu_us_per_event"] for r in result["stages"] if r["stage"] == stage), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, default=200_000, help="events of the backlog (default 200000)"
    )
    parser.add_argument(
        "--state-only", action="store_true", help="the worker with decisions off (user state only)"
    )
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument(
        "--reclassify",
        action="store_true",
        help="no run: apply the rules again to the kept raw stacks of the last run of this mode",
    )
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="do not also run the worker without py-spy (to measure py-spy's overhead)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write docs/profile.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.events < 10_000 and not args.reclassify:
        parser.error("--events must be at least 10000 for a meaningful profile")
    suffix = "-state-only" if args.state_only else ""
    out = RESULTS / f"profile{suffix}.json"
    raw = RESULTS / f"profile{suffix}.raw.txt"

    if args.reclassify:
        if not out.is_file() or not raw.is_file():
            parser.error(f"--reclassify needs {out} and {raw} from a run")
        previous = orjson.loads(out.read_bytes())
        config, measured = previous["config"], previous["measured"]
    else:
        RESULTS.mkdir(exist_ok=True)
        with own_infra("loopwise-profile-") as infra:
            base = bench_settings(infra, batch_size=args.batch_size)
            n = preload(base, args.events)
            settings = fresh(base).model_copy(update={"decisions": not args.state_only})
            console.print(f"profiling the worker over {n:,} events (py-spy, {RATE} Hz)")
            measured = profile_worker(settings, n, raw)
            if not args.skip_baseline:
                console.print("the same without py-spy (its overhead)")
                alone = fresh(base).model_copy(update={"decisions": not args.state_only})
                measured["without_py_spy"] = profile_worker(alone, n, None)
        config = {
            "events": n,
            "state_only": args.state_only,
            "batch_size": args.batch_size,
            "arms": settings.arms,
            "attribution_window_ms": settings.attribution_window_ms,
            "rate_hz": RATE,
            "py_spy": "record --format raw --rate 200 --subprocesses --nonblocking --idle "
            "--threads --full-filenames -- python -m loopwise.cli worker",
            "cpus": os.cpu_count(),
            "run_id": uuid.uuid4().hex[:8],
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    result = {
        "config": config,
        "measured": measured,
        **aggregate(read_raw(raw), measured),
        "rules": [r.__dict__ for r in RULES],
    }
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    report(result)
    console.print(f"written to {out} (raw stacks: {raw})")
    paths = [RESULTS / "profile.json", RESULTS / "profile-state-only.json"]
    console.print("README table (the modes measured so far):")
    print(markdown(paths))  # not rich's console: it would wrap the table's lines
    if not args.no_plot:
        plot(paths, DOCS / "profile.png")
        console.print(f"plot: {DOCS / 'profile.png'}")


if __name__ == "__main__":
    main()
