"""The ``loopwise`` command line. Every subcommand reads the same settings (``config``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console

from config import ConfigError, Settings, load_settings

console = Console(stderr=True)


class LoopwiseGroup(click.Group):
    """Turns the errors a user can fix into one clear line and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from loopwise.infra import InfraError

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            console.print(f"[red]error:[/red] {exc}")
            sys.exit(2)
        except InfraError as exc:
            console.print(f"[red]infrastructure error:[/red] {exc}")
            sys.exit(1)


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.obj.get("settings")
    if settings is None:
        settings = ctx.obj["settings"] = load_settings(ctx.obj.get("config"))
    return settings


@click.group(cls=LoopwiseGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (also LOOPWISE_CONFIG); environment variables LOOPWISE_* override it.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.version_option(package_name="loopwise")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: bool) -> None:
    """Loopwise: a streaming online-learning event processor.

    Events published to Kafka are validated, dead-lettered when bad, and folded
    into fresh per-user state in Redis by a Faust worker.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # the Kafka clients narrate every connection at INFO
        for noisy in ("kafka", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


# --- infra -------------------------------------------------------------------------------


@main.group()
def infra() -> None:
    """Start, stop and inspect the local Kafka broker and Redis (no Docker needed)."""


@infra.command("up")
@click.pass_context
def infra_up(ctx: click.Context) -> None:
    """Start Kafka (KRaft, jars from Maven Central) and Redis; harmless if already up."""
    from loopwise.infra import LocalInfra

    settings = _settings(ctx)
    local = LocalInfra.from_settings(settings)
    local.up()
    _print_status(local.status(), as_json=False)


@infra.command("down")
@click.pass_context
def infra_down(ctx: click.Context) -> None:
    """Stop the local Kafka broker and Redis, leaving no process behind."""
    from loopwise.infra import LocalInfra

    local = LocalInfra.from_settings(_settings(ctx))
    local.down()
    _print_status(local.status(), as_json=False)


@infra.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the DESIGN.md status object.")
@click.pass_context
def infra_status(ctx: click.Context, as_json: bool) -> None:
    """Tell whether Kafka and Redis answer; exit 1 if either is down."""
    from loopwise.infra import LocalInfra

    status = LocalInfra.from_settings(_settings(ctx)).status()
    _print_status(status, as_json)
    sys.exit(0 if status["kafka"]["up"] and status["redis"]["up"] else 1)


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(orjson.dumps(status).decode())
        return
    for name, where in (("kafka", "bootstrap_servers"), ("redis", "url")):
        state = "[green]up[/green]" if status[name]["up"] else "[red]down[/red]"
        console.print(f"{name:6} {state}  {status[name][where]}")


# --- worker and producers ------------------------------------------------------------------


@main.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run the Faust worker until SIGTERM/SIGINT (then it stops cleanly)."""
    from streams.worker import run_worker

    run_worker(_settings(ctx))


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def publish(ctx: click.Context, file: Path, progress: bool) -> None:
    """Validate the events of FILE (JSON Lines) and publish the valid ones.

    Invalid lines are not sent; they are counted and the first ones listed with
    their line number. Exit code 1 if any line was refused.
    """
    from producers.publish import publish_jsonl
    from producers.sdk import EventPublisher

    with EventPublisher.from_settings(_settings(ctx)) as publisher:
        report = publish_jsonl(file, publisher, progress=progress)
    console.print(f"published {report.published} events, refused {report.refused} lines")
    for error in report.errors:
        console.print(f"  [yellow]{error}[/yellow]")
    sys.exit(1 if report.refused else 0)


@main.command()
@click.option(
    "--events",
    "n_events",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="How many traffic events to publish.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Events per second (default: as fast as possible).",
)
@click.option("--users", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--items", type=click.IntRange(min=2), default=40, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--catalog/--no-catalog",
    default=True,
    show_default=True,
    help="Publish the item catalog first.",
)
@click.option(
    "--run-tag",
    default=None,
    help="Goes into every event_id, so reruns with one seed are new events "
    "(default: random; give one to replay a run's exact ids).",
)
@click.option("--progress/--no-progress", default=True)
@click.pass_context
def simulate(
    ctx: click.Context,
    n_events: int,
    rate: float | None,
    users: int,
    items: int,
    seed: int,
    catalog: bool,
    run_tag: str | None,
    progress: bool,
) -> None:
    """Publish synthetic marketplace traffic (hidden ground truth, see producers/simulator.py)."""
    import time
    import uuid

    from producers.simulator import MarketConfig, Marketplace
    from producers.traffic import publish_traffic

    tag = run_tag if run_tag is not None else uuid.uuid4().hex[:8]
    now_ms = int(time.time() * 1000)  # event time starts now, ahead of any earlier run's
    market = Marketplace(
        MarketConfig(n_users=users, n_items=items, seed=seed, run_tag=tag, start_ms=now_ms)
    )
    sent = publish_traffic(
        _settings(ctx), market, n_events, rate=rate, catalog=catalog, progress=progress
    )
    console.print(f"published {sent} events ({items} catalog items, {users} users, seed {seed})")


# --- reading what landed -------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--users",
    "sample",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="How many user hashes to show.",
)
@click.pass_context
def stats(ctx: click.Context, as_json: bool, sample: int) -> None:
    """Summarize what the worker has written to Redis: counters and a few users."""
    from loopwise.summary import print_summary, read_summary

    summary = read_summary(_settings(ctx), sample)
    if as_json:
        click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        print_summary(summary)


@main.command()
@click.argument("user_id")
@click.pass_context
def forget(ctx: click.Context, user_id: str) -> None:
    """Erase everything stored about USER_ID (state and next-best-action)."""
    import asyncio

    from streams.redis_store import RedisStore

    async def run() -> int:
        store = RedisStore.connect(_settings(ctx))
        try:
            return await store.forget(user_id)
        finally:
            await store.close()

    removed = asyncio.run(run())
    console.print(f"forgot {user_id}: {removed} keys removed")


@main.command()
@click.option("--events", "n_events", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--keep-infra", is_flag=True, help="Leave Kafka and Redis running afterwards.")
@click.pass_context
def demo(ctx: click.Context, n_events: int, keep_infra: bool) -> None:
    """The main job end to end: infra up, worker, simulator, summary of what landed in Redis."""
    from loopwise.demo import run_demo

    sys.exit(run_demo(_settings(ctx), n_events, keep_infra=keep_infra))


if __name__ == "__main__":
    main()
