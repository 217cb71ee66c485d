"""Faults, combined, in one long run with the learning loop on: what Loopwise did, what was lost.

One real worker process (``loopwise worker``: decisions, reward join, propensity log through
the outbox, learner; default arms) runs on a Kafka broker and a Redis of this bench's own
(free ports, a temporary folder, both torn down at the end) under, at the same time:

- **apps**: ``--events`` organic events of a simulated marketplace
  (``loopwise.producers.simulator``) at ``--rate`` events/s, with malformed messages
  (``--malformed-share``; the eight kinds of ``tests/test_pipeline_integration.py``) and
  redelivered duplicates (``--duplicate-share``: the same key and bytes again, soon after or
  much later) mixed in;
- **a serving layer**: the product's closed loop (``loopwise.producers.closed_loop.
  run_closed_loop``, in chunks of ``--chunk`` decisions, ``--decisions`` in all, at
  ``--decision-rate`` a second) reads ``nba:{user}`` of the same marketplace's users, publishes
  the view with its decision_id and then the clicks and purchases the hidden ground truth
  draws. A chunk that fails (Redis or the broker away) is counted and the next one goes on;
- **faults at random moments** (seeded): ``--kills`` worker SIGKILLs (each strikes a worker
  that is up and consuming), one broker kill -9 and restart, one Redis kill -9 and restart
  (append-only file, ``appendfsync everysec``), a poison ``item`` event (``features.category``
  an object), a ~900 KB message, a click dated 10 days ahead, and a forged propensity-log
  record (propensity 0) written straight to the log topic. The bench supervises the worker as
  systemd's ``Restart=always`` would: whenever it exits, it is started again a second later.
  An exit with code 3 (Redis lost its data) is counted and reported, never hidden.

Event time of both kinds of traffic starts 15 minutes in the past and advances as fast as the
wall clock (so that no follow-up is dated ahead of the worker's clock); the closed loop's
clock is moved up to the organic traffic's before each chunk. One setting differs from the
worker's defaults: ``attribution_window_ms`` (``--attribution-window-s``, 30 s), so that
shown decisions close, reach the log and are learned within the run.

After the traffic the bench waits until the group's committed offsets reach the end of the
events topic, no decision is open, the outboxes are empty and the learner's snapshot covers
the whole log; it stops the worker (SIGTERM, exit code 0 expected) and reconciles from what
is on the three topics and in Redis:

- events: ``accepted + duplicates + deadlettered == consumed``; ``accepted`` equals the
  distinct good event_ids on the events topic (read back whole; a message is bad when its
  bytes are one of those this bench made bad, good otherwise); ``consumed`` minus the messages
  on the topic are redeliveries after the crashes;
- dead letters: the sources (partition, offset) on the dead-letter topic are exactly the bad
  messages' positions, each with the reason (and, for the special ones, the field) it was
  made for; redelivered batches may put one there twice (at-least-once, counted);
- users: every ``user:{id}`` hash equals a reference computed from the good events in topic
  order (``reference_state`` / ``assert_users_match`` of tests/test_pipeline_integration.py);
- propensity log: no decision_id twice; the decisions of the views on the events topic (the
  views the serving layer sent) equal the decisions on the log, both ways; the
  ``decisions_opened`` and ``decisions_closed`` counters equal the records; every record the
  worker wrote is valid (``loopwise.learners.log_record``) with propensity = pmf[chosen];
- learner: the VW arm's example count (its policy version in the ``model`` hash) equals the
  valid records on the log, the holdout's equals its own arm's records, the forged record is
  counted under ``invalid_records`` and not learned, and the snapshot's offsets are the log's
  end offsets;
- Redis kill: every counter read just before the kill is still there after the restart
  (acknowledged writes lost, if any), and the epoch is the same.

A kill -9 of the Redis process loses nothing Redis answered (its writes reached the operating
system); a machine crash can lose the writes of the last second, which the file was not yet
fsynced for. ``--redis-aof-loss-s 1`` shows what Loopwise does then: after the kill the bench
cuts the last second of writes off the append-only file before the restart (the checks then
say what was lost).

Output: a table (fault, what Loopwise did, what was lost), the checks, and
``bench/results/faults.json`` with every figure. Exit status 1 if a check failed.

Run: ``.venv/bin/python -m bench.bench_faults`` (~12 minutes on 2 cores) or
``loopwise bench faults``; a quick look: ``--events 20000 --decisions 2000 --kills 2``.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import redis
from kafka import KafkaProducer, TopicPartition
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bench.bench_soak import wall_clock_gap
from bench.common import bench_settings, write_json
from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.infra import LocalInfra
from loopwise.infra.kafka_broker import port_open
from loopwise.learners.log_record import LogRecord, LogRecordError
from loopwise.learners.policy import restore
from loopwise.producers.closed_loop import run_closed_loop
from loopwise.producers.sdk import EventPublisher
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.producers.traffic import RateLimiter
from loopwise.redis_clients import redis_client
from loopwise.streams.deadletter import MAX_ORIGINAL_BYTES
from loopwise.streams.worker import DATA_LOST_EXIT, spawn_worker, stop_worker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the reference and the malformed kinds of the tests
from test_pipeline_integration import (  # noqa: E402
    assert_users_match,
    committed_lag,
    malformed,
    reference_state,
)

console = Console(width=None if sys.stdout.isatty() else 140)
RESULTS = ROOT / "bench" / "results"

DAY_MS: Final = 86_400_000
PAST_MS: Final = 15 * 60_000
"""Event time starts this far in the past: a purchase follows its view by up to ~490 s, and
the worker refuses events dated more than 5 minutes ahead of its clock."""
FORGED_ID: Final = "forged-by-bench-faults"
RESTART_DELAY_S: Final = 1.0
"""The supervisor starts an exited worker again after this long (systemd's RestartSec)."""
HUGE_BYTES: Final = 900_000
RECORD_LIMIT: Final = 1_000_000


# ----------------------------------------------------------------------------- what was sent


@dataclass
class Sent:
    """What the apps and the serving layer published (each field written by one thread)."""

    organic: int = 0
    malformed: int = 0
    duplicates: int = 0
    specials: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad: dict[bytes, tuple[str, str | None, str]] = field(default_factory=dict)
    """Bytes of every message made bad → (reason, field or None if not checked, kind)."""
    send_errors: list[str] = field(default_factory=list)
    apps_done: bool = False
    apps_error: str | None = None
    # The serving layer.
    decisions: int = 0
    chunks: int = 0
    chunk_errors: list[str] = field(default_factory=list)
    cl_published: int = 0  # by chunks that returned (a failed chunk does not say)
    default_views: int = 0
    stale_skips: int = 0
    serving_done: bool = False
    serving_error: str | None = None
    current_out: Path | None = None


def organic_market(args: argparse.Namespace, start_ms: int, tag: str) -> Marketplace:
    """The apps' marketplace: event time advances as fast as the wall clock at ``--rate``."""
    return Marketplace(market_config(args, start_ms, f"{tag}o", wall_clock_gap(args.rate)))


def market_config(args: argparse.Namespace, start_ms: int, tag: str, gap: float) -> MarketConfig:
    """The same world (seed, users, items) for both kinds of traffic; ids differ by tag."""
    return MarketConfig(
        n_users=args.users,
        n_items=args.items,
        seed=args.seed,
        start_ms=start_ms,
        mean_gap_ms=gap,
        run_tag=tag,
    )


def special_messages(market: Marketplace, now_ms: int) -> dict[str, tuple[bytes, bytes, str, str]]:
    """name → (key, value, reason, field) of the hostile messages sent once each."""
    user = market.users[0]
    view = {
        "event_id": "special-huge",
        "type": "view",
        "user_id": user,
        "item_id": market.items[0],
        "timestamp": now_ms - PAST_MS,
    }
    item = {
        "event_id": "special-poison-item",
        "type": "item",
        "item_id": "poison-item",
        "timestamp": now_ms - PAST_MS,
        "features": {"category": {"nested": {"deeper": [1, 2]}}},
    }
    future = {
        "event_id": "special-far-future",
        "type": "click",
        "user_id": user,
        "item_id": market.items[0],
        "timestamp": now_ms + 10 * DAY_MS,
    }
    return {
        "poison item (features.category an object)": (
            b"poison-item",
            orjson.dumps(item),
            "wrong_type",
            "features.category",
        ),
        "~900 KB message": (
            user.encode(),
            orjson.dumps({**view, "pad": "x" * HUGE_BYTES}),
            "too_large",
            "",
        ),
        "click dated 10 days ahead": (
            user.encode(),
            orjson.dumps(future),
            "out_of_range",
            "timestamp",
        ),
    }


def apps(
    settings: Settings,
    market: Marketplace,
    args: argparse.Namespace,
    sent: Sent,
    specials_at: dict[int, str],
    specials: dict[str, tuple[bytes, bytes, str, str]],
    stop: threading.Event,
) -> None:
    """Organic traffic at ``--rate`` with malformed messages, duplicates and the specials."""
    rng = random.Random(args.seed + 1)
    producer = kafka_clients.producer(
        settings,
        acks="all",
        linger_ms=5,
        max_request_size=2_000_000,
    )

    def failed(exc: BaseException) -> None:
        sent.send_errors.append(f"{type(exc).__name__}: {exc}")

    def send(key: bytes, value: bytes) -> None:
        producer.send(settings.events_topic, key=key, value=value).add_errback(failed)

    recent: deque[tuple[bytes, bytes]] = deque(maxlen=20_000)
    limiter = RateLimiter(args.rate)
    try:
        for n, event in enumerate(market.events(args.events)):
            if stop.is_set():
                break
            limiter.wait()
            key, value = event["user_id"].encode(), orjson.dumps(event)
            send(key, value)
            sent.organic += 1
            recent.append((key, value))
            if rng.random() < args.duplicate_share:  # a redelivery: soon after or much later
                back = rng.choice((1, 2, 50, 2_000, 15_000))
                send(*recent[max(0, len(recent) - back)])
                sent.duplicates += 1
            if rng.random() < args.malformed_share:
                user = event["user_id"]
                raw, reason = malformed(rng, user, sent.malformed, settings.max_event_bytes)
                sent.bad[raw] = (reason, None, "malformed")
                send(user.encode(), raw)
                sent.malformed += 1
            name = specials_at.get(n)
            if name is not None:
                key, raw, reason, field_ = specials[name]
                sent.bad[raw] = (reason, field_, name)
                send(key, raw)
                sent.specials[name] = {"at_event": n, "at_s": time.monotonic()}
        producer.flush()
    except Exception as exc:  # the main loop sees it and the checks fail
        sent.apps_error = f"{type(exc).__name__}: {exc}"
    finally:
        producer.close()
        sent.apps_done = True


def serving_layer(
    settings: Settings,
    market: Marketplace,
    organic: Marketplace,
    args: argparse.Namespace,
    sent: Sent,
    out_dir: Path,
    stop: threading.Event,
) -> None:
    """The product's closed loop, chunk after chunk, until ``--decisions`` were shown."""
    try:
        while sent.decisions < args.decisions and not stop.is_set():
            n = min(args.chunk, args.decisions - sent.decisions)
            market.advance_clock(organic.clock)  # one timeline with the organic traffic
            out = out_dir / f"decisions-{sent.chunks:05d}.jsonl"
            sent.current_out = out
            sent.chunks += 1
            try:
                report = run_closed_loop(
                    settings,
                    market,
                    n,
                    out,
                    rate=args.decision_rate,
                    seed=args.seed * 100_000 + sent.chunks,
                    progress=False,
                    wait_for_worker_s=600,
                )
                sent.cl_published += report.published
                sent.default_views += report.default_views
                sent.stale_skips += report.stale_skips
            except Exception as exc:  # Redis or the broker away: the next chunk goes on
                sent.chunk_errors.append(f"chunk {sent.chunks}: {type(exc).__name__}: {exc}")
                time.sleep(1.0)
            shown = [orjson.loads(line) for line in out.read_bytes().splitlines()]
            if shown:  # a failed chunk did not move the clock: after its last decision
                market.advance_clock(max(d["timestamp"] for d in shown))
            sent.decisions += len(shown)
            sent.current_out = None
    except Exception as exc:
        sent.serving_error = f"{type(exc).__name__}: {exc}"
    finally:
        sent.serving_done = True


def lines_in(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# ----------------------------------------------------------------------------- the worker


@dataclass
class Exit:
    at_s: float
    pid: int
    code: int
    cause: str


class Supervisor:
    """Runs the worker and starts it again a second after it exits, whatever the reason."""

    def __init__(self, settings: Settings, log_path: Path, t0: float) -> None:
        self.settings = settings
        self.log_path = log_path
        self.output = log_path.open("ab")
        self.t0 = t0
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawns = 0
        self.exits: list[Exit] = []
        self.data_lost_exits = 0
        self._log_offset = 0
        self._respawn_at: float | None = None
        self._killing: int | None = None
        self.ready_at: float | None = None

    def spawn(self) -> None:
        self.output.flush()
        self._log_offset = self.log_path.stat().st_size
        self.proc = spawn_worker(self.settings, output=self.output)
        self.spawns += 1
        self.ready_at = None
        self._respawn_at = None

    def ready(self) -> bool:
        """The current worker said "worker ready" (it joined the group and consumes)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        if self.ready_at is None:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                if b"worker ready" in f.read():
                    self.ready_at = time.monotonic()
        return self.ready_at is not None

    def check(self) -> None:
        """Note an exit; start the worker again once the restart delay has passed."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            cause = "SIGKILL by the bench" if self._killing == self.proc.pid else "exited"
            self.exits.append(Exit(time.monotonic() - self.t0, self.proc.pid, code, cause))
            if code == DATA_LOST_EXIT:
                self.data_lost_exits += 1
            self.proc = None
            self._killing = None
            self._respawn_at = time.monotonic() + RESTART_DELAY_S
        if (
            self.proc is None
            and self._respawn_at is not None
            and time.monotonic() >= (self._respawn_at)
        ):
            self.spawn()

    def sigkill(self) -> int:
        assert self.proc is not None
        pid = self.proc.pid
        self._killing = pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.check()
        return pid

    def stop(self) -> int | None:
        """SIGTERM and wait: the exit code of the last worker (None if none runs)."""
        self._respawn_at = None
        if self.proc is None:
            return None
        code = stop_worker(self.proc)
        self.exits.append(Exit(time.monotonic() - self.t0, self.proc.pid, code, "SIGTERM (end)"))
        self.proc = None
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.output.close()


# ----------------------------------------------------------------------------- the faults


@dataclass
class Fault:
    kind: str  # worker_sigkill, broker_kill9, redis_kill9, forged_log_record
    due_s: float
    done_at_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    consumed_at: int | None = None
    recovered_s: float | None = None


def schedule(args: argparse.Namespace, rng: random.Random, traffic_s: float) -> list[Fault]:
    """The disruptive faults at random moments, one per slot of the middle of the run, plus
    the forged log record anywhere."""
    kinds = ["worker_sigkill"] * args.kills + ["broker_kill9", "redis_kill9"]
    rng.shuffle(kinds)
    lo, hi = 0.08 * traffic_s, 0.85 * traffic_s
    slot = (hi - lo) / max(1, len(kinds))
    faults = [
        Fault(kind, lo + i * slot + rng.uniform(0.1, 0.9) * slot) for i, kind in enumerate(kinds)
    ]
    for fault in faults:
        if fault.kind == "worker_sigkill":  # it strikes a worker up and consuming this long
            fault.details["strike_after_ready_s"] = round(rng.uniform(2.0, 6.0), 2)
    faults.append(Fault("forged_log_record", rng.uniform(0.1, 0.9) * traffic_s))
    return sorted(faults, key=lambda f: f.due_s)


def read_stats(r: redis.Redis, s: Settings) -> Counter[str] | None:
    try:
        return Counter({k.decode(): int(v) for k, v in r.hgetall(s.key("stats")).items()})
    except redis.RedisError:
        return None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def kill_broker(local: LocalInfra, down_s: float) -> dict[str, Any]:
    pid = local.kafka.pid()
    assert pid is not None, "the broker is not running"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: local.kafka.pid() is None, 30, "the broker to die")
    host, port = local.kafka.host, local.kafka.port
    wait_for(lambda: not port_open(host, port), 30, "the broker's port to close")
    time.sleep(down_s)
    local.kafka.start()
    return {"pid": pid, "down_s": round(time.monotonic() - killed, 2)}


class AofTail:
    """Sizes of Redis's growing append-only file over the last seconds, so that a kill -9 can
    be followed by what a machine crash loses with ``appendfsync everysec``: the file's tail
    written since the last fsync (``--redis-aof-loss-s``)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "appendonlydir"
        self.samples: deque[tuple[float, Path, int]] = deque()

    def current(self) -> Path | None:
        """The newest incremental AOF file (``appendonly.aof.{seq}.incr.aof``)."""
        files = list(self.dir.glob("*.incr.aof"))
        return max(files, key=lambda f: int(f.name.split(".")[-3])) if files else None

    def sample(self) -> None:
        path = self.current()
        if path is not None:
            self.samples.append((time.monotonic(), path, path.stat().st_size))
        while self.samples and self.samples[0][0] < time.monotonic() - 30:
            self.samples.popleft()

    def cut(self, loss_s: float, at: float) -> dict[str, Any]:
        """Truncate the file (Redis is dead) to its size ``loss_s`` before ``at``."""
        path = self.current()
        if path is None:
            return {"aof_cut": "no incremental AOF file"}
        size = path.stat().st_size
        same = [(t, n) for t, p, n in self.samples if p == path]
        before = [n for t, n in same if t <= at - loss_s]
        # No sample that old of this file (a rewrite started it since): its oldest one.
        keep = before[-1] if before else (same[0][1] if same else size)
        with path.open("r+b") as f:
            f.truncate(keep)
        return {
            "aof_file": path.name,
            "aof_bytes_cut": size - keep,
            "aof_cut_s": loss_s if before else "less (the file is younger)",
        }


def kill_redis(
    local: LocalInfra,
    r: redis.Redis,
    s: Settings,
    down_s: float,
    aof: AofTail | None = None,
    loss_s: float = 0.0,
) -> dict[str, Any]:
    """kill -9 of Redis and a restart on the same folder; what it held before and after.

    With ``loss_s``, the append-only file loses its last ``loss_s`` seconds of writes before
    the restart, as after a machine crash (a process kill -9 loses nothing Redis answered)."""
    before = read_stats(r, s) or Counter()
    epoch_before = r.get(s.key("epoch"))
    persistence = r.info("persistence")
    keys_before = r.dbsize()
    pid = local.redis.pid()
    assert pid is not None, "redis-server is not running"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: local.redis.pid() is None, 30, "redis-server to die")
    wait_for(lambda: not port_open(local.redis.host, local.redis.port), 30, "Redis's port")
    cut = aof.cut(loss_s, killed) if aof is not None and loss_s > 0 else {}
    time.sleep(down_s)
    local.redis.start()  # same port, same folder: it loads the append-only file
    after = read_stats(r, s) or Counter()
    epoch_after = r.get(s.key("epoch"))
    decreased = {k: before[k] - after[k] for k in before if after[k] < before[k]}
    return {
        "pid": pid,
        "down_s": round(time.monotonic() - killed, 2),
        "aof_size_before": persistence.get("aof_current_size"),
        "aof_delayed_fsync_before": persistence.get("aof_delayed_fsync"),
        "keys_before": keys_before,
        "keys_after": r.dbsize(),
        "consumed_before": before["consumed"],
        "consumed_after": after["consumed"],
        "counters_decreased": decreased,
        "epoch_kept": epoch_before is not None and epoch_before == epoch_after,
        **cut,
    }


# ----------------------------------------------------------------------------- reading back


def read_topic_all(
    s: Settings, topic: str, progress: Progress | None = None
) -> dict[int, list[tuple[int, bytes | None, bytes | None]]]:
    """Every message of ``topic`` per partition: (offset, key, value), in offset order."""
    consumer = kafka_clients.consumer(
        s,
        enable_auto_commit=False,
        group_id=None,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        total = sum(ends.values())
        task = progress.add_task(f"reading {topic}", total=total, info="") if progress else None
        out: dict[int, list[tuple[int, bytes | None, bytes | None]]] = {p: [] for p in parts}
        done = 0
        idle = 0
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            batch = consumer.poll(timeout_ms=1000, max_records=5000)
            idle = 0 if batch else idle + 1
            if idle > 30:
                raise TimeoutError(f"{topic}: no message for 30 s before the end offsets")
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset < ends[tp]:
                        out[tp.partition].append((m.offset, m.key, m.value))
                        done += 1
            if progress is not None and task is not None:
                progress.update(task, completed=done)
        return out
    finally:
        consumer.close()


def log_end_offsets(s: Settings) -> dict[int, int]:
    consumer = kafka_clients.consumer(s, group_id=None)
    try:
        tps = [
            TopicPartition(s.propensity_log_topic, p)
            for p in consumer.partitions_for_topic(s.propensity_log_topic) or ()
        ]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def model_offsets(r: redis.Redis, s: Settings) -> dict[int, int]:
    raw = r.hget(s.key("model"), "offsets")
    return {int(p): int(o) for p, o in orjson.loads(raw).items()} if raw else {}


def open_decisions(r: redis.Redis, s: Settings) -> int:
    return sum(int(r.hlen(s.key("join", str(p)))) for p in range(s.topic_partitions))


def outbox_pending(r: redis.Redis, s: Settings) -> int:
    return sum(int(r.llen(s.key("outbox", str(p)))) for p in range(s.topic_partitions))


# ----------------------------------------------------------------------------- checks

ARMS: Final = (b"vw", b"popularity", b"linucb")


def sent_specials(sent: Sent) -> dict[str, tuple[str, str | None]]:
    """The special messages the apps sent: name → (reason, field)."""
    return {kind: (reason, f) for reason, f, kind in sent.bad.values() if kind in sent.specials}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def reconcile(
    s: Settings,
    r: redis.Redis,
    sent: Sent,
    out_dir: Path,
    catalog: list[dict[str, Any]],
    progress: Progress,
) -> tuple[list[Check], dict[str, Any]]:
    """Read the three topics and Redis back; every check and every figure."""
    checks: list[Check] = []
    figures: dict[str, Any] = {}

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append(Check(name, bool(ok), detail))

    # --- the events topic: what was really published, in the order the worker read it.
    events = read_topic_all(s, s.events_topic, progress)
    on_topic = sum(len(v) for v in events.values())
    bad_at: dict[tuple[int, int], tuple[str, str | None, str]] = {}
    good: list[dict[str, Any]] = []
    ids: set[str] = set()
    topic_duplicates = 0
    unreadable = 0
    view_decisions: list[str] = []
    for partition, messages in events.items():
        for offset, _key, value in messages:
            if value is not None and value in sent.bad:
                bad_at[partition, offset] = sent.bad[value]
                continue
            try:
                event = orjson.loads(value or b"")
                event_id = event["event_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                unreadable += 1
                continue
            if event_id in ids:
                topic_duplicates += 1
                continue
            ids.add(event_id)
            good.append(event)
            if event["type"] == "view" and event.get("decision_id") is not None:
                view_decisions.append(event["decision_id"])
    stats = read_stats(r, s) or Counter()
    figures["events_topic"] = {
        "messages": on_topic,
        "good_distinct": len(good),
        "good_repeated": topic_duplicates,
        "bad": len(bad_at),
        "unclassified": unreadable,
        "bad_by_kind": dict(Counter(kind for _, _, kind in bad_at.values())),
    }
    figures["stats"] = dict(stats)
    check("every message on the topic is one the bench knows", unreadable == 0, f"{unreadable}")
    total = stats["accepted"] + stats["duplicates"] + stats["deadlettered"]
    check(
        "accepted + duplicates + deadlettered == consumed",
        total == stats["consumed"],
        f"{stats['accepted']:,} + {stats['duplicates']:,} + {stats['deadlettered']:,} = "
        f"{total:,}; consumed {stats['consumed']:,}",
    )
    check(
        "each good event accepted exactly once",
        stats["accepted"] == len(good),
        f"accepted {stats['accepted']:,}; distinct good event_ids on the topic {len(good):,}",
    )
    redelivered = stats["consumed"] - on_topic
    figures["redelivered"] = redelivered
    check(
        "every message on the topic consumed (redeliveries on top)",
        redelivered >= 0,
        f"consumed {stats['consumed']:,} - on topic {on_topic:,} = {redelivered:,} redelivered",
    )
    check(
        "duplicates = repeated good messages + redelivered good messages",
        stats["duplicates"] >= topic_duplicates
        and stats["deadlettered"] >= len(bad_at)
        and (stats["duplicates"] - topic_duplicates) + (stats["deadlettered"] - len(bad_at))
        == redelivered,
        f"duplicates {stats['duplicates']:,} (repeated on the topic {topic_duplicates:,}), "
        f"dead-lettered {stats['deadlettered']:,} (bad on the topic {len(bad_at):,})",
    )
    lag = committed_lag(s)
    figures["committed_lag"] = lag
    check("committed offsets at the end of the events topic", lag == 0, f"lag {lag}")

    # --- the dead-letter topic.
    dead = read_topic_all(s, s.deadletter_topic, progress)
    sources: Counter[tuple[int, int]] = Counter()
    wrong: list[str] = []
    per_reason: Counter[str] = Counter()
    largest = 0
    specials: dict[str, dict[str, Any]] = {}
    for messages in dead.values():
        for _offset, _key, value in messages:
            largest = max(largest, len(value or b""))
            record = orjson.loads(value or b"null")
            src = (record["source"]["partition"], record["source"]["offset"])
            sources[src] += 1
            per_reason[record["reason"]] += 1
            expected = bad_at.get(src)
            if expected is None:
                wrong.append(f"a good message dead-lettered at {src}: {record['reason']}")
                continue
            reason, field_, kind = expected
            if record["reason"] != reason or (
                field_ is not None and (record["field"] or "") != field_
            ):
                wrong.append(
                    f"{kind} at {src}: {record['reason']}/{record['field']}, "
                    f"expected {reason}/{field_}"
                )
            if kind != "malformed" and kind not in specials:
                original = base64.b64decode(record["original_b64"])
                specials[kind] = {
                    "reason": record["reason"],
                    "field": record["field"],
                    "original_size": record["original_size"],
                    "original_truncated": record["original_truncated"],
                    "original_kept_bytes": len(original),
                    "record_bytes": len(value or b""),
                }
    missing = set(bad_at) - set(sources)
    figures["deadletter_topic"] = {
        "records": sum(sources.values()),
        "distinct_sources": len(sources),
        "sent_again": sum(sources.values()) - len(sources),
        "per_reason": dict(per_reason),
        "largest_record_bytes": largest,
        "specials": specials,
    }
    check(
        "every refused message on the dead-letter topic",
        not missing,
        f"{len(bad_at) - len(missing):,} of {len(bad_at):,} "
        f"({sum(sources.values()) - len(sources):,} sent again by redelivered batches)",
    )
    check("no good message dead-lettered, every reason as made", not wrong, "; ".join(wrong[:5]))
    for name, (reason, field_) in sent_specials(sent).items():
        got = specials.get(name)
        check(
            f"special: {name}",
            got is not None and got["reason"] == reason and (got["field"] or "") == field_,
            f"{got['reason']}/{got['field']}" if got else "not on the dead-letter topic",
        )
    huge = specials.get("~900 KB message")
    check(
        "the ~900 KB message's dead letter fits the broker (original truncated)",
        huge is not None
        and huge["original_truncated"]
        and huge["original_kept_bytes"] == MAX_ORIGINAL_BYTES
        and huge["record_bytes"] < RECORD_LIMIT,
        f"record {huge['record_bytes']:,} B, original {huge['original_size']:,} B kept "
        f"{huge['original_kept_bytes']:,} B"
        if huge
        else "missing",
    )

    # --- users.
    categories = {e["item_id"]: e["features"]["category"] for e in catalog}
    expected_users = reference_state(good, categories, s)
    try:
        assert_users_match(r, s, expected_users, min_users=1)
        check("every user hash equals the reference", True, f"{len(expected_users):,} users")
    except AssertionError as exc:
        check("every user hash equals the reference", False, str(exc)[:500])
    figures["users"] = len(expected_users)

    # --- the propensity log.
    log = read_topic_all(s, s.propensity_log_topic, progress)
    logged: Counter[str] = Counter()
    invalid_written: list[str] = []
    forged = 0
    by_arm: Counter[str] = Counter()
    rewards: list[float] = []
    for partition, messages in log.items():
        for offset, _key, value in messages:
            doc = orjson.loads(value or b"null")
            if isinstance(doc, dict) and doc.get("decision_id") == FORGED_ID:
                forged += 1
                continue
            try:
                rec = LogRecord.from_json(value)
            except LogRecordError as exc:
                invalid_written.append(f"{partition}@{offset}: {exc.reason}")
                continue
            logged[str(rec.decision_id)] += 1
            by_arm[str(rec.arm)] += 1
            rewards.append(float(rec.reward))
            if doc.get("pmf") is not None and doc["pmf"][doc["chosen"]] != doc["propensity"]:
                invalid_written.append(f"{partition}@{offset}: propensity != pmf[chosen]")
    records = sum(logged.values())
    twice = {d: n for d, n in logged.items() if n > 1}
    views = set(view_decisions)
    shown_lines = [
        orjson.loads(line)["decision_id"]
        for path in sorted(out_dir.glob("decisions-*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]
    shown = set(shown_lines)
    lost = views - set(logged)
    extra = set(logged) - views
    figures["propensity_log"] = {
        "records": records + forged + len(invalid_written),
        "worker_records": records,
        "distinct_decisions": len(logged),
        "logged_twice": len(twice),
        "forged": forged,
        "invalid_worker_records": invalid_written[:20],
        "by_arm": dict(by_arm),
        "mean_reward": statistics.fmean(rewards) if rewards else None,
        "views_with_decision_on_topic": len(view_decisions),
        "distinct_decisions_viewed": len(views),
        "decisions_shown_by_serving_layer": len(shown_lines),
        "shown_not_on_topic": len(shown - views),
        "viewed_not_logged": len(lost),
        "logged_not_viewed": len(extra),
    }
    check("no decision logged twice", not twice, f"{len(twice)} twice, e.g. {list(twice)[:3]}")
    check(
        "every view the serving layer sent is on the events topic",
        shown <= views,
        f"{len(shown):,} shown, {len(shown - views)} missing from the topic",
    )
    check(
        "no loss: every viewed decision has a log record",
        not lost,
        f"{len(views):,} decisions viewed, {len(lost)} without a record "
        f"(unknown_decisions {stats['unknown_decisions']})",
    )
    check("nothing logged that was not viewed", not extra, f"{len(extra)}")
    outcomes = (
        "decisions_opened",
        "repeated_views",
        "unknown_decisions",
        "mismatched_views",
        "default_views",
    )
    check(
        "every view of a decision counted once: opened, repeated, unknown, mismatched, default",
        sum(stats[k] for k in outcomes) == len(view_decisions),
        f"{len(view_decisions):,} views = "
        + " + ".join(f"{k} {stats[k]:,}" for k in outcomes)
        + f" (the serving layer showed {len(shown_lines) - len(shown):,} decisions twice)",
    )
    check(
        "decisions_opened == decisions_closed == log records",
        stats["decisions_opened"] == stats["decisions_closed"] == records,
        f"opened {stats['decisions_opened']:,}, closed {stats['decisions_closed']:,}, "
        f"records {records:,}",
    )
    check("every record the worker wrote is valid", not invalid_written, f"{invalid_written[:3]}")
    check("the forged record is on the log once", forged == 1, f"{forged}")

    # --- the learner.
    model = r.hgetall(s.key("model"))
    versions = {k.decode(): restore(bytes(v)).version for k, v in model.items() if k in ARMS}
    invalid = orjson.loads(model.get(b"invalid_records") or b"{}")
    offsets = model_offsets(r, s)
    ends = log_end_offsets(s)
    figures["learner"] = {
        "versions": versions,
        "invalid_records": invalid,
        "offsets": offsets,
        "log_end_offsets": ends,
    }
    valid = records
    holdout = s.holdout_arm
    check(
        "the VW model's example count equals the valid records on the log",
        versions.get("vw") == valid,
        f"vw learned {versions.get('vw')}, valid records {valid:,}",
    )
    check(
        f"the holdout ({holdout}) learned exactly its own arm's records",
        versions.get(holdout) == by_arm[holdout],
        f"{holdout} learned {versions.get(holdout)}, its records {by_arm[holdout]:,}",
    )
    check(
        "the forged record skipped and counted (invalid_records), not learned",
        invalid == {"invalid_propensity": 1},
        f"{invalid}",
    )
    check(
        "the learner's snapshot covers the whole log",
        offsets == {p: o for p, o in ends.items() if o > 0},
        f"snapshot {offsets}, log ends {ends}",
    )
    return checks, figures


# ----------------------------------------------------------------------------- the run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=150_000, help="organic events (150000)")
    parser.add_argument("--rate", type=float, default=250.0, help="organic events/s (250)")
    parser.add_argument(
        "--decisions", type=int, default=15_000, help="decisions shown by the serving layer (15000)"
    )
    parser.add_argument(
        "--decision-rate", type=float, default=30.0, help="decisions shown per second (30)"
    )
    parser.add_argument("--kills", type=int, default=5, help="worker SIGKILLs (5)")
    parser.add_argument("--seed", type=int, default=10, help="seed of traffic and faults (10)")
    parser.add_argument("--users", type=int, default=2000, help="marketplace users (2000)")
    parser.add_argument("--items", type=int, default=40, help="catalog items (40)")
    parser.add_argument(
        "--malformed-share",
        type=float,
        default=0.02,
        help="a malformed message after this share of organic events (0.02)",
    )
    parser.add_argument(
        "--duplicate-share",
        type=float,
        default=0.01,
        help="an organic message sent again after this share of them (0.01)",
    )
    parser.add_argument(
        "--chunk", type=int, default=500, help="decisions per closed-loop call (500)"
    )
    parser.add_argument(
        "--attribution-window-s",
        type=int,
        default=30,
        help="the worker's attribution window, so that decisions close within the run (30)",
    )
    parser.add_argument(
        "--down-s", type=float, default=2.0, help="how long the broker and Redis stay down (2)"
    )
    parser.add_argument(
        "--redis-aof-loss-s",
        type=float,
        default=0.0,
        help="after the Redis kill -9, cut this many seconds of writes off the end of its "
        "append-only file before the restart: what a machine crash can lose with appendfsync "
        "everysec (0: a plain kill -9, which loses nothing Redis answered)",
    )
    parser.add_argument(
        "--stall-s",
        type=float,
        default=600.0,
        help="give up draining when the end is not reached after this long (600)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "faults.json", help="JSON figures")
    args = parser.parse_args()
    if args.events < 1000 or args.decisions < 1 or args.kills < 0:
        parser.error("--events must be >= 1000, --decisions >= 1, --kills >= 0")
    if args.rate <= 0 or args.decision_rate <= 0 or args.chunk < 1:
        parser.error("--rate, --decision-rate and --chunk must be > 0")
    if not (0 <= args.malformed_share < 1 and 0 <= args.duplicate_share < 1):
        parser.error("--malformed-share and --duplicate-share must be in [0, 1)")
    if args.users < 1 or args.items < 2 or args.attribution_window_s < 1:
        parser.error("--users >= 1, --items >= 2, --attribution-window-s >= 1")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("kafka", "aiokafka", "loopwise.infra"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="loopwise-faults-"))
    ok = False
    try:
        ok = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


def run(args: argparse.Namespace, tmp: Path) -> bool:
    wall_start = time.monotonic()
    local = LocalInfra.for_tests(tmp / "infra")
    console.print(f"faults: starting a Kafka broker and Redis of the bench's own in {tmp}")
    local.up()
    supervisor: Supervisor | None = None
    stop = threading.Event()
    try:
        s = bench_settings(
            local,
            "faults",
            kafka_controller_port=local.kafka.controller_port,
            key_prefix="faults:",
            app_id="faults-worker",
            state_dir=tmp / "state",
            attribution_window_ms=args.attribution_window_s * 1000,
        )
        r = redis_client(s, socket_timeout=10)
        now_ms = int(time.time() * 1000)
        start_ms = now_ms - PAST_MS
        tag = uuid.uuid4().hex[:6]
        organic = organic_market(args, start_ms, tag)
        gap = max(1.0, 1000.0 / args.decision_rate - 0.5)  # the closed loop adds 1 + ⌊Exp⌋
        serving = Marketplace(market_config(args, start_ms, f"{tag}c", gap))
        catalog = serving.catalog_events()
        rng = random.Random(args.seed)
        traffic_s = max(args.events / args.rate, args.decisions / args.decision_rate)
        faults = schedule(args, rng, traffic_s)
        specials = special_messages(organic, now_ms)
        positions = rng.sample(range(args.events // 20, args.events * 19 // 20), len(specials))
        specials_at = dict(zip(positions, specials, strict=True))
        console.print(
            f"{args.events:,} organic events at {args.rate:g}/s and {args.decisions:,} decisions "
            f"shown at {args.decision_rate:g}/s ({args.users:,} users, {args.items} items), "
            f"~{traffic_s / 60:.1f} min of traffic; faults (seed {args.seed}): "
            + ", ".join(f"{f.kind} at {f.due_s:.0f} s" for f in faults)
        )

        supervisor = Supervisor(s, tmp / "worker.log", wall_start)
        supervisor.spawn()
        with EventPublisher.from_settings(s) as publisher:
            for event in catalog:
                publisher.send(event)

        def catalog_ready() -> bool:
            assert supervisor is not None
            supervisor.check()
            return bool(
                supervisor.ready()
                and r.hlen(s.key("catalog")) == len(catalog)
                and r.exists(s.key("nba", "__default__"))
            )

        wait_for(catalog_ready, 300, "the worker and the catalog")

        sent = Sent()
        out_dir = tmp / "decisions"
        out_dir.mkdir()
        threads = [
            threading.Thread(
                target=apps,
                args=(s, organic, args, sent, specials_at, specials, stop),
                name="apps",
                daemon=True,
            ),
            threading.Thread(
                target=serving_layer,
                args=(s, serving, organic, args, sent, out_dir, stop),
                name="serving",
                daemon=True,
            ),
        ]
        traffic_t0 = time.monotonic()
        supervisor.t0 = traffic_t0  # the exits' times on the faults' clock
        for thread in threads:
            thread.start()
        with _progress() as progress:
            inject_faults(progress, args, s, r, local, supervisor, sent, faults, traffic_t0, rng)
            drained = drain(progress, args, s, r, supervisor)
        stop.set()
        exit_code = supervisor.stop()
        traffic_wall_s = time.monotonic() - traffic_t0
        with _progress() as progress:
            checks, figures = reconcile(s, r, sent, out_dir, catalog, progress)
        checks.insert(
            0,
            Check(
                "the end was reached (everything consumed, closed, learned)",
                drained is None,
                drained or "",
            ),
        )
        checks.insert(
            1,
            Check(
                "the worker stops cleanly on SIGTERM at the end",
                exit_code == 0,
                f"exit code {exit_code}",
            ),
        )
        checks.insert(
            2,
            Check(
                "no worker stopped because Redis lost its data (exit code 3)",
                supervisor.data_lost_exits == 0,
                f"{supervisor.data_lost_exits} exits with code 3",
            ),
        )
        checks.insert(
            3,
            Check(
                "the apps and the serving layer sent everything",
                sent.apps_error is None
                and sent.serving_error is None
                and not sent.send_errors
                and sent.organic == args.events
                and sent.decisions == args.decisions,
                f"organic {sent.organic:,}/{args.events:,}, decisions {sent.decisions:,}/"
                f"{args.decisions:,}, errors {sent.apps_error or sent.serving_error or ''} "
                f"{sent.send_errors[:2]}",
            ),
        )
        redis_fault = next((f for f in faults if f.kind == "redis_kill9"), None)
        if redis_fault is not None and redis_fault.done_at_s is not None:
            d = redis_fault.details
            checks.append(
                Check(
                    "Redis kill -9: no acknowledged write lost, same epoch",
                    not d["counters_decreased"] and d["epoch_kept"],
                    f"counters decreased: {d['counters_decreased'] or 'none'}, "
                    f"epoch kept: {d['epoch_kept']}",
                )
            )
        worker_log = summarize_log(tmp / "worker.log")
        result = report(
            args,
            s,
            sent,
            faults,
            supervisor,
            checks,
            figures,
            worker_log,
            traffic_wall_s,
            time.monotonic() - wall_start,
        )
        write_json(args.out, result, console, orjson.OPT_NON_STR_KEYS)
        if not result["ok"]:
            kept = Path(tempfile.gettempdir()) / f"loopwise-faults-worker-{args.seed}.log"
            shutil.copy(tmp / "worker.log", kept)
            console.print(f"worker output kept in {kept}")
        return bool(result["ok"])
    finally:
        stop.set()
        if supervisor is not None:
            supervisor.close()
        local.down()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def inject_faults(
    progress: Progress,
    args: argparse.Namespace,
    s: Settings,
    r: redis.Redis,
    local: LocalInfra,
    supervisor: Supervisor,
    sent: Sent,
    faults: list[Fault],
    t0: float,
    rng: random.Random,
) -> None:
    """The traffic runs in its threads; here the faults strike when due, the supervisor
    restarts the worker, and the progress is shown. Returns when the traffic is done and
    every fault struck."""
    organic = progress.add_task("organic events", total=args.events, info="")
    shown = progress.add_task("decisions shown", total=args.decisions, info="")
    struck = progress.add_task("faults", total=len(faults), info="")
    pending = list(faults)
    done: list[Fault] = []
    forger = kafka_clients.producer(s, acks="all")
    aof = AofTail(local.redis.data_dir)
    try:
        while pending or not (sent.apps_done and sent.serving_done):
            supervisor.check()
            if args.redis_aof_loss_s > 0:
                aof.sample()
            now = time.monotonic()
            if supervisor.data_lost_exits >= 3:
                progress.console.print("[red]the worker keeps exiting with code 3: giving up")
                return
            if pending and now - t0 >= pending[0].due_s and strike_ready(pending[0], supervisor):
                fault = pending.pop(0)
                stats = read_stats(r, s)
                fault.consumed_at = stats["consumed"] if stats is not None else None
                fault.done_at_s = now - t0
                strike(fault, s, r, local, supervisor, forger, rng, args, aof)
                done.append(fault)
                progress.console.print(
                    f"{fault.done_at_s:7.1f} s  {fault.kind}: "
                    + ", ".join(f"{k} {v}" for k, v in fault.details.items()),
                    highlight=False,
                )
            for fault in done:
                if fault.recovered_s is None and fault.consumed_at is not None:
                    stats = read_stats(r, s)
                    if supervisor.ready() and stats and stats["consumed"] > fault.consumed_at:
                        fault.recovered_s = time.monotonic() - t0 - (fault.done_at_s or 0)
            stats = read_stats(r, s)
            info = (
                f"consumed {stats['consumed']:,}, closed {stats['decisions_closed']:,}"
                if stats
                else "Redis away"
            )
            progress.update(organic, completed=sent.organic, info=info)
            progress.update(
                shown,
                completed=sent.decisions + lines_in(sent.current_out),
                info=f"chunks failed {len(sent.chunk_errors)}",
            )
            progress.update(
                struck,
                completed=len(done),
                info=f"worker starts {supervisor.spawns}, exits {len(supervisor.exits)}",
            )
            time.sleep(0.25)
        progress.update(organic, completed=sent.organic)
        progress.update(shown, completed=sent.decisions)
    finally:
        forger.close()


def strike_ready(fault: Fault, supervisor: Supervisor) -> bool:
    """A worker SIGKILL strikes a worker that has been up and consuming for a few seconds."""
    if fault.kind != "worker_sigkill":
        return True
    if not supervisor.ready() or supervisor.ready_at is None:
        return False
    return time.monotonic() - supervisor.ready_at >= fault.details["strike_after_ready_s"]


def strike(
    fault: Fault,
    s: Settings,
    r: redis.Redis,
    local: LocalInfra,
    supervisor: Supervisor,
    forger: KafkaProducer,
    rng: random.Random,
    args: argparse.Namespace,
    aof: AofTail,
) -> None:
    exits_before = len(supervisor.exits)
    if fault.kind == "worker_sigkill":
        fault.details["pid"] = supervisor.sigkill()
    elif fault.kind == "broker_kill9":
        fault.details.update(kill_broker(local, args.down_s))
    elif fault.kind == "redis_kill9":
        fault.details.update(kill_redis(local, r, s, args.down_s, aof, args.redis_aof_loss_s))
    elif fault.kind == "forged_log_record":
        forged = {
            "decision_id": FORGED_ID,
            "actions": [{"id": "item-x"}],
            "chosen": 0,
            "propensity": 0,
            "pmf": [1.0],
            "reward": 1.0,
            "context": {},
        }
        partition = rng.randrange(s.topic_partitions)
        metadata = forger.send(
            s.propensity_log_topic, key=b"forger", value=orjson.dumps(forged), partition=partition
        ).get(timeout=120)
        fault.details.update(partition=metadata.partition, offset=metadata.offset)
    supervisor.check()
    fault.details["worker_exits_meanwhile"] = [
        e.code for e in supervisor.exits[exits_before:] if e.cause != "SIGKILL by the bench"
    ]


def drain(
    progress: Progress,
    args: argparse.Namespace,
    s: Settings,
    r: redis.Redis,
    supervisor: Supervisor,
) -> str | None:
    """Wait for the end: everything consumed and committed, closed, logged, learned. None when
    reached, else what was still missing."""
    task = progress.add_task("draining", total=None, info="")
    deadline = time.monotonic() + args.stall_s
    missing = "not checked yet"
    while time.monotonic() < deadline:
        supervisor.check()
        if supervisor.data_lost_exits >= 3:
            return "the worker keeps exiting with code 3 (Redis lost its data)"
        try:
            lag = committed_lag(s)
            opened, outbox = open_decisions(r, s), outbox_pending(r, s)
            ends = {p: o for p, o in log_end_offsets(s).items() if o > 0}
            learned = model_offsets(r, s)
        except (redis.RedisError, OSError) as exc:
            missing = f"{type(exc).__name__}: {exc}"
        else:
            missing = ", ".join(
                what
                for what, ok in (
                    (f"lag {lag}", lag == 0),
                    (f"{opened} open decisions", opened == 0),
                    (f"{outbox} in the outboxes", outbox == 0),
                    (
                        f"learner at {sum(learned.values())} of {sum(ends.values())}",
                        learned == ends,
                    ),
                    ("worker not ready", supervisor.ready()),
                )
                if not ok
            )
            if not missing:
                progress.update(task, info="done")
                return None
        progress.update(task, info=missing)
        time.sleep(2.0)
    return f"not reached after {args.stall_s:.0f} s: {missing}"


# ----------------------------------------------------------------------------- the report


def summarize_log(path: Path) -> dict[str, Any]:
    """Counts of the worker's log levels and its distinct warnings and errors."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    levels: Counter[str] = Counter()
    distinct: Counter[str] = Counter()
    for line in lines:
        m = re.match(r"^\S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$", line)
        if m is None:
            continue
        levels[m.group(1)] += 1
        if m.group(1) in ("WARNING", "ERROR", "CRITICAL"):
            message = re.sub(r"\d+", "N", m.group(2))[:160]
            distinct[f"{m.group(1)} {message}"] += 1
    return {
        "lines": len(lines),
        "levels": dict(levels),
        "tracebacks": text.count("Traceback (most recent call last)"),
        "distinct_warnings_and_errors": dict(distinct.most_common(25)),
    }


def report(
    args: argparse.Namespace,
    s: Settings,
    sent: Sent,
    faults: list[Fault],
    supervisor: Supervisor,
    checks: list[Check],
    figures: dict[str, Any],
    worker_log: dict[str, Any],
    traffic_wall_s: float,
    wall_s: float,
) -> dict[str, Any]:
    stats = Counter(figures.get("stats", {}))
    ok = all(c.ok for c in checks)
    by_name = {c.name: c for c in checks}
    log = figures.get("propensity_log", {})
    learner = figures.get("learner", {})
    dead = figures.get("deadletter_topic", {})
    events = figures.get("events_topic", {})

    def status(*names: str) -> str:
        bad = [n for n in names if n in by_name and not by_name[n].ok]
        return "ok" if not bad else "FAILED: " + "; ".join(bad)

    unaccepted = events.get("good_distinct", 0) - stats["accepted"]
    lost_whole_run = (
        f"events: {unaccepted:,} good events not accepted, users "
        f"{'= reference' if by_name['every user hash equals the reference'].ok else 'DIFFER'}; "
        f"log: {log.get('viewed_not_logged', '?')} viewed decisions without a record, "
        f"{log.get('logged_twice', '?')} logged twice"
    )
    table = Table(title="faults: what Loopwise did, what was lost", show_lines=True)
    table.add_column("fault")
    table.add_column("what Loopwise did")
    table.add_column("what was lost")
    rows: list[dict[str, str]] = []

    def row(fault: str, did: str, lost: str) -> None:
        rows.append({"fault": fault, "did": did, "lost": lost})
        table.add_row(fault, did, lost)

    kills = [f for f in faults if f.kind == "worker_sigkill" and f.done_at_s is not None]
    if kills:
        rec = [f.recovered_s for f in kills if f.recovered_s is not None]
        row(
            f"worker SIGKILL x {len(kills)} (at "
            + ", ".join(f"{f.done_at_s:.0f}" for f in kills)
            + " s)",
            "restarted 1 s later by the supervisor; consuming again after "
            + (
                f"{min(rec):.1f}-{max(rec):.1f} s (median {statistics.median(rec):.1f})"
                if rec
                else "?"
            )
            + f"; {figures.get('redelivered', 0):,} deliveries replayed over the run (counted "
            f"as duplicates or dead letters again)",
            lost_whole_run + " (whole run)",
        )
    for f in faults:
        if f.done_at_s is None or f.kind == "worker_sigkill":
            continue
        d = f.details
        exits = d.get("worker_exits_meanwhile") or []
        worker = (
            "the worker kept running" if not exits else f"the worker exited ({exits}), restarted"
        )
        after = f"consuming again after {f.recovered_s:.1f} s" if f.recovered_s else ""
        if f.kind == "broker_kill9":
            row(
                f"broker kill -9 + restart (at {f.done_at_s:.0f} s)",
                f"broker down {d['down_s']:.1f} s; {worker}; {after}",
                lost_whole_run + " (whole run)",
            )
        elif f.kind == "redis_kill9":
            cut = (
                f" (then {d['aof_bytes_cut']:,} bytes cut off its AOF: its last "
                f"{d['aof_cut_s']} s of writes, as a machine crash)"
                if "aof_bytes_cut" in d
                else ""
            )
            row(
                f"Redis kill -9 + restart (at {f.done_at_s:.0f} s){cut}",
                f"Redis down {d['down_s']:.1f} s, reloaded its AOF ({d['keys_before']:,} keys "
                f"before, {d['keys_after']:,} after); {worker}; {after}; epoch kept: "
                f"{d['epoch_kept']}",
                f"acknowledged writes: "
                f"{'none lost' if not d['counters_decreased'] else d['counters_decreased']} "
                f"(counters read before the kill ≤ after); exits with code 3: "
                f"{supervisor.data_lost_exits}",
            )
        elif f.kind == "forged_log_record":
            row(
                f"forged log record, propensity 0 (at {f.done_at_s:.0f} s, partition "
                f"{d.get('partition')})",
                f"the learner skipped and counted it: invalid_records "
                f"{learner.get('invalid_records')}",
                "nothing learned from it: "
                + status("the forged record skipped and counted (invalid_records), not learned"),
            )
    for name, info in (dead.get("specials") or {}).items():
        extra = (
            f", original {info['original_size']:,} B truncated to {info['original_kept_bytes']:,} "
            f"B, record {info['record_bytes']:,} B"
            if info["original_truncated"]
            else ""
        )
        row(
            name,
            f"dead-lettered: {info['reason']}/{info['field']}{extra}; the stream went on",
            "nothing: on the dead-letter topic " + status(f"special: {name}"),
        )
    row(
        f"malformed messages x {sent.malformed:,}",
        "dead-lettered with their reasons; dead letters by reason (with the specials "
        "and those sent again): "
        + ", ".join(f"{k} {v:,}" for k, v in sorted((dead.get("per_reason") or {}).items())),
        status(
            "every refused message on the dead-letter topic",
            "no good message dead-lettered, every reason as made",
        )
        + f" ({dead.get('sent_again', 0):,} dead letters sent again after crashes)",
    )
    row(
        f"duplicates sent x {sent.duplicates:,} (+ catalog republished by each closed-loop chunk)",
        f"dropped by event_id: duplicates {stats['duplicates']:,} = "
        f"{events.get('good_repeated', 0):,} repeated on the topic + replays",
        "none applied twice: " + status("every user hash equals the reference"),
    )
    row(
        "whole run",
        f"consumed {stats['consumed']:,}, accepted {stats['accepted']:,}, decisions opened "
        f"{stats['decisions_opened']:,} / closed {stats['decisions_closed']:,}, log records "
        f"{log.get('worker_records', 0):,}, VW examples {learner.get('versions', {}).get('vw')}",
        lost_whole_run,
    )
    console.print(table)

    check_table = Table(title="checks")
    check_table.add_column("check")
    check_table.add_column("")
    check_table.add_column("figures")
    for c in checks:
        check_table.add_row(c.name, "✓" if c.ok else "[red]✗[/red]", c.detail)
    console.print(check_table)
    for message, count in list(worker_log["distinct_warnings_and_errors"].items())[:12]:
        console.print(f"  worker log x{count}: {message}", markup=False, highlight=False)
    console.print(
        "[bold green]all checks passed[/bold green]"
        if ok
        else "[bold red]SOME CHECKS FAILED[/bold red]"
    )
    return {
        "ok": ok,
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "attribution_window_ms": s.attribution_window_ms,
            "batch_size": s.batch_size,
            "topic_partitions": s.topic_partitions,
            "arms": s.arms,
            "snapshot_interval_s": s.snapshot_interval_s,
            "superseded_decision_ttl_s": s.superseded_decision_ttl_s,
        },
        "table": rows,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        "faults": [
            {
                "kind": f.kind,
                "due_s": round(f.due_s, 1),
                "done_at_s": None if f.done_at_s is None else round(f.done_at_s, 1),
                "consumed_at": f.consumed_at,
                "recovered_s": None if f.recovered_s is None else round(f.recovered_s, 1),
                "details": f.details,
            }
            for f in faults
        ],
        "sent": {
            "organic": sent.organic,
            "malformed": sent.malformed,
            "duplicates": sent.duplicates,
            "specials": sent.specials and {k: v["at_event"] for k, v in sent.specials.items()},
            "send_errors": sent.send_errors[:20],
            "decisions_shown": sent.decisions,
            "closed_loop_chunks": sent.chunks,
            "closed_loop_chunk_errors": sent.chunk_errors,
            "closed_loop_published_by_completed_chunks": sent.cl_published,
            "default_views": sent.default_views,
            "stale_skips": sent.stale_skips,
        },
        "worker": {
            "starts": supervisor.spawns,
            "exits": [vars(e) for e in supervisor.exits],
            "data_lost_exits": supervisor.data_lost_exits,
            "log": worker_log,
        },
        **figures,
        "traffic_and_drain_s": round(traffic_wall_s, 1),
        "wall_s": round(wall_s, 1),
    }


if __name__ == "__main__":
    main()
