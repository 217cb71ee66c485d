"""Serving: latency of reading ``nba:{user_id}`` under the worker's load, beside a bare GET.

What a serving layer pays to read a next-best-action (docs/contracts.md §5: ``GET
nba:{user_id}``, and ``GET nba:__default__`` when it is absent) while the worker writes
to the same Redis, against the floor of the same client doing a bare ``GET`` of a value
of the same size, in the same run, on the same Redis.

**Set-up** (all started here, on free ports): a Kafka broker and Redis
(``loopwise/infra``), the ``serving.*`` topics (``bench.common.bench_settings``), and a real
worker process (``loopwise worker``, the full loop with default arms: a VW decision per
touched user per batch, written to ``nba:{user}`` in the batch's MULTI/EXEC). Organic
traffic from the simulator's marketplace (``--users`` x ``--items``, as ``bench_soak``:
event time follows the wall clock) is published at ``--rate`` events/s from a thread of
this process, from the start to the end of the loaded phase. After ``--warmup-s`` seconds
under load, the users the worker holds state for (one ``SCAN`` of ``user:*``) are the
*known users*; the median size of their ``nba`` values (a sample of up to 500) is the
size of the bare value: one of those values, of that median length, is copied to a key of
its own (no TTL, never written again).

**The serving client** is a separate Python process (``python -c`` importing this
module's :func:`serve`), a synchronous redis-py client made by
``loopwise.redis_clients.redis_client`` from the same settings, as a serving layer would
make it. One request at a time, ``--get-rate`` requests per second (paced: it sleeps until
the next one is due, so it does not saturate a core; 0: back to back), alternating
between the two kinds so that both see the same moments of the load:

* ``nba``: ``GET nba:{user}`` of a known user drawn uniformly (seeded), and when the
  value is absent ``GET nba:__default__`` (counted as a fallback; the request's time is
  both round trips, as a serving layer would pay it);
* ``bare``: ``GET`` of the bare key.

Each request is timed alone with ``time.perf_counter_ns`` around the redis-py call(s)
(the reply's bytes included, no JSON decoding: both kinds would pay the same). The first
200 requests warm the connection and are not recorded.

**Phases.** ``load``: ``--seconds`` with the worker running under the organic traffic.
``idle`` (``--idle-seconds``, 0 to skip): the traffic stopped and the worker stopped
(SIGTERM, clean shutdown), so Redis serves only this client: the same two kinds again.

**Reported**, per phase and kind: requests, p50 / p99 / p99.9 / max in µs, and the ratio
``nba / bare`` of each; the fallbacks; the nba values' median size; for the loaded phase,
what the worker did meanwhile (events published and consumed, batches, decisions, from
``stats``) and Redis's own CPU (``INFO cpu``) over the phase. Writes
``bench/results/serving.json`` (the summary, not every sample).

What to expect: a GET is a GET, so ``nba / bare`` near 1 says reading a next-best-action
costs what any read of its size costs; the load shows in both kinds' tails (a GET that
arrives while Redis runs a batch's MULTI/EXEC waits for it) and in ``load`` against
``idle``. On a small machine the client, the worker, the broker and Redis share the cores:
the percentiles then include waiting for a core. A paced request also pays for waking the
client and Redis from idle (``--get-rate 0``, back to back, shows the floor without it).

Run: ``make bench-serving`` or ``loopwise bench serving --seconds 60``
(``--seconds 10 --idle-seconds 5`` for a quick look).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from rich.console import Console
from rich.table import Table

from bench.bench_soak import Counts, guarded, market_config, organic_load
from bench.common import bench_settings, own_infra, write_json
from loopwise.config import Settings, load_settings
from loopwise.producers.simulator import Marketplace
from loopwise.redis_clients import redis_client
from loopwise.streams.decisions import DEFAULT_USER
from loopwise.streams.worker import spawn_worker, stop_worker

console = Console(width=None if sys.stdout.isatty() else 120)  # logs: wide tables
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WARM_REQUESTS = 200
PERCENTILES = (50.0, 99.0, 99.9)
BARE_KEY = "servingbench:bare"  # outside the worker's key prefix
STATS = ("consumed", "batches", "decisions_made")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="organic events/s (1000)")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="measuring time under load (60)"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=20.0,
        help="measuring time with the traffic and the worker stopped (20; 0: no idle phase)",
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=15.0,
        help="seconds under load before the known users are taken and measuring starts (15)",
    )
    parser.add_argument(
        "--get-rate",
        type=float,
        default=2000.0,
        help="the serving client's requests/s, both kinds together (2000; 0: back to back)",
    )
    parser.add_argument("--users", type=int, default=5000, help="marketplace users (5000)")
    parser.add_argument(
        "--items", type=int, default=200, help="catalog items (200: 100 candidates a decision)"
    )
    parser.add_argument("--seed", type=int, default=1, help="the client's draw of users (1)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "serving.json", help="results JSON (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.idle_seconds < 0 or args.warmup_s < 0:
        parser.error("--rate and --seconds must be > 0, --idle-seconds and --warmup-s >= 0")
    if args.get_rate < 0:
        parser.error("--get-rate must be >= 0")
    if args.users < 1 or args.items < 1:
        parser.error("--users and --items must be >= 1")
    return args


# ------------------------------------------------------------------------ serving client


def serve(spec_path: str) -> None:
    """The serving client's process: read the spec, time the requests, write the samples."""
    spec = orjson.loads(Path(spec_path).read_bytes())
    settings = load_settings()  # from the LOOPWISE_* variables the bench set
    client = redis_client(settings)
    try:
        result = time_requests(
            client,
            # stored ids, as read from the user:* keys (pseudonyms, were pseudonymization on)
            nba_keys=[settings.key("nba", u) for u in spec["users"]],
            default_key=settings.key("nba", DEFAULT_USER),
            bare_key=spec["bare_key"],
            seconds=spec["seconds"],
            get_rate=spec["get_rate"],
            seed=spec["seed"],
            signal=lambda word: print(word, flush=True),  # to the bench, on a pipe
        )
    finally:
        client.close()
    Path(spec["out"]).write_bytes(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))


def time_requests(
    client: redis.Redis,
    *,
    nba_keys: list[str],
    default_key: str,
    bare_key: str,
    seconds: float,
    get_rate: float,
    seed: int,
    signal: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Alternate ``nba`` and ``bare`` requests for ``seconds``; every one timed alone.
    ``signal("measuring")`` and ``signal("done")`` mark the timed window."""
    if not nba_keys:
        raise ValueError("no known users to read")
    pick = random.Random(seed).randrange
    n_keys = len(nba_keys)
    get = client.get
    nba_ns, bare_ns = array("q"), array("q")
    nba_bytes = array("q")
    fallback = array("b")
    bare_missing = 0
    period = 1.0 / get_rate if get_rate > 0 else 0.0
    for i in range(WARM_REQUESTS):
        get(nba_keys[i % len(nba_keys)] if i % 2 else bare_key)
    perf_ns = time.perf_counter_ns
    signal("measuring")
    start = time.perf_counter()
    end = start + seconds
    due = start
    i = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if period:
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.05:  # fell behind (descheduled): no catch-up burst
                due = now
            due += period
        if i % 2 == 0:
            key = nba_keys[pick(n_keys)]
            t0 = perf_ns()
            value = get(key)
            if value is None:
                value = get(default_key)
                t1 = perf_ns()
                fallback.append(1)
            else:
                t1 = perf_ns()
                fallback.append(0)
            nba_ns.append(t1 - t0)
            nba_bytes.append(len(value) if value is not None else 0)
        else:
            t0 = perf_ns()
            value = get(bare_key)
            t1 = perf_ns()
            bare_ns.append(t1 - t0)
            bare_missing += value is None
        i += 1
    elapsed = time.perf_counter() - start
    signal("done")
    return {
        "elapsed_s": elapsed,
        "nba_ns": np.frombuffer(nba_ns, dtype=np.int64),
        "nba_fallback": np.frombuffer(fallback, dtype=np.int8),
        "nba_bytes": np.frombuffer(nba_bytes, dtype=np.int64),
        "bare_ns": np.frombuffer(bare_ns, dtype=np.int64),
        "bare_missing": bare_missing,
    }


def run_client(
    settings: Settings,
    users: list[str],
    args: argparse.Namespace,
    seconds: float,
    tmp: Path,
    on_start: Callable[[], None] = lambda: None,
    on_end: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Run the serving client in its own process for ``seconds``; its samples.
    ``on_start`` and ``on_end`` run when its timed window starts and ends."""
    spec = tmp / "client-spec.json"
    out = tmp / "client-out.json"
    out.unlink(missing_ok=True)
    spec.write_bytes(
        orjson.dumps(
            {
                "users": users,
                "bare_key": BARE_KEY,
                "seconds": seconds,
                "get_rate": args.get_rate,
                "seed": args.seed,
                "out": str(out),
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWISE_")}
    env.update(settings.as_env())
    code = "import sys; from bench.bench_serving import serve; serve(sys.argv[1])"
    with subprocess.Popen(
        [sys.executable, "-c", code, str(spec)],
        cwd=ROOT,  # bench/ is not installed: importable from the checkout
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as client:
        assert client.stdout is not None
        try:
            for word, hook in (("measuring", on_start), ("done", on_end)):
                line = client.stdout.readline().strip()
                if line != word:
                    raise RuntimeError(f"the serving client said {line!r}, not {word!r}")
                hook()
            returncode = client.wait(timeout=120)
        except BaseException:
            client.kill()
            raise
    if returncode != 0:
        raise RuntimeError(f"the serving client exited with {returncode}")
    raw = orjson.loads(out.read_bytes())
    if raw["bare_missing"]:
        raise RuntimeError(f"the bare key was missing {raw['bare_missing']} times")
    return {
        "elapsed_s": raw["elapsed_s"],
        "nba_ns": np.asarray(raw["nba_ns"], dtype=np.int64),
        "nba_fallback": np.asarray(raw["nba_fallback"], dtype=np.int8),
        "nba_bytes": np.asarray(raw["nba_bytes"], dtype=np.int64),
        "bare_ns": np.asarray(raw["bare_ns"], dtype=np.int64),
        "bare_missing": int(raw["bare_missing"]),
    }


# --------------------------------------------------------------------------- the run


def known_users(client: redis.Redis, settings: Settings) -> list[str]:
    """Every user the worker holds state for (one SCAN of ``user:*``), sorted."""
    prefix = settings.key("user", "")
    return sorted(
        key.decode()[len(prefix) :] for key in client.scan_iter(match=prefix + "*", count=1000)
    )


def bare_value(client: redis.Redis, settings: Settings, users: list[str]) -> tuple[bytes, int]:
    """A stored nba value of the median length (of up to 500 known users'); the number
    sampled."""
    rng = np.random.default_rng(0)
    sample = rng.choice(len(users), size=min(500, len(users)), replace=False)
    values = [
        v for v in client.mget([settings.key("nba", users[i]) for i in sample]) if v is not None
    ]
    if not values:
        raise RuntimeError("no known user has an nba value: is the worker deciding?")
    values.sort(key=len)
    return values[len(values) // 2], len(values)


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def worker_stats(client: redis.Redis, settings: Settings) -> dict[str, int]:
    raw = client.hmget(settings.key("stats"), list(STATS))
    return {name: int(v or 0) for name, v in zip(STATS, raw, strict=True)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with (
        own_infra("loopwise-serving-") as infra,
        tempfile.TemporaryDirectory(prefix="loopwise-serving-client-") as tmp_dir,
    ):
        tmp = Path(tmp_dir)
        worker = None
        stop = threading.Event()
        counts = Counts()
        load = None
        client = None
        try:
            settings = bench_settings(infra, "serving")
            client = redis_client(settings)
            worker = spawn_worker(settings, log_level="warning")
            market = Marketplace(market_config(args, run_tag="serving"))
            load = threading.Thread(
                target=guarded(organic_load, counts),
                args=(settings, market, args.rate, counts, stop),
                daemon=True,
            )
            load.start()
            wait_for_default(client, settings, worker, counts)
            console.print(f"worker deciding; {args.warmup_s:g} s more under load")
            time.sleep(args.warmup_s)
            users = known_users(client, settings)
            value, sampled = bare_value(client, settings, users)
            client.set(BARE_KEY, value)
            console.print(
                f"{len(users):,} known users; bare value: {len(value):,} bytes "
                f"(the median of {sampled} nba values)"
            )

            marks: dict[str, tuple[dict[str, int], int, float, float]] = {}

            def mark(name: str, db: redis.Redis = client) -> Callable[[], None]:
                def now() -> None:
                    marks[name] = (
                        worker_stats(db, settings),
                        counts.organic,
                        redis_cpu_s(db),
                        time.monotonic(),
                    )

                return now

            console.print(f"load phase: {args.seconds:g} s at {args.rate:g} events/s")
            loaded = run_client(
                settings, users, args, args.seconds, tmp, mark("before"), mark("after")
            )
            before, after = marks["before"], marks["after"]
            wall = after[3] - before[3]
            if counts.errors:
                raise RuntimeError("; ".join(counts.errors))
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode} during the run")
            during = {
                "wall_s": wall,
                "events_published": after[1] - before[1],
                **{f"worker_{k}": after[0][k] - before[0][k] for k in STATS},
                "redis_cpu_share": (after[2] - before[2]) / wall,
                # published (the catalog included) and not yet consumed by the worker
                "backlog_at_start": before[1] + args.items - before[0]["consumed"],
                "backlog_at_end": after[1] + args.items - after[0]["consumed"],
            }
            phases = {"load": summarize(loaded, during)}

            if args.idle_seconds > 0:
                stop.set()
                load.join(30)
                stop_worker(worker)
                worker = None
                console.print(f"idle phase: {args.idle_seconds:g} s, no traffic, worker stopped")
                idle = run_client(
                    settings, users, args, args.idle_seconds, tmp, mark("idle0"), mark("idle1")
                )
                cpu = marks["idle1"][2] - marks["idle0"][2]
                idle_during = {"redis_cpu_share": cpu / (marks["idle1"][3] - marks["idle0"][3])}
                phases["idle"] = summarize(idle, idle_during)
        finally:
            stop.set()
            if load is not None:
                load.join(30)
            if worker is not None:
                stop_worker(worker)
            if client is not None:
                client.close()
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "idle_seconds": args.idle_seconds,
        "warmup_s": args.warmup_s,
        "get_rate": args.get_rate,
        "users": args.users,
        "items": args.items,
        "known_users": len(users),
        "bare_value_bytes": len(value),
        "phases": phases,
    }


def wait_for_default(
    client: redis.Redis, settings: Settings, worker: subprocess.Popen[bytes], counts: Counts
) -> None:
    deadline = time.monotonic() + 120
    while not client.exists(settings.key("nba", DEFAULT_USER)):
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}")
        if counts.errors:
            raise RuntimeError("; ".join(counts.errors))
        if time.monotonic() > deadline:
            raise RuntimeError("the worker produced no nba:__default__ in 120 s")
        time.sleep(0.1)


def percentiles_us(ns: np.ndarray) -> dict[str, float]:
    if len(ns) == 0:
        return {"p50": float("nan"), "p99": float("nan"), "p999": float("nan"), "max": float("nan")}
    p50, p99, p999 = np.percentile(ns / 1000.0, PERCENTILES)
    return {
        "p50": float(p50),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(ns.max()) / 1000,
    }


def summarize(samples: dict[str, Any], during: dict[str, Any]) -> dict[str, Any]:
    nba, bare = samples["nba_ns"], samples["bare_ns"]
    fallback = samples["nba_fallback"].astype(bool)
    nba_p, bare_p = percentiles_us(nba), percentiles_us(bare)
    found = samples["nba_bytes"][~fallback]
    return {
        "elapsed_s": samples["elapsed_s"],
        "nba": {"n": len(nba), **nba_p},
        "nba_found_only": {"n": int((~fallback).sum()), **percentiles_us(nba[~fallback])},
        "bare": {"n": len(bare), **bare_p},
        "ratio_nba_over_bare": {k: nba_p[k] / bare_p[k] for k in nba_p},
        "nba_fallbacks": int(fallback.sum()),
        "nba_median_bytes": float(np.median(found)) if len(found) else float("nan"),
        "bare_missing": samples["bare_missing"],
        **during,
    }


def report(result: dict[str, Any], out: Path) -> None:
    table = Table(
        title=(
            f"GET latency, µs: serving client at {result['get_rate']:g} requests/s, "
            f"{result['known_users']:,} known users, bare value {result['bare_value_bytes']:,} B"
        )
    )
    for column in ("phase", "read", "requests", "p50", "p99", "p99.9", "max"):
        table.add_column(column, justify="left" if column in ("phase", "read") else "right")
    for phase, s in result["phases"].items():
        label = (
            f"load ({result['rate']:g} events/s, worker on)"
            if phase == "load"
            else "idle (worker stopped)"
        )
        rows = [
            ("nba:{user} (+ default on a miss)", s["nba"]),
            ("bare GET, same size", s["bare"]),
        ]
        for name, p in rows:
            table.add_row(
                label,
                name,
                f"{p['n']:,}",
                f"{p['p50']:,.0f}",
                f"{p['p99']:,.0f}",
                f"{p['p999']:,.0f}",
                f"{p['max']:,.0f}",
            )
        r = s["ratio_nba_over_bare"]
        table.add_row(
            label,
            "ratio nba / bare",
            "",
            f"{r['p50']:.2f}",
            f"{r['p99']:.2f}",
            f"{r['p999']:.2f}",
            f"{r['max']:.2f}",
            end_section=True,
        )
    console.print(table)
    for phase, s in result["phases"].items():
        served = (s["nba"]["n"] + s["bare"]["n"]) / s["elapsed_s"]
        line = (
            f"{phase}: {served:,.0f} requests/s served; "
            f"{s['nba_fallbacks']:,} of {s['nba']['n']:,} nba reads fell back to "
            f"nba:__default__; nba values read: median {s['nba_median_bytes']:,.0f} B; "
            f"Redis CPU {100 * s['redis_cpu_share']:.0f}% of the phase"
        )
        if phase == "load":
            wall = s["wall_s"]
            line += (
                f"; meanwhile {s['events_published'] / wall:,.0f} events/s published, the worker "
                f"consumed {s['worker_consumed'] / wall:,.0f} events/s in "
                f"{s['worker_batches']:,} batches and made {s['worker_decisions_made']:,} "
                f"decisions; backlog {s['backlog_at_start']:,} events at the start, "
                f"{s['backlog_at_end']:,} at the end"
            )
        console.print(line)
        if phase == "load" and s["backlog_at_end"] > s["backlog_at_start"] + 1000:
            console.print(
                "[yellow]the worker did not keep up with the traffic (its backlog grew): it was "
                "busy all the time, so the load was what it can do here, not --rate[/yellow]"
            )
    if "idle" in result["phases"]:
        load, idle = result["phases"]["load"]["bare"], result["phases"]["idle"]["bare"]
        console.print(
            "bare GET, load / idle: "
            + ", ".join(f"{k} {load[k] / idle[k]:.2f}" for k in ("p50", "p99", "p999", "max"))
        )
    write_json(out, result, console, orjson.OPT_SERIALIZE_NUMPY)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = measure(args)
    report(result, args.out)


if __name__ == "__main__":
    main()
