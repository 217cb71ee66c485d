"""What landed in Redis: the worker's counters, the catalog size, the reward monitor of each
arm and a few user hashes."""

from __future__ import annotations

from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from loopwise.config import Settings
from loopwise.redis_clients import redis_client


def read_summary(settings: Settings, sample: int = 5, max_scan: int = 1_000_000) -> dict[str, Any]:
    """Counters of ``{prefix}stats``, user and catalog counts, and ``sample`` user hashes."""
    client = redis_client(settings, decode_responses=True)
    try:
        stats: dict[str, int] = {}  # on a Redis Cluster: summed over every partition's
        stats_keys = (
            client.scan_iter(match=settings.partition_pattern("stats"), count=1000)
            if settings.redis_cluster
            else [settings.key("stats")]
        )
        for stats_key in stats_keys:
            for k, v in client.hgetall(stats_key).items():
                stats[str(k)] = stats.get(str(k), 0) + int(v)
        users: list[str] = []
        n_users = 0
        for key in client.scan_iter(match=settings.partition_pattern("user", "*"), count=1000):
            n_users += 1
            if len(users) < sample:
                users.append(key)
            if n_users >= max_scan:
                break
        hashes = {}
        for key in users:
            raw = client.hgetall(key)
            hashes[key] = dict(sorted(raw.items()))
        reconciled = stats.get("consumed", 0) == (
            stats.get("accepted", 0) + stats.get("duplicates", 0) + stats.get("deadlettered", 0)
        )
        monitor_raw, invalid_raw, version, offsets = client.hmget(
            settings.key("model"), ["reward_monitor", "invalid_records", "version", "offsets"]
        )
        model = {  # the published snapshot, and whether a worker holds the learner's lease
            "version": int(version or 0),
            "log_records_included": sum(orjson.loads(offsets).values()) if offsets else 0,
            "learner_active": bool(client.exists(settings.key("model", "lease"))),
        }
        return {
            "stats": stats,
            "reconciled": reconciled,
            "reward_monitor": orjson.loads(monitor_raw) if monitor_raw else {},
            "invalid_log_records": orjson.loads(invalid_raw) if invalid_raw else {},
            "model": model,
            "users": n_users,
            "catalog_items": int(client.hlen(settings.key("catalog"))),
            "sample_users": hashes,
        }
    finally:
        client.close()


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    stats = summary["stats"]
    table = Table(title="Worker counters (Redis " + "stats)", show_header=True)
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name in ("consumed", "accepted", "duplicates", "deadlettered", "no_consent", "batches"):
        table.add_row(name, f"{stats.get(name, 0):,}")
    for name in sorted(k for k in stats if k.startswith("deadletter:")):
        table.add_row("  " + name, f"{stats[name]:,}")
    console.print(table)
    verdict = "[green]yes[/green]" if summary["reconciled"] else "[red]NO[/red]"
    console.print(f"accepted + duplicates + dead-lettered = consumed: {verdict}")
    console.print(
        f"users with state: {summary['users']:,}   catalog items: {summary['catalog_items']:,}"
    )
    model = summary.get("model") or {}
    if model.get("version"):
        console.print(
            f"model snapshot: version {model['version']:,}, "
            f"{model['log_records_included']:,} log records (offsets) included; "
            f"a worker learns now: {'yes' if model['learner_active'] else 'no'}"
        )
    monitors = summary.get("reward_monitor") or {}
    if monitors:
        watch = Table(title="Reward rate per arm (learner's ADWIN monitor, since worker start)")
        for column in ("arm", "records", "mean", "recent mean", "window", "drifts"):
            watch.add_column(column, justify="left" if column == "arm" else "right")
        for arm, m in monitors.items():
            watch.add_row(
                arm,
                f"{m['n']:,}",
                f"{m['mean']:.4f}",
                f"{m['recent_mean']:.4f}",
                f"{m['window']:,}",
                str(m["drifts"]),
            )
        console.print(watch)
    invalid = summary.get("invalid_log_records") or {}
    if invalid:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(invalid.items()))
        console.print(f"propensity-log records the learner skipped as invalid: {reasons}")
    for key, fields in summary["sample_users"].items():
        shown = {k: v for k, v in fields.items() if not k.startswith("aff:")}
        affinities = {k[4:]: round(float(v), 2) for k, v in fields.items() if k.startswith("aff:")}
        console.print(f"[bold]{key}[/bold] {shown}")
        if affinities:
            top = sorted(affinities.items(), key=lambda kv: -kv[1])[:3]
            console.print(f"    top affinities: {top}")
