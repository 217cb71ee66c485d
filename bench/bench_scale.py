"""Measured scale: events/s with 1, 2 and 3 worker processes, and how long a published
model snapshot takes to reach every worker's decisions.

Everything runs on this machine (a real Kafka broker and Redis, started here on free
ports; real ``loopwise worker`` processes). Read the figures with the machine in mind:
**on 2 cores, k worker processes cannot go faster than 2 cores allow**, and the broker,
Redis and this benchmark share those cores with them. A third worker on 2 cores cannot add
throughput (it can only take CPU time from the other two); it is measured anyway, and the
output records the CPU count, the load average and how busy the CPUs were in each run.

1. Throughput. One events topic of 6 partitions is preloaded with ``--events`` simulator
   events (as ``bench_worker`` does). For k = 1, 2, 3 worker processes, in both modes (user
   state only, ``decisions=False``; and the full loop, a VW decision per touched user): a
   fresh consumer group and Redis key prefix (so each run consumes the whole topic from
   its start), k workers started together, and Redis's ``stats`` hash polled every 20 ms.
   ``events/s`` is timed from the first applied batch (``accepted`` > 0) to ``accepted``
   reaching the topic's count (every event once, whichever worker applied it); it includes
   the group's rebalances while the k workers join, which is what a cold start of k
   workers costs. ``middle`` is the rate between 20 % and 80 % of the events, mostly past
   the joins. ``CPU busy`` is the share of both CPUs busy during the run (``/proc/stat``),
   ``k's cores`` the CPU time of the worker processes over the run's time,
   ``Kafka+Redis`` the broker's and Redis's, ``stall`` the longest time without progress
   (a rebalance shows there). The benchmark warns when the CPUs were busy before it
   started anything (another benchmark running beside it depresses every figure).

2. Snapshot propagation. A fresh topic, 3 workers running the full loop, and the
   product's closed loop (``producers/closed_loop.py``: a simulated serving layer that
   reads ``nba:{user}``, shows it, and sends the view and its click) at ``--propagation-rate``
   shown decisions/s for ``--propagation-seconds``, so the propensity log fills, the worker
   holding the learner lease learns and publishes a snapshot every ``snapshot_interval_s``
   and every worker reloads it within ``model_reload_s``. The benchmark polls Redis every
   ``--poll-ms``:

   - the ``model`` hash: a new ``version`` is a publication. Its time is the snapshot's
     own ``saved_at_ms`` (the learner's clock just before it writes the hash); its VW
     example count is read from the ``vw`` field's header.
   - ``nba:{user}`` of every simulated user (200): a new ``decision_id`` is a decision,
     with ``computed_at`` (the deciding worker's clock when it decided; same machine, same
     clock) and ``policy_version`` (``vw/vw/{example count}``; other arms are ignored). A
     user's partition is Kafka's (murmur2 of the user id, as the producer keys events).
   - the consumer group's assignment (which member owns which events partition), every
     second.

   For a published version with VW example count c: a partition has it at the
   ``computed_at`` of the first decision on it made with a count >= c (that version or a
   newer one); a worker has it when the first of its partitions does (a worker loads a
   snapshot once, for all its partitions); **every worker** has it when the last worker
   does. Also reported: when every partition has it. Only versions published once the
   group's assignment no longer changed count (the joins of 3 starting workers move
   partitions), and only those that every partition shows before the end. What this
   leaves out: a decision overwritten within one poll is not seen (the next one is, a
   few ms later: all 200 users are watched, ~50 decisions/s per partition at 300/s). The
   expected bound: ``model_reload_s`` (each worker looks for a newer version on its own
   timer) plus a batch's time plus the wait for the partition's next event.

Results go to ``bench/results/scale.json`` (``--out``); tables on the console.

Run: ``make bench-scale`` or ``.venv/bin/python -m bench.bench_scale --events 100000``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka.partitioner.default import murmur2
from rich.console import Console
from rich.table import Table

from bench.bench_worker import fresh, preload
from bench.common import bench_settings, own_infra, write_json
from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.learners.snapshot import unpack_snapshot
from loopwise.producers.closed_loop import run_closed_loop
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.redis_clients import redis_client
from loopwise.streams.worker import spawn_worker

console = Console(width=None if Console().is_terminal else 110)  # tables unwrapped in logs
RESULTS = Path(__file__).parent / "results"
PARTITIONS = 6
POLL_S = 0.02
RUN_TIMEOUT_S = 300.0

# ----------------------------------------------------------------------- pure helpers


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly between the
    closest ranks (numpy's default); NaN when there are none."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def rates(samples: Sequence[tuple[float, int]], total: int) -> dict[str, float]:
    """From (time s, accepted) samples of one run: ``events_per_s`` from the first sample
    with ``accepted`` > 0 (the first applied batch) to the first with ``accepted`` >=
    ``total``; ``middle_events_per_s`` between the first samples at >= 20 % and >= 80 % of
    ``total``; ``seconds`` the first span; ``longest_stall_s`` the longest time in it
    without progress (a rebalance shows as one; between batches it is a batch's time)."""
    applied = [(t, n) for t, n in samples if n > 0]
    if not applied or applied[-1][1] < total:
        raise ValueError("the samples never reach the total")

    def first_at(count: float) -> tuple[float, int]:
        return next((t, n) for t, n in applied if n >= count)

    (t0, n0), (t1, n1) = applied[0], first_at(total)
    (m0, c0), (m1, c1) = first_at(0.2 * total), first_at(0.8 * total)
    if t1 <= t0 or m1 <= m0:
        raise ValueError("one batch held everything: use more --events")
    stall, last = 0.0, t0
    for (t, n), (_, before) in zip(applied[1:], applied, strict=False):
        if n > before:
            last = t
        else:
            stall = max(stall, t - last)
        if n >= total:
            break
    return {
        "longest_stall_s": stall,
        "events_per_s": (n1 - n0) / (t1 - t0),
        "middle_events_per_s": (c1 - c0) / (m1 - m0),
        "seconds": t1 - t0,
    }


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as the producers use) gives
    ``key``."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def example_count(policy_version: str, arm: str = "vw") -> int | None:
    """The example count of ``{arm}/{policy}/{count}``, None for another arm or shape."""
    parts = policy_version.split("/")
    if len(parts) != 3 or parts[0] != arm or not parts[2].isdigit():
        return None
    return int(parts[2])


@dataclass(frozen=True, slots=True)
class Publication:
    version: int
    count: int  # VW examples the snapshot holds
    published_ms: int  # the snapshot's saved_at_ms


@dataclass(frozen=True, slots=True)
class Seen:
    partition: int
    computed_ms: int
    count: int  # VW examples of the policy that decided


def propagation(
    publications: Iterable[Publication],
    decisions: Iterable[Seen],
    owners: Mapping[str, Iterable[int]],
) -> list[dict[str, Any]]:
    """Per publication (distinct example counts only: a version whose count equals its
    predecessor's cannot be told apart in decisions), the delays in ms from its
    publication to the first decision with its count or more: per partition, per worker
    (``owners``: worker -> its partitions; the first of its partitions) and to ``every
    worker`` (the last worker) and ``every partition``. A publication some partition
    never showed has ``complete`` False and no maxima."""
    by_partition: dict[int, list[tuple[int, int]]] = {}
    for seen in decisions:
        by_partition.setdefault(seen.partition, []).append((seen.computed_ms, seen.count))
    for values in by_partition.values():
        values.sort()
    partitions = sorted({p for ps in owners.values() for p in ps})
    results: list[dict[str, Any]] = []
    previous_count = -1
    for pub in sorted(publications, key=lambda p: p.version):
        if pub.count <= previous_count:
            continue
        previous_count = pub.count
        per_partition: dict[int, int] = {}
        for p in partitions:
            first = next((t for t, c in by_partition.get(p, ()) if c >= pub.count), None)
            if first is not None:
                per_partition[p] = first - pub.published_ms
        per_worker = {
            worker: min(per_partition[p] for p in ps if p in per_partition)
            for worker, ps in owners.items()
            if any(p in per_partition for p in ps)
        }
        complete = len(per_partition) == len(partitions) and len(per_worker) == len(owners)
        results.append(
            {
                "version": pub.version,
                "count": pub.count,
                "published_ms": pub.published_ms,
                "complete": complete,
                "per_partition_ms": per_partition,
                "per_worker_ms": per_worker,
                "every_worker_ms": max(per_worker.values()) if complete else None,
                "every_partition_ms": max(per_partition.values()) if complete else None,
            }
        )
    return results


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "max": max(values) if values else float("nan"),
    }


# ------------------------------------------------------------------- machine figures


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(seconds: float = 2.0) -> float:
    """The share of all CPUs busy over the next ``seconds``."""
    busy0, all0 = cpu_times()
    time.sleep(seconds)
    busy1, all1 = cpu_times()
    return (busy1 - busy0) / max(1, all1 - all0)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc/{pid}/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_all(workers: Sequence[subprocess.Popen[bytes]], timeout_s: float = 60) -> list[int]:
    """SIGTERM every worker at once, then wait for each (SIGKILL past ``timeout_s``)."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        try:
            worker.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return [w.returncode for w in workers]


# ------------------------------------------------------------------------ throughput


def throughput_run(
    base: Settings, total: int, k: int, decisions: bool, infra_pids: Sequence[int] = ()
) -> dict[str, Any]:
    """k workers on a fresh group over the preloaded topic, until every event is applied
    (``infra_pids``: the broker's and Redis's, whose CPU time is measured too)."""
    settings = fresh(base).model_copy(update={"decisions": decisions})
    client = redis_client(settings)
    stats_key = settings.key("stats")
    load_before = os.getloadavg()
    busy0, all0 = cpu_times()
    started = time.perf_counter()
    workers = [spawn_worker(settings, "warning") for _ in range(k)]
    samples: list[tuple[float, int]] = []
    cpu0 = [0.0] * k
    infra0 = [0.0] * len(infra_pids)
    try:
        while True:
            accepted = int(client.hget(stats_key, "accepted") or 0)
            now = time.perf_counter()
            if accepted:
                samples.append((now, accepted))
                if len(samples) == 1:
                    busy0, all0 = cpu_times()
                    cpu0 = [process_cpu_s(w.pid) for w in workers]
                    infra0 = [process_cpu_s(pid) for pid in infra_pids]
            if accepted >= total:
                break
            for worker in workers:
                if worker.poll() is not None:
                    raise RuntimeError(f"a worker exited with {worker.returncode}")
            if now - started > RUN_TIMEOUT_S:
                raise RuntimeError(f"{k} workers did not apply {total:,} events in 300 s")
            time.sleep(POLL_S)
        busy1, all1 = cpu_times()
        cpu1 = [process_cpu_s(w.pid) for w in workers]
        infra1 = [process_cpu_s(pid) for pid in infra_pids]
    finally:
        codes = stop_all(workers)
        client.close()
    result = rates(samples, total)
    return {
        "mode": "full loop" if decisions else "user state",
        "workers": k,
        **result,
        "first_batch_after_start_s": samples[0][0] - started,
        "cpu_busy": (busy1 - busy0) / max(1, all1 - all0),
        "worker_cores": (sum(cpu1) - sum(cpu0)) / result["seconds"],
        "broker_redis_cores": (sum(infra1) - sum(infra0)) / result["seconds"],
        "loadavg_before": load_before,
        "exit_codes": codes,
    }


def throughput(
    base: Settings, total: int, counts: Sequence[int], repeat: int, infra_pids: Sequence[int]
) -> list[dict]:
    runs: list[dict[str, Any]] = []
    for decisions in (False, True):
        for k in counts:
            tries = []
            for i in range(repeat):
                run = throughput_run(base, total, k, decisions, infra_pids)
                console.print(
                    f"  {run['mode']}, {k} worker(s), run {i + 1}/{repeat}: "
                    f"{run['events_per_s']:,.0f} events/s (middle "
                    f"{run['middle_events_per_s']:,.0f}), CPU busy {run['cpu_busy']:.0%}"
                )
                tries.append(run)
            best = sorted(tries, key=lambda r: r["events_per_s"])[len(tries) // 2]  # median
            best = {**best, "runs_events_per_s": [r["events_per_s"] for r in tries]}
            runs.append(best)
    for run in runs:
        one = next(r for r in runs if r["mode"] == run["mode"] and r["workers"] == counts[0])
        run["ratio_to_1"] = run["events_per_s"] / one["events_per_s"]
        run["middle_ratio_to_1"] = run["middle_events_per_s"] / one["middle_events_per_s"]
    return runs


# ----------------------------------------------------------------------- propagation


def group_assignment(admin: Any, settings: Settings) -> dict[str, tuple[int, ...]]:
    """Member id -> the events partitions it owns, from the broker's description of the
    consumer group (``admin``: a kafka-python admin client; empty when it cannot be read)."""
    try:
        described = admin.describe_groups([settings.app_id])
    except Exception as exc:  # the figures fall back to partitions
        logging.getLogger("bench.scale").warning("group description: %s", exc)
        return {}
    group = described.get(settings.app_id) if isinstance(described, dict) else None
    owned: dict[str, tuple[int, ...]] = {}
    for member in (group or {}).get("members", []):
        assignment = member.get("member_assignment") or {}
        partitions: list[int] = []
        for topic in _field(assignment, "assigned_partitions", "assignment", "topics") or []:
            name = _field(topic, "topic", "name")
            if name == settings.events_topic:
                partitions.extend(_field(topic, "partitions") or [])
        owned[str(member.get("member_id"))] = tuple(sorted(int(p) for p in partitions))
    return owned


def _field(obj: Any, *names: str) -> Any:
    """The first of ``names`` that ``obj`` has (as a key, an attribute, or a pair)."""
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and names[0] in ("topic", "name"):
        return obj[0]
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and names[0] == "partitions":
        return obj[1]
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


def vw_examples(blob: Any) -> int:
    """The example count in a VW snapshot's header (0 when there is none)."""
    if not isinstance(blob, bytes) or not blob:
        return 0
    return int(unpack_snapshot(blob)[0]["version"])


def propagation_run(
    infra: Any, workers: int, seconds: float, rate: float, poll_s: float, overrides: dict
) -> dict[str, Any]:
    """``workers`` full-loop workers under the closed loop; what the watcher saw."""
    settings = fresh(
        bench_settings(
            infra,
            topics="scale-loop",
            topic_partitions=PARTITIONS,
            attribution_window_ms=20_000,  # as the scale test: decisions close in ~1 s
            **overrides,
        )
    )
    market = Marketplace(
        MarketConfig(n_users=200, n_items=50, seed=11, run_tag=settings.key_prefix)
    )
    users = list(market.users)
    partition = {u: partition_of(settings.pseudonym(u), PARTITIONS) for u in users}
    nba_keys = [settings.key("nba", settings.pseudonym(u)) for u in users]
    client = redis_client(settings)
    admin = kafka_clients.admin(settings, client_id="bench-scale")
    model_key = settings.key("model")
    publications: list[Publication] = []
    observed_lag_ms: list[int] = []
    seen: list[Seen] = []
    last_value: dict[str, Any] = {}
    assignments: list[tuple[float, dict[str, tuple[int, ...]]]] = []
    errors: list[BaseException] = []
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="loopwise-bench-scale-") as tmp:
        out = Path(tmp) / "shown.jsonl"

        def serve() -> None:
            try:
                n = int(rate * seconds)
                run_closed_loop(settings, market, n, out, rate=rate, seed=11, progress=False)
            except BaseException as exc:  # reported below
                errors.append(exc)

        log_path = Path(tmp) / "workers.log"
        with log_path.open("ab") as log_file:
            procs = [spawn_worker(settings, "warning", output=log_file) for _ in range(workers)]
            serving = threading.Thread(target=serve, daemon=True)
            try:
                serving.start()
                version = 0
                next_assignment = 0.0
                deadline = time.monotonic() + 1.5 * seconds + 60
                while serving.is_alive() and time.monotonic() < deadline:
                    now = time.monotonic()
                    if now >= next_assignment:
                        next_assignment = now + 1.0
                        owned = group_assignment(admin, settings)
                        if owned and (not assignments or assignments[-1][1] != owned):
                            assignments.append((time.time(), owned))
                    raw_version = client.hget(model_key, "version")
                    if raw_version is not None and int(raw_version) > version:
                        seen_ms = int(time.time() * 1000)
                        # one read: the version, its time and its model belong together
                        raw_version, saved, blob = client.hmget(
                            model_key, ["version", "saved_at_ms", "vw"]
                        )
                        version = int(raw_version or version)
                        examples = vw_examples(blob)
                        publications.append(Publication(version, examples, int(saved or seen_ms)))
                        observed_lag_ms.append(seen_ms - int(saved or seen_ms))
                    for user, value in zip(users, client.mget(nba_keys), strict=True):
                        if value is None or last_value.get(user) == value:
                            continue
                        last_value[user] = value
                        body = orjson.loads(value)
                        decided = example_count(body.get("policy_version", ""))
                        if decided is not None:
                            seen.append(Seen(partition[user], int(body["computed_at"]), decided))
                    for proc in procs:
                        if proc.poll() is not None:
                            raise RuntimeError(f"a worker exited with {proc.returncode}")
                    time.sleep(poll_s)
                if errors:
                    raise RuntimeError(f"the closed loop failed: {errors[0]!r}")
                finished = not serving.is_alive()  # else it stops when Redis goes away
            finally:
                codes = stop_all(procs)
                client.close()
                admin.close()
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]

    final = assignments[-1][1] if assignments else {}
    settled_at_ms = int(assignments[-1][0] * 1000) if assignments else 0
    names = {
        member: f"worker {i + 1}" for i, member in enumerate(sorted(final, key=lambda m: final[m]))
    }
    owners = {names[m]: final[m] for m in sorted(final, key=lambda m: names[m]) if final[m]}
    if not owners:  # the group's assignment could not be read: every partition its own
        owners = {f"partition {p}": (p,) for p in range(PARTITIONS)}
    counted = [p for p in publications if p.published_ms >= settled_at_ms]
    rows = propagation(counted, seen, owners)
    complete = [r for r in rows if r["complete"]]
    every_worker = [float(r["every_worker_ms"]) for r in complete]
    every_partition = [float(r["every_partition_ms"]) for r in complete]
    per_worker = {w: summarize([float(r["per_worker_ms"][w]) for r in complete]) for w in owners}
    return {
        "workers": workers,
        "closed_loop_rate": rate,
        "closed_loop_seconds": seconds,
        "closed_loop_finished": finished,
        "poll_ms": poll_s * 1000,
        "snapshot_interval_s": settings.snapshot_interval_s,
        "model_reload_s": settings.model_reload_s,
        "publications": len(publications),
        "publications_before_group_settled": len(publications) - len(counted),
        "versions_measured": len(complete),
        "versions_incomplete": len(rows) - len(complete),
        "decisions_seen": len(seen),
        "assignments_seen": len(assignments),
        "owners": {w: list(ps) for w, ps in owners.items()},
        "publication_seen_after_ms": summarize([float(x) for x in observed_lag_ms]),
        "every_worker_ms": summarize(every_worker),
        "every_partition_ms": summarize(every_partition),
        "per_worker_ms": per_worker,
        "versions": rows,
        "loadavg_before": load_before,
        "exit_codes": codes,
        "worker_log_tail": tail,
    }


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, default=100_000, help="events on the topic (default 100000)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="worker counts to time (default 1 2 3; the first is the ratios' reference)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, median (default 1)")
    parser.add_argument("--batch-size", type=int, default=2000)
    # No option may start with --loop (or be -L): `import faust` reads that from sys.argv.
    parser.add_argument(
        "--propagation-workers", type=int, default=3, help="workers for the propagation (default 3)"
    )
    parser.add_argument(
        "--propagation-seconds",
        type=float,
        default=120.0,
        help="closed-loop duration for the propagation, s (default 120)",
    )
    parser.add_argument(
        "--propagation-rate", type=float, default=300.0, help="shown decisions/s (default 300)"
    )
    parser.add_argument("--poll-ms", type=float, default=20.0, help="watcher's poll (default 20)")
    parser.add_argument(
        "--snapshot-interval",
        type=float,
        default=None,
        help="snapshot_interval_s for the propagation (default: the settings', 5 s)",
    )
    parser.add_argument(
        "--model-reload",
        type=float,
        default=None,
        help="model_reload_s for the propagation (default: the settings', 1 s)",
    )
    parser.add_argument("--skip-throughput", action="store_true", help="propagation only")
    parser.add_argument("--skip-propagation", action="store_true", help="throughput only")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)  # the admin client's slow-task notes
    if args.events < 10_000:
        parser.error("--events must be at least 10000 for a meaningful rate")
    if args.repeat < 1 or min(args.workers) < 1 or args.propagation_workers < 1:
        parser.error("--repeat, --workers and --propagation-workers must be at least 1")

    busy_before = busy_share()
    if busy_before > 0.25:
        console.print(
            f"[bold red]warning:[/] the machine is not quiet: {busy_before:.0%} of the CPUs "
            "were busy before this benchmark started anything; its figures will be depressed"
        )
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "cpu_busy_before_start": busy_before,
        },
        "note": "on 2 cores, k > 2 worker processes cannot scale: they share the 2 cores "
        "with each other, the broker, Redis and this benchmark",
    }
    overrides: dict[str, Any] = {}
    if args.snapshot_interval is not None:
        overrides["snapshot_interval_s"] = args.snapshot_interval
    if args.model_reload is not None:
        overrides["model_reload_s"] = args.model_reload
    with own_infra("loopwise-bench-scale-") as infra:
        if not args.skip_throughput:
            base = bench_settings(
                infra, topics="scale", topic_partitions=PARTITIONS, batch_size=args.batch_size
            )
            n = preload(base, args.events)
            console.print(f"{n:,} events on {PARTITIONS} partitions; timing workers")
            pids = [pid for pid in (infra.kafka.pid(), infra.redis.pid()) if pid is not None]
            runs = throughput(base, n, args.workers, args.repeat, pids)
            result["throughput"] = {
                "events": n,
                "partitions": PARTITIONS,
                "batch_size": args.batch_size,
                "repeat": args.repeat,
                "runs": runs,
            }
            throughput_table(runs, n, args.repeat)
        if not args.skip_propagation:
            console.print(
                f"propagation: {args.propagation_workers} workers, closed loop at "
                f"{args.propagation_rate:.0f}/s for {args.propagation_seconds:.0f} s"
            )
            prop = propagation_run(
                infra,
                args.propagation_workers,
                args.propagation_seconds,
                args.propagation_rate,
                args.poll_ms / 1000,
                overrides,
            )
            result["propagation"] = prop
            propagation_table(prop)
    result["machine"]["loadavg_end"] = os.getloadavg()
    write_json(args.out, result, console, orjson.OPT_NON_STR_KEYS)


def throughput_table(runs: list[dict[str, Any]], n: int, repeat: int) -> None:
    table = Table(
        title=f"{n:,} events on {PARTITIONS} partitions, {os.cpu_count()} CPUs"
        + (f", median of {repeat}" if repeat > 1 else "")
    )
    headers = ("mode", "k", "events/s", "vs k=1", "middle", "vs k=1", "CPU busy")
    for column in (*headers, "k's cores", "Kafka+Redis", "stall s", "load"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for r in runs:
        table.add_row(
            r["mode"],
            str(r["workers"]),
            f"{r['events_per_s']:,.0f}",
            f"{r['ratio_to_1']:.2f}",
            f"{r['middle_events_per_s']:,.0f}",
            f"{r['middle_ratio_to_1']:.2f}",
            f"{r['cpu_busy']:.0%}",
            f"{r['worker_cores']:.2f}",
            f"{r['broker_redis_cores']:.2f}",
            f"{r['longest_stall_s']:.1f}",
            f"{r['loadavg_before'][0]:.2f}",
        )
    console.print(table)
    console.print(
        "k: worker processes; middle: 20-80 % of the events; CPU busy: both CPUs; k's cores: "
        "the workers' CPU time / run time; Kafka+Redis: the broker's and Redis's, likewise; "
        "stall: longest time without progress; load: "
        "1-min load average before the run. On 2 cores a third worker cannot add throughput: "
        "k > 2 is measured anyway."
    )


def propagation_table(prop: dict[str, Any]) -> None:
    table = Table(
        title=f"snapshot publication -> decisions with it ({prop['workers']} workers, "
        f"snapshot every {prop['snapshot_interval_s']:g} s, reload every "
        f"{prop['model_reload_s']:g} s; {prop['versions_measured']} versions)"
    )
    for column in ("until", "versions", "p50 ms", "p90 ms", "max ms"):
        table.add_column(column, justify="left" if column == "until" else "right")

    def row(label: str, s: dict[str, Any]) -> None:
        table.add_row(label, str(s["n"]), f"{s['p50']:.0f}", f"{s['p90']:.0f}", f"{s['max']:.0f}")

    row("every worker decides with it", prop["every_worker_ms"])
    row("every partition has a decision with it", prop["every_partition_ms"])
    for worker, s in prop["per_worker_ms"].items():
        row(f"{worker} {tuple(prop['owners'][worker])}", s)
    row("(publication seen by the watcher)", prop["publication_seen_after_ms"])
    console.print(table)
    console.print(
        f"{prop['publications']} publications, {prop['publications_before_group_settled']} "
        f"before the group's assignment settled, {prop['versions_incomplete']} not seen on "
        f"every partition; {prop['decisions_seen']:,} decisions seen."
    )


if __name__ == "__main__":
    main()
