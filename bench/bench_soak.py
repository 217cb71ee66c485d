"""Soak: does memory level off? Worker RSS and Redis ``used_memory`` under steady traffic.

One real worker process (``loopwise worker``, full learning loop, default arms) runs for
``--minutes`` on its own Kafka broker and Redis (started here on free ports) under:

- **organic traffic** in real time at ``--rate`` events/s from a marketplace of ``--users``
  users and ``--items`` items (event time follows the wall clock, as in
  ``bench_freshness``): every batch gives each touched user a fresh decision, so
  ``decision:{id}`` keys are written at roughly the batch rate times the users per batch;
- **a warm-up** first (``--no-warm-up`` skips it): the catalog and one view per user,
  at the same rate, consumed before the measured minutes start, so that they measure the
  steady state rather than a population still being discovered (each user's state,
  ``nba:`` and latest decision are kept by design: that part grows with the users);
- **a simulated serving layer**: ``--views-per-s`` times a second it picks a user by
  activity, reads ``nba:{user}`` as any serving layer would and, if that decision was not
  shown yet, publishes the ``view`` with its ``decision_id`` and ``propensity`` (the format
  of ``producers/closed_loop.py``), then the user's click and purchase drawn from the
  marketplace's hidden ground truth, each sent when its event time is due. So the reward
  join, the outbox, the propensity log and the learner work too.

Two settings differ from the worker's defaults. The attribution window
(``--attribution-window-s``, 60 s here, 600 s by default), so that shown decisions close,
go through the outbox to the log and are learned within the run; with the default window
nothing shown would close before minute 10. The idempotency window
(``--dedupe-window-s``, 60 s here, 3,600 s by default): Redis remembers each applied
``event_id`` (a 12-byte digest in a ``seen:{bucket}`` set) for one to two windows, so that
memory levels off only after two windows; the run measures its bytes per id (``MEMORY
USAGE`` of the ``seen`` sets over their size) and the summary gives the level it reaches
at the worker's default window and this rate (``seen_plateau_mb_at_default``).
``--superseded-ttl-s`` defaults to the worker's ``superseded_decision_ttl_s``.

Every ``--sample-s`` seconds the bench samples: the worker's RSS (``VmRSS`` of the
process ``spawn_worker`` started, from ``/proc``; and of its children, if any), Redis
``INFO memory`` (``used_memory``, ``used_memory_rss``), ``DBSIZE`` and ``INFO keyspace``
(keys, keys with a TTL), the ``stats`` counters (events consumed, decisions made, opened,
closed), the open decisions (``HLEN join:{p}``) and the outbox (``LLEN outbox:{p}``),
the records the learner learned (``model`` hash), and the consumer group's lag on the
events topic (end offsets minus committed offsets). Every ``--scan-every-s`` seconds (60)
one ``SCAN`` over the key prefix counts the keys of each family (``user``, ``nba``,
``decision``, ``seen``, ``join``, ...) and ``MEMORY USAGE`` of 50 random ``decision:*``
keys gives their mean size: a SCAN is too slow to run every few seconds.

At the end: ``docs/soak.png`` (worker RSS, Redis memory, and consumed events with the key
count, against minutes), ``bench/results/soak.json`` (every sample and scan, and the
summary), and a table with the first-minute, middle-minute and last-minute averages and
the growth over the last half of the run (least-squares slope, MB per minute) for both.

**Verdict.** A quantity "levels off" when its last-half slope, extrapolated over
5 minutes, is below ``--threshold-pct`` (2) percent of its last-minute level; otherwise
it "grows". Why 2% per 5 minutes: the reported leak grew the worker's RSS from 300 MB to
1.1 GB over 600 k events (10 minutes at 1,000 events/s), i.e. by ~130% of its start per
5 minutes, and Redis by a decision of 5-20 KB per touched user per batch; 2% is 65 times
less, so a leak of that kind cannot pass, while allocator steps (CPython's arenas,
jemalloc's size classes, a hash table's rehash) of a few MB on a level of hundreds of MB
stay under it. It is a statement about these 10 minutes, not a proof for 24 hours: a
slope under the threshold, 24%/h at most, is checked again by a longer run. The verdict
is computed from the samples, never set by hand; the summary also says when the run is too
short for the superseded decisions' TTL to take effect (the last half starting before
the TTL has elapsed).

Run: ``.venv/bin/python -m bench.bench_soak`` (10 minutes) or ``loopwise bench soak``;
a quick look at the expiry: ``--minutes 3 --superseded-ttl-s 60``.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import math
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from kafka import TopicPartition
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bench.common import bench_settings, own_infra
from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.producers.sdk import EventPublisher
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.producers.traffic import RateLimiter
from loopwise.redis_clients import redis_client
from loopwise.streams.worker import spawn_worker, stop_worker

console = Console(width=None if sys.stdout.isatty() else 132)  # logs: wide tables
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MB = 1024 * 1024
SEED = 11


def parse_args() -> argparse.Namespace:
    defaults = Settings.model_fields
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (10)")
    parser.add_argument("--rate", type=float, default=1000.0, help="organic events/s (1000)")
    parser.add_argument("--users", type=int, default=20_000, help="marketplace users (20000)")
    parser.add_argument("--items", type=int, default=200, help="catalog items (200)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="sampling period (5)")
    parser.add_argument(
        "--superseded-ttl-s",
        type=int,
        default=defaults["superseded_decision_ttl_s"].default,
        help="the worker's superseded_decision_ttl_s (default: the worker's, %(default)s)",
    )
    parser.add_argument(
        "--attribution-window-s",
        type=int,
        default=60,
        help="the worker's attribution window, so that shown decisions close within the run "
        "(60; the worker's default is 600)",
    )
    parser.add_argument(
        "--dedupe-window-s",
        type=int,
        default=60,
        help="the worker's dedupe_window_s, so that the idempotency memory levels off within "
        f"the run (60; the worker's default is {defaults['dedupe_window_s'].default})",
    )
    parser.add_argument(
        "--views-per-s", type=float, default=10.0, help="next-best-actions shown per second (10)"
    )
    parser.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="skip the warm-up (one view per user before the measured minutes): memory then "
        "also grows with the users still arriving (by design: each has a state)",
    )
    parser.add_argument(
        "--scan-every-s", type=float, default=60.0, help="period of the key-family SCAN (60)"
    )
    parser.add_argument(
        "--threshold-pct",
        type=float,
        default=2.0,
        help="'levels off' when the last-half growth over 5 min is below this %% of the level",
    )
    parser.add_argument(
        "--max-redis-mb",
        type=float,
        default=8000.0,
        help="stop early (the verdict then says so) past this Redis used_memory (8000)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "soak.json", help="samples, summary")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "soak.png", help="the plot")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only redraw --png from a soak JSON"
    )
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.sample_s <= 0 or args.views_per_s < 0:
        parser.error("--minutes, --rate and --sample-s must be > 0, --views-per-s >= 0")
    if args.users < 1 or args.items < 1 or args.superseded_ttl_s < 1:
        parser.error("--users, --items and --superseded-ttl-s must be >= 1")
    if args.dedupe_window_s < 60:
        parser.error("--dedupe-window-s must be >= 60 (the worker's minimum)")
    if args.attribution_window_s < 1:
        parser.error("--attribution-window-s must be >= 1")
    if args.minutes * 60 < 4 * args.sample_s:
        parser.error("--minutes too short for --sample-s: fewer than 4 samples")
    return args


# ---------------------------------------------------------------------------- traffic


@dataclass
class Counts:
    """What the traffic threads did (each field written by one thread only)."""

    organic: int = 0
    views: int = 0
    follow_ups: int = 0
    no_nba: int = 0  # a picked user without nba:{user} yet
    already_shown: int = 0  # their nba was shown and not yet recomputed
    pending_at_end: int = 0  # follow-ups whose event time was not due when the run ended
    errors: list[str] = field(default_factory=list)


def whole_ms_gap(mean_gap_ms: float) -> float:
    """The mean of the simulator's gaps between views, ``max(1, rint(X))`` with X
    exponential of mean ``mean_gap_ms``: far above ``mean_gap_ms`` near 1 ms."""
    q = math.exp(-0.5 / mean_gap_ms)
    return (1.0 - q) + q / (1.0 - math.exp(-1.0 / mean_gap_ms))


def wall_clock_gap(rate: float) -> float:
    """The simulator's ``mean_gap_ms`` that makes event time advance as fast as the wall clock
    when its events are published at ``rate`` a second.

    The limiter paces events; a view brings ``target_ctr`` clicks and ``target_ctr *
    purchase_rate`` purchases, so views are due every ``1000 * per_view / rate`` ms of
    event time; the simulator's gaps are whole milliseconds (at least 1), so the exponential
    mean that gives that gap is solved for. Above ~1,080 events/s a view a millisecond is
    the most there is: event time then runs slower than the wall clock (never ahead).
    """
    per_view = 1.0 + MarketConfig.target_ctr * (1.0 + MarketConfig.purchase_rate)
    target = 1000.0 * per_view / rate
    lo, hi = 1e-3, max(target, 1.0)
    for _ in range(60):  # whole_ms_gap increases with its argument
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if whole_ms_gap(mid) < target else (lo, mid)
    return hi


def market_config(args: argparse.Namespace, run_tag: str) -> MarketConfig:
    """The marketplace, with event time advancing as fast as the wall clock
    (:func:`wall_clock_gap`)."""
    return MarketConfig(
        n_users=args.users,
        n_items=args.items,
        seed=SEED,
        start_ms=int(time.time() * 1000) - 1000,
        mean_gap_ms=wall_clock_gap(args.rate),
        run_tag=run_tag,
    )


def guarded(target: Callable[..., None], counts: Counts) -> Callable[..., None]:
    def run(*args: Any) -> None:
        try:
            target(*args)
        except Exception as exc:  # the main loop sees it and stops the run
            counts.errors.append(f"{target.__name__}: {type(exc).__name__}: {exc}")

    return run


def warm_up(settings: Settings, market: Marketplace, rate: float) -> int:
    """The catalog, then one view per marketplace user (of an item drawn with the seed), at
    ``rate``: the measured minutes then start with every user's state, ``nba:`` and decision
    written, so what they show is the steady state, not the population being discovered
    (the simulator draws users by activity: a tail of rare users keeps arriving for tens of
    minutes, each adding its state, by design). Returns the events published."""
    rng = random.Random(SEED)
    with EventPublisher.from_settings(settings) as publisher:
        catalog = market.catalog_events()
        for event in catalog:
            publisher.send(event)
        limiter = RateLimiter(rate)
        for n, user_id in enumerate(market.users):
            limiter.wait()
            publisher.send(
                {
                    "event_id": f"soak-warm-up-{n}",
                    "type": "view",
                    "user_id": user_id,
                    "item_id": rng.choice(market.items),
                    "timestamp": int(time.time() * 1000),
                }
            )
        publisher.flush()
    return len(catalog) + len(market.users)


def organic_load(
    settings: Settings, market: Marketplace, rate: float, counts: Counts, stop: threading.Event
) -> None:
    with EventPublisher.from_settings(settings) as publisher:
        for event in market.catalog_events():
            publisher.send(event)
        publisher.flush()
        limiter = RateLimiter(rate)
        for event in market.events():
            if stop.is_set():
                break
            limiter.wait()
            # Never ahead of the worker's clock (it refuses events > 5 min ahead).
            ahead_s = event["timestamp"] / 1000 - time.time()
            if ahead_s > 0.5:
                time.sleep(ahead_s)
            publisher.send(event)
            counts.organic += 1


def serving_layer(
    settings: Settings,
    market: Marketplace,
    views_per_s: float,
    counts: Counts,
    stop: threading.Event,
) -> None:
    """Show next-best-actions of users picked by activity; their clicks when due."""
    if views_per_s <= 0:
        return
    rng = np.random.default_rng(SEED + 1)
    client = redis_client(settings)
    nba_key = settings.key("nba", "{}")
    shown: dict[str, float] = {}  # decision_id -> when shown (forgotten after 15 min)
    due: list[tuple[int, int, dict[str, Any]]] = []  # (timestamp, seq, follow-up)
    seq = 0
    limiter = RateLimiter(views_per_s)
    with EventPublisher.from_settings(settings) as publisher:
        while not stop.is_set():
            limiter.wait()
            now_ms = int(time.time() * 1000)
            while due and due[0][0] <= now_ms:
                publisher.send(heapq.heappop(due)[2])
                counts.follow_ups += 1
            user_id = market.sample_user(rng)
            raw = client.get(nba_key.format(user_id))
            if raw is None:
                counts.no_nba += 1
                continue
            nba = orjson.loads(raw)
            if nba["decision_id"] in shown:
                counts.already_shown += 1
                continue
            shown[nba["decision_id"]] = time.monotonic()
            view = {
                "event_id": uuid.uuid4().hex,
                "type": "view",
                "user_id": user_id,
                "item_id": nba["item_id"],
                "timestamp": now_ms,
                "context": market.sample_context(rng, user_id),
                "decision_id": nba["decision_id"],
                "propensity": nba["propensity"],
            }
            publisher.send(view)
            counts.views += 1
            for follow_up in market.respond(view, rng):
                heapq.heappush(due, (int(follow_up["timestamp"]), seq, follow_up))
                seq += 1
            if len(shown) > 20_000:
                horizon = time.monotonic() - 900
                shown = {d: t for d, t in shown.items() if t > horizon}
    counts.pending_at_end = len(due)
    client.close()


# ---------------------------------------------------------------------------- sampling


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Every descendant of a process (from /proc/PID/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except FileNotFoundError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Lag:
    """The worker group's lag on the events topic: end offsets minus committed offsets.

    A consumer in the worker's group that never subscribes: it only asks the coordinator
    for the committed offsets (Faust commits every few seconds), it joins nothing.
    """

    def __init__(self, settings: Settings, partitions: int) -> None:
        self.consumer = kafka_clients.consumer(
            settings,
            group_id=settings.app_id,
            client_id="soak-lag",
            enable_auto_commit=False,
        )
        self.tps = [TopicPartition(settings.events_topic, p) for p in range(partitions)]

    def __call__(self) -> int:
        ends = self.consumer.end_offsets(self.tps)
        return sum(ends[tp] - (self.consumer.committed(tp) or 0) for tp in self.tps)

    def close(self) -> None:
        self.consumer.close()


def keyspace(info: dict[str, Any], db: int) -> tuple[int, int]:
    entry = info.get(f"db{db}") or {}
    return int(entry.get("keys", 0)), int(entry.get("expires", 0))


STATS = (
    "consumed",
    "accepted",
    "duplicates",
    "deadlettered",
    "batches",
    "decisions_made",
    "decisions_opened",
    "decisions_closed",
    "joined_rewards",
    "unknown_decisions",
)


def sample(
    client: redis.Redis, settings: Settings, worker_pid: int, lag: Lag, t_s: float, db: int
) -> dict[str, Any]:
    kids = children(worker_pid)
    memory = client.info("memory")
    keys, expires = keyspace(client.info("keyspace"), db)
    stats = {k.decode(): int(v) for k, v in client.hgetall(settings.key("stats")).items()}
    parts = range(settings.topic_partitions)
    with client.pipeline(transaction=False) as pipe:
        for p in parts:
            pipe.hlen(settings.key("join", str(p)))
        for p in parts:
            pipe.llen(settings.key("outbox", str(p)))
        pipe.hget(settings.key("model"), "reward_monitor")
        pipe.dbsize()
        *lens, monitor, dbsize = pipe.execute()
    learned = sum(arm.get("n", 0) for arm in orjson.loads(monitor).values()) if monitor else 0
    return {
        "t_s": round(t_s, 2),
        "worker_rss": rss_bytes(worker_pid),
        "worker_cpu_s": round(cpu_seconds(worker_pid), 2),
        "load_1min": os.getloadavg()[0],
        "children_rss": sum(rss_bytes(k) for k in kids),
        "children": len(kids),
        "redis_used_memory": int(memory["used_memory"]),
        "redis_used_memory_rss": int(memory["used_memory_rss"]),
        "dbsize": int(dbsize),
        "keys": keys,
        "keys_with_ttl": expires,
        "open_decisions": sum(lens[: len(parts)]),
        "outbox": sum(lens[len(parts) :]),
        "learned": learned,
        "lag": lag(),
        **{name: stats.get(name, 0) for name in STATS},
    }


def scan_families(client: redis.Redis, settings: Settings, t_s: float) -> dict[str, Any]:
    """Keys per family (``{prefix}{family}:...``) in one SCAN; mean size of decision keys."""
    prefix = settings.key_prefix
    families: dict[str, int] = {}
    decisions: list[bytes] = []
    seen: list[bytes] = []
    started = time.monotonic()
    for key in client.scan_iter(match=prefix + "*", count=5000):
        rest = key.decode()[len(prefix) :]
        family = rest.split(":", 1)[0]
        families[family] = families.get(family, 0) + 1
        if family == "decision":
            decisions.append(key)
        elif family == "seen":
            seen.append(key)
    picked = random.Random(0).sample(decisions, min(50, len(decisions)))
    sizes = [client.memory_usage(k) for k in picked]
    sizes = [s for s in sizes if s]
    seen_ids = sum(int(client.scard(k)) for k in seen)
    seen_bytes = sum(int(client.memory_usage(k, samples=0) or 0) for k in seen)
    return {
        "t_s": round(t_s, 2),
        "families": dict(sorted(families.items())),
        "decision_key_bytes_mean": float(np.mean(sizes)) if sizes else None,
        "seen_ids": seen_ids,
        "seen_bytes_per_id": seen_bytes / seen_ids if seen_ids else None,
        "scan_s": round(time.monotonic() - started, 2),
    }


def cpu_share(samples: list[dict[str, Any]]) -> float:
    """The worker's CPU use between the last two samples (1.0: one core)."""
    if len(samples) < 2:
        return 0.0
    a, b = samples[-2], samples[-1]
    return (b["worker_cpu_s"] - a["worker_cpu_s"]) / max(b["t_s"] - a["t_s"], 1e-9)


# ---------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, settings: Settings, db: int) -> dict[str, Any]:
    client = redis_client(settings)
    console.print(f"marketplace: {args.users:,} users x {args.items} items (calibrating)")
    organic_market = Marketplace(market_config(args, "organic"))
    serving_market = Marketplace(market_config(args, "serving"))  # same world, own ids
    counts = Counts()
    stop = threading.Event()
    worker = spawn_worker(settings, log_level="warning")
    samples: list[dict[str, Any]] = []
    scans: list[dict[str, Any]] = []
    stopped_early: str | None = None
    lag = None
    organic = threading.Thread(
        target=guarded(organic_load, counts),
        args=(settings, organic_market, args.rate, counts, stop),
        name="organic",
    )
    serving = threading.Thread(
        target=guarded(serving_layer, counts),
        args=(settings, serving_market, args.views_per_s, counts, stop),
        name="serving",
    )
    try:
        if args.warm_up:
            console.print(f"warm-up: one view for each of the {args.users:,} users")
            warm = warm_up(settings, organic_market, args.rate)
            deadline = time.monotonic() + 600
            while int(client.hget(settings.key("stats"), "consumed") or 0) < warm:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with {worker.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker did not consume the warm-up in 10 minutes")
                time.sleep(0.5)
        organic.start()
        deadline = time.monotonic() + 180
        while not client.exists(settings.key("nba", "__default__")):
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}")
            if counts.errors or time.monotonic() > deadline:
                raise RuntimeError(f"the worker produced no nba:__default__: {counts.errors}")
            time.sleep(0.2)
        serving.start()
        lag = Lag(settings, settings.topic_partitions)
        duration = args.minutes * 60
        started = time.monotonic()
        next_sample = started
        next_scan = started + args.scan_every_s
        columns = (
            TextColumn("[bold]soak"),
            BarColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[line]}"),
        )
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("soak", total=duration, line="")
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    s = sample(client, settings, worker.pid, lag, now - started, db)
                    s["published"] = counts.organic + counts.views + counts.follow_ups
                    s["views"] = counts.views
                    samples.append(s)
                    next_sample += args.sample_s
                    bar.update(
                        task,
                        completed=min(now - started, duration),
                        line=f"RSS {s['worker_rss'] / MB:,.0f} MB | Redis "
                        f"{s['redis_used_memory'] / MB:,.0f} MB | keys {s['keys']:,} | "
                        f"consumed {s['consumed']:,} | lag {s['lag']:,} | "
                        f"worker CPU {cpu_share(samples):.0%} | load {s['load_1min']:.1f} | "
                        f"shown {s['views']:,} closed {s['decisions_closed']:,} "
                        f"learned {s['learned']:,}",
                    )
                    if s["redis_used_memory"] > args.max_redis_mb * MB:
                        stopped_early = (
                            f"Redis used_memory passed --max-redis-mb {args.max_redis_mb:.0f}"
                        )
                    elif mem_available_bytes() < 1.5 * 1024 * MB:
                        stopped_early = "the machine has less than 1.5 GB available"
                if now >= next_scan:
                    scans.append(scan_families(client, settings, now - started))
                    next_scan += args.scan_every_s
                if worker.poll() is not None:
                    stopped_early = f"the worker exited with {worker.returncode}"
                if counts.errors:
                    stopped_early = "; ".join(counts.errors)
                if stopped_early or now - started >= duration:
                    break
                time.sleep(max(0.0, min(next_sample, next_scan) - time.monotonic()))
        if stopped_early:
            console.print(f"[red]stopped early: {stopped_early}")
        scans.append(scan_families(client, settings, time.monotonic() - started))
    finally:
        stop.set()
        for thread in (organic, serving):
            if thread.is_alive():
                thread.join(60)
        worker_exit = stop_worker(worker)
        if lag is not None:
            lag.close()
        client.close()
    return {
        "samples": samples,
        "scans": scans,
        "traffic": {
            "organic_events": counts.organic,
            "views_shown": counts.views,
            "follow_ups_sent": counts.follow_ups,
            "follow_ups_pending_at_end": counts.pending_at_end,
            "picks_without_nba": counts.no_nba,
            "picks_already_shown": counts.already_shown,
        },
        "worker_exit_code": worker_exit,
        "stopped_early": stopped_early,
    }


# ---------------------------------------------------------------------------- summary


def level_summary(
    t_s: np.ndarray, values: np.ndarray, duration_s: float, threshold_pct: float
) -> dict[str, Any]:
    """First-minute, middle-minute, last-minute means (MB) and the last half's slope."""
    mb = values / MB
    mid = duration_s / 2
    first = mb[t_s < 60]
    middle = mb[np.abs(t_s - mid) <= 30]
    last = mb[t_s >= duration_s - 60]
    half = t_s >= mid
    x, y = t_s[half] / 60, mb[half]
    if len(x) >= 3:
        (slope, intercept), cov = np.polyfit(x, y, 1, cov=True)
        slope_se = float(np.sqrt(cov[0, 0]))
    else:
        slope, intercept, slope_se = float("nan"), float("nan"), float("nan")
    level = float(last.mean()) if len(last) else float(mb[-1])
    growth_pct = 100 * 5 * float(slope) / level if level else float("nan")
    return {
        "first_minute_mb": float(first.mean()) if len(first) else None,
        "middle_minute_mb": float(middle.mean()) if len(middle) else None,
        "last_minute_mb": level,
        "last_half_slope_mb_per_min": float(slope),
        "last_half_slope_se": slope_se,
        "last_half_intercept_mb": float(intercept),
        "last_half_growth_pct_per_5min": growth_pct,
        "threshold_pct_per_5min": threshold_pct,
        "verdict": "levels off" if growth_pct < threshold_pct else "grows",
    }


def summarize(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    samples = result["samples"]
    t_s = np.array([s["t_s"] for s in samples])
    duration = float(t_s[-1])
    rss = np.array([s["worker_rss"] + s["children_rss"] for s in samples], dtype=float)
    used = np.array([s["redis_used_memory"] for s in samples], dtype=float)
    summary: dict[str, Any] = {
        "duration_s": duration,
        "worker_rss": level_summary(t_s, rss, duration, args.threshold_pct),
        "redis_used_memory": level_summary(t_s, used, duration, args.threshold_pct),
    }
    both = [summary[k]["verdict"] for k in ("worker_rss", "redis_used_memory")]
    notes = []
    if result["stopped_early"]:
        notes.append(f"stopped early ({result['stopped_early']}): the verdict is on a short run")
    if duration / 2 < args.superseded_ttl_s:
        notes.append(
            f"the last half starts at {duration / 2:.0f} s, before the superseded decisions' "
            f"TTL ({args.superseded_ttl_s} s) has elapsed: their expiry cannot hold Redis "
            f"level in this run; run at least {2 * args.superseded_ttl_s / 60 + 2:.0f} "
            "minutes, or a shorter --superseded-ttl-s"
        )
    summary["verdict"] = "levels off" if all(v == "levels off" for v in both) else "grows"
    summary["notes"] = notes
    last, first = samples[-1], samples[0]
    span = max(last["t_s"] - first["t_s"], 1e-9)
    summary["consumed_per_s"] = (last["consumed"] - first["consumed"]) / span
    summary["worker_cpu_cores"] = (last["worker_cpu_s"] - first["worker_cpu_s"]) / span
    summary["load_1min_mean"] = float(np.mean([s["load_1min"] for s in samples]))
    summary["final_lag"] = last["lag"]
    summary["max_lag"] = max(s["lag"] for s in samples)
    summary["families_at_end"] = result["scans"][-1]["families"] if result["scans"] else {}
    per_id = [x["seen_bytes_per_id"] for x in result["scans"] if x.get("seen_bytes_per_id")]
    if per_id:
        window = Settings.model_fields["dedupe_window_s"].default
        summary["seen_bytes_per_id"] = per_id[-1]
        # Between one window's ids (a bucket just expired) and two (it is about to).
        summary["seen_plateau_mb_at_default"] = [
            round(n * summary["consumed_per_s"] * window * per_id[-1] / 1e6, 1) for n in (1, 2)
        ]
    return summary


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    summary = result["summary"]
    table = Table(
        title=f"soak: {summary['duration_s'] / 60:.1f} min at {args.rate:,.0f} events/s, "
        f"{args.users:,} users x {args.items} items, superseded TTL {args.superseded_ttl_s} s"
    )
    for column in ("", "first min MB", "middle min MB", "last min MB", "last half MB/min"):
        table.add_column(column, justify="right" if column else "left")
    table.add_column(f"growth / 5 min (limit {args.threshold_pct:g}%)", justify="right")
    table.add_column("verdict")
    for key, label in (("worker_rss", "worker RSS"), ("redis_used_memory", "Redis used_memory")):
        s = summary[key]
        table.add_row(
            label,
            f"{s['first_minute_mb']:,.1f}" if s["first_minute_mb"] is not None else "-",
            f"{s['middle_minute_mb']:,.1f}" if s["middle_minute_mb"] is not None else "-",
            f"{s['last_minute_mb']:,.1f}",
            f"{s['last_half_slope_mb_per_min']:+,.2f} ± {s['last_half_slope_se']:.2f}",
            f"{s['last_half_growth_pct_per_5min']:+.2f}%",
            s["verdict"],
        )
    console.print(table)
    families = Table(title="keys per family (SCAN)")
    families.add_column("minute", justify="right")
    names = sorted({f for scan in result["scans"] for f in scan["families"]})
    for name in names:
        families.add_column(name, justify="right")
    families.add_column("decision key bytes", justify="right")
    for scan in result["scans"]:
        mean = scan["decision_key_bytes_mean"]
        families.add_row(
            f"{scan['t_s'] / 60:.1f}",
            *(f"{scan['families'].get(n, 0):,}" for n in names),
            f"{mean:,.0f}" if mean else "-",
        )
    console.print(families)
    console.print(
        f"consumed {summary['consumed_per_s']:,.0f} events/s (asked: {args.rate:,.0f}), lag at "
        f"the end {summary['final_lag']:,} (max {summary['max_lag']:,}); worker CPU "
        f"{summary['worker_cpu_cores']:.2f} cores, load {summary['load_1min_mean']:.1f} on "
        f"{os.cpu_count()} cores; traffic {result['traffic']}"
    )
    if "seen_plateau_mb_at_default" in summary:
        low, high = summary["seen_plateau_mb_at_default"]
        console.print(
            f"idempotency memory: {summary['seen_bytes_per_id']:.0f} bytes per event id; at the "
            f"worker's default dedupe_window_s and this rate it levels off between {low:,.0f} "
            f"and {high:,.0f} MB (here: --dedupe-window-s {args.dedupe_window_s})"
        )
    for note in summary["notes"]:
        console.print(f"[yellow]note: {note}")
    colour = "green" if summary["verdict"] == "levels off" else "red"
    console.print(f"[bold {colour}]verdict: {summary['verdict']}")


def plot(result: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, summary = result["samples"], result["summary"]
    minutes = np.array([s["t_s"] for s in samples]) / 60
    rss = np.array([s["worker_rss"] + s["children_rss"] for s in samples]) / MB
    used = np.array([s["redis_used_memory"] for s in samples]) / MB
    used_rss = np.array([s["redis_used_memory_rss"] for s in samples]) / MB
    consumed = np.array([s["consumed"] for s in samples]) / 1000
    keys = np.array([s["keys"] for s in samples]) / 1000
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True, constrained_layout=True)
    half = minutes >= minutes[-1] / 2
    for ax, y, key, label in (
        (axes[0], rss, "worker_rss", "worker RSS (MB)"),
        (axes[1], used, "redis_used_memory", "Redis used_memory (MB)"),
    ):
        s = summary[key]
        ax.plot(minutes, y, color="tab:blue", lw=1.6, label=label.replace(" (MB)", ""))
        fit = s["last_half_intercept_mb"] + s["last_half_slope_mb_per_min"] * minutes[half]
        ax.plot(
            minutes[half],
            fit,
            "--",
            color="tab:red",
            lw=1.2,
            label=f"last-half fit: {s['last_half_slope_mb_per_min']:+.2f} MB/min "
            f"({s['last_half_growth_pct_per_5min']:+.1f}% / 5 min): {s['verdict']}",
        )
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].plot(minutes, used_rss, ":", color="tab:gray", lw=1.2, label="Redis used_memory_rss")
    ttl_min = args.superseded_ttl_s / 60
    if ttl_min <= minutes[-1]:
        axes[1].axvline(ttl_min, color="tab:green", ls=":", lw=1)
        at_right = ttl_min > 0.8 * minutes[-1]
        axes[1].annotate(
            "superseded TTL " if at_right else " superseded TTL",
            (ttl_min, 0.05),
            xycoords=("data", "axes fraction"),
            color="tab:green",
            ha="right" if at_right else "left",
        )
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].legend(loc="upper left", fontsize=8)  # Redis starts near 0: that corner is free
    axes[2].plot(minutes, consumed, color="tab:purple", lw=1.6, label="events consumed")
    axes[2].set_ylabel("events consumed (thousands)", color="tab:purple")
    axes[2].set_xlabel("minutes")
    axes[2].grid(alpha=0.3)
    twin = axes[2].twinx()
    twin.plot(minutes, keys, color="tab:orange", lw=1.4, label="Redis keys (DBSIZE)")
    scans = result["scans"]
    if scans:
        twin.plot(
            [sc["t_s"] / 60 for sc in scans],
            [sc["families"].get("decision", 0) / 1000 for sc in scans],
            "o",
            color="tab:brown",
            ms=4,
            label="decision:* keys (SCAN)",
        )
    twin.set_ylabel("keys (thousands)", color="tab:orange")
    twin.set_ylim(bottom=0)
    lines = axes[2].get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    axes[2].legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    fig.suptitle(
        f"Soak: {args.rate:,.0f} events/s, {args.users:,} users x {args.items} items, "
        f"{args.views_per_s:g} views/s, superseded TTL {args.superseded_ttl_s} s: "
        f"{summary['verdict']}",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(args: argparse.Namespace) -> None:
    data = orjson.loads(args.replot.read_bytes())
    config = data["config"]
    keys = ("rate", "users", "items", "views_per_s", "superseded_ttl_s")
    plot(data, argparse.Namespace(**{k: config[k] for k in keys}), args.png)
    console.print(f"written to {args.png}")


def main() -> None:
    args = parse_args()
    if args.replot:
        replot(args)
        return
    logging.basicConfig(level=logging.WARNING)
    with own_infra("loopwise-soak-") as infra:
        settings = bench_settings(
            infra,
            "soak",
            superseded_decision_ttl_s=args.superseded_ttl_s,
            attribution_window_ms=args.attribution_window_s * 1000,
            dedupe_window_s=args.dedupe_window_s,
            decisions=True,
        )
        result = run(args, settings, infra.redis_db)
    if not result["samples"]:
        raise SystemExit("no sample taken")
    result["summary"] = summarize(result, args)
    result["config"] = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "worker": {
            "arms": settings.arms,
            "batch_size": settings.batch_size,
            "batch_within_s": settings.batch_within_s,
            "nba_ttl_s": settings.nba_ttl_s,
            "superseded_decision_ttl_s": settings.superseded_decision_ttl_s,
            "attribution_window_ms": settings.attribution_window_ms,
            "dedupe_window_s": settings.dedupe_window_s,
            "max_candidates": settings.max_candidates,
        },
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    report(result, args)
    plot(result, args, args.png)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    ordered = {k: result[k] for k in ("config", "summary", "traffic", "worker_exit_code")}
    ordered.update(stopped_early=result["stopped_early"], scans=result["scans"])
    ordered["samples"] = result["samples"]
    args.json.write_bytes(orjson.dumps(ordered, option=orjson.OPT_INDENT_2))
    console.print(f"written to {args.json} and {args.png}")


if __name__ == "__main__":
    main()
