"""The ``loopwise`` command line. Every subcommand reads the same settings (``config``)."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console

from loopwise.config import ConfigError, Settings, load_settings
from loopwise.logs import LOG_FORMATS, configure_logging

console = Console(stderr=True)
log = logging.getLogger("loopwise.cli")

USER_ERROR_EXIT = 2
BUG_EXIT = 1
BUG_HINT = "this is a bug in Loopwise; rerun with -v for the traceback and report it"


class UserError(Exception):
    """A command cannot run as asked and the user can fix it; the message says how."""


class LoopwiseGroup(click.Group):
    """Errors split by kind: what the user can fix is one line and exit 2; a bug is exit 1.

    User errors are Loopwise's own (:class:`UserError`, ``ConfigError``, ``ExportError``,
    ``ReplayError``, ``TargetError``, ``InfraError``, ...), files that cannot be read or written,
    and a Kafka broker or Redis that cannot be reached (see :func:`user_error_message`).
    Anything else is a bug: a one-line summary and how to get the traceback, or with ``-v``
    the traceback itself. With ``--log-format json`` both are JSON log lines (a bug's with
    its traceback).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints these itself (usage errors: exit 2)
        except Exception as exc:
            obj = ctx.obj if isinstance(ctx.obj, dict) else {}
            ctx.exit(
                report_error(
                    exc,
                    settings=obj.get("settings"),
                    verbosity=obj.get("verbosity", 0),
                    json_lines=obj.get("log_format") == "json",
                    command=ctx.invoked_subcommand,
                )
            )


def report_error(
    exc: Exception,
    *,
    settings: Settings | None,
    verbosity: int,
    json_lines: bool,
    command: str | None = None,
) -> int:
    """Print ``exc`` for a person (or as a JSON log line) and return the exit code."""
    message = user_error_message(exc, settings)
    if message is not None:
        if json_lines:
            log.error(message)
        else:
            click.echo(f"{click.style('error:', fg='red')} {message}", err=True)
        return USER_ERROR_EXIT
    summary = f"unexpected {_one_line(exc)}{_where(exc)}"
    if json_lines:
        log.error("%s; this is a bug in Loopwise, please report it", summary, exc_info=exc)
    elif verbosity:
        click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)
        click.echo(
            f"{click.style('error:', fg='red')} {summary}\n"
            "this is a bug in Loopwise; please report it with the traceback above",
            err=True,
        )
    else:
        rerun = f" (loopwise -v {command} ...)" if command else ""
        click.echo(f"{click.style('error:', fg='red')} {summary}\n{BUG_HINT}{rerun}", err=True)
    return BUG_EXIT


def user_error_message(exc: BaseException, settings: Settings | None) -> str | None:
    """The line that tells the user what to fix, or None when ``exc`` is a bug of Loopwise's."""
    import aiokafka.errors
    import kafka.errors
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from loopwise.export import ExportError
    from loopwise.infra import InfraError
    from loopwise.learners.arms import ArmConfigError
    from loopwise.learners.policy import SnapshotError
    from loopwise.learners.targets import TargetError
    from loopwise.redis_clients import redis_error_message
    from loopwise.replay import ReplayError
    from loopwise.streams.redis_store import url_without_password

    if isinstance(exc, ConfigError) and str(exc).count("\n") == 1:
        return str(exc).replace(":\n  ", ": ")  # one setting: one line
    ours = (UserError, ConfigError, ExportError, ReplayError, TargetError, ArmConfigError)
    if isinstance(exc, (*ours, SnapshotError)):
        return str(exc)
    if isinstance(exc, InfraError):
        return f"local infrastructure: {_text(exc)}"
    if isinstance(exc, SettingsError):  # pydantic-settings could not parse a LOOPWISE_* value
        name = match[1] if (match := re.search(r'field "(\w+)"', str(exc))) else "?"
        env = f"LOOPWISE_{name.upper()}"
        value = os.environ.get(env) if "password" not in name else None
        shown = f" = {value!r}" if value is not None else ""
        return (
            f"invalid configuration: setting '{name}' ({env}){shown}: "
            f"not valid JSON ({_text(exc.__cause__ or exc)})"
        )
    if isinstance(exc, ValidationError) and exc.title == "Settings":
        return "invalid configuration: " + "; ".join(
            f"setting '{'.'.join(map(str, e['loc']))}' "
            f"(LOOPWISE_{str(e['loc'][0]).upper() if e['loc'] else '?'}): {e['msg']}"
            for e in exc.errors()
        )

    kafka_at = (
        f"the Kafka broker at {settings.bootstrap_servers}"
        if settings is not None
        else "the Kafka broker"
    )
    kafka_setting = "setting bootstrap_servers, LOOPWISE_BOOTSTRAP_SERVERS"
    unreachable_kafka = (
        kafka.errors.KafkaConnectionError,
        kafka.errors.KafkaTimeoutError,
        kafka.errors.NodeNotReadyError,
        kafka.errors.BrokerNotAvailableError,
        aiokafka.errors.KafkaConnectionError,
        aiokafka.errors.KafkaTimeoutError,
        aiokafka.errors.NoBrokersAvailable,
        aiokafka.errors.NodeNotReadyError,
        aiokafka.errors.BrokerNotAvailableError,
    )
    refused_kafka = (
        kafka.errors.AuthorizationError,
        kafka.errors.SaslAuthenticationFailedError,
        aiokafka.errors.AuthenticationFailedError,
    )
    if isinstance(exc, unreachable_kafka):
        return (
            f"cannot reach {kafka_at} ({kafka_setting}): {_text(exc)}; "
            "is it running? `loopwise infra up` starts a local one"
        )
    if isinstance(exc, refused_kafka):
        return f"{kafka_at} refused access ({kafka_setting}): {_text(exc)}"

    redis_at = (
        f"Redis at {url_without_password(settings.redis_url)}" if settings is not None else "Redis"
    )
    if (refused_redis := redis_error_message(exc, settings)) is not None:
        return refused_redis  # names the settings (user, password, TLS, URL) to look at

    if isinstance(exc, ConnectionError):  # a socket of ours or a library's, address unknown
        where = (
            f" ({kafka_at}, {redis_at}: settings bootstrap_servers, redis_url)"
            if settings is not None
            else ""
        )
        return f"cannot connect{where}: {_text(exc)}"
    if isinstance(exc, OSError):  # files and disks: missing, not allowed, full, ...
        if exc.filename is not None and exc.strerror:
            paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
            return f"{paths}: {exc.strerror}"
        return _text(exc)
    return None


def _text(exc: BaseException) -> str:
    return str(exc).rstrip(".") or type(exc).__name__


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: BaseException) -> str:
    """`` (at streams/app.py:120 in build_app)``: the innermost frame in Loopwise's code."""
    import importlib.util

    roots = []
    for name in ("loopwise", *(f"loopwise.{p}" for p in ("config", "streams", "learners"))):
        spec = importlib.util.find_spec(name)
        roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename)
        for root in roots:
            if path.is_relative_to(root):
                return f" (at {root.name}/{path.relative_to(root)}:{frame.lineno} in {frame.name})"
    return ""


def _settings(ctx: click.Context) -> Settings:
    obj = ctx.find_root().obj
    settings = obj.get("settings")
    if settings is None:
        # --log-format / LOOPWISE_LOG_FORMAT win over the config file, and children (the demo's
        # worker) inherit the format with the settings.
        overrides = {"log_format": obj["log_format"]} if obj["log_format_given"] else {}
        settings = obj["settings"] = load_settings(obj.get("config"), **overrides)
        if settings.log_format != obj["log_format"]:  # set by the config file
            obj["log_format"] = settings.log_format
            _configure_logging(ctx)
    return settings


def _configure_logging(ctx: click.Context, level: str = "info") -> None:
    obj = ctx.find_root().obj
    configure_logging(obj["verbosity"], obj["log_format"], level)


@click.group(cls=LoopwiseGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (also LOOPWISE_CONFIG); environment variables LOOPWISE_* override it.",
)
@click.option(
    "-v",
    "--verbose",
    "verbosity",
    count=True,
    help="Log more: Loopwise at DEBUG and the libraries (Faust, Kafka clients) at INFO; "
    "-vv: everything at DEBUG. A bug prints its traceback.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    envvar="LOOPWISE_LOG_FORMAT",
    default=None,
    help="Log lines on stderr as text (default) or json: one JSON object per line "
    "(time, level, logger, message, exc_info), for log collectors. Also LOOPWISE_LOG_FORMAT.",
)
@click.version_option(package_name="loopwise")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbosity: int, log_format: str | None) -> None:
    """Loopwise: a streaming online-learning event processor.

    Events published to Kafka are validated, dead-lettered when bad, and folded
    into fresh per-user state in Redis by a Faust worker.

    Logs: Loopwise's own lines at INFO, other libraries' warnings; -v for more.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(
        config=config,
        verbosity=verbosity,
        log_format=log_format or "text",
        log_format_given=log_format is not None,
    )
    _configure_logging(ctx)


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
@click.option("--json", "as_json", is_flag=True, help="Print the docs/contracts.md status object.")
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
@click.option(
    "--accept-empty-redis",
    is_flag=True,
    help="Start even though Redis lost its data (no epoch while the consumer group has "
    "committed offsets): go on from the offsets with the state Redis holds now, and write a "
    "new epoch. Without it the worker refuses; `loopwise rebuild` is the other way out. "
    "Also for the first start on a Redis written by a Loopwise without epochs.",
)
@click.pass_context
def worker(ctx: click.Context, accept_empty_redis: bool) -> None:
    """Run the Faust worker until SIGTERM/SIGINT (then it stops cleanly).

    Logs Loopwise's lines at worker_log_level (LOOPWISE_WORKER_LOG_LEVEL, default info) and
    Faust's and the Kafka clients' warnings; -v shows theirs too. Exit code 3: Redis lost
    its data (at the start, or while running: then the worker stops without acking).
    """
    from loopwise.streams.worker import run_worker

    settings = _settings(ctx)
    _configure_logging(ctx, level=settings.worker_log_level)
    code = run_worker(settings, accept_empty_redis=accept_empty_redis)
    if code:
        sys.exit(code)


@main.command()
@click.option(
    "--force",
    is_flag=True,
    help="Rebuild even though Redis holds an epoch (did not lose its data): its user state, "
    "catalog, dedup sets and counters are replaced; the learning loop's keys stay.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def rebuild(ctx: click.Context, force: bool, as_json: bool, progress: bool) -> None:
    """Recompute Redis's user state from the events topic after Redis lost its data.

    Reads every events partition from its earliest retained offset up to the worker group's
    committed offset (where the worker resumes), through the worker's own pipeline, into
    Redis: user hashes, catalog, dedup sets, counters. Dead letters are counted, not sent
    again. Then writes a new epoch; start the worker as usual. Stop the worker first.

    Not rebuilt: the learning loop's open decisions, outbox, model snapshot (policies start
    untrained). A full rebuild needs the events topic to keep everything
    (retention.ms=-1); with less, the summary says how many messages were gone.
    """
    from loopwise.streams.rebuild import RebuildError, describe
    from loopwise.streams.rebuild import rebuild as run_rebuild

    try:
        report = run_rebuild(_settings(ctx), force=force, progress=progress, console=console)
    except RebuildError as exc:
        raise UserError(str(exc)) from exc
    if as_json:
        click.echo(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        for line in describe(report):
            console.print(line, highlight=False, markup=False, soft_wrap=True)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def publish(ctx: click.Context, file: Path, progress: bool) -> None:
    """Validate the events of FILE (JSON Lines) and publish the valid ones.

    Invalid lines are not sent; they are counted and the first ones listed with
    their line number. Exit code 1 if any line was refused.
    """
    from loopwise.producers.publish import publish_jsonl
    from loopwise.producers.sdk import EventPublisher

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
@click.option(
    "--closed-loop",
    is_flag=True,
    help="Play the serving layer: show nba:{user_id}, publish the view with its decision_id, "
    "draw clicks/purchases from the ground truth (needs a running worker).",
)
@click.option(
    "--decisions",
    "n_decisions",
    type=click.IntRange(min=1),
    default=20_000,
    show_default=True,
    help="With --closed-loop: how many decisions to show.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("closed-loop.jsonl"),
    show_default=True,
    help="With --closed-loop: one line per shown decision with the ground truth, for `report`.",
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
    closed_loop: bool,
    n_decisions: int,
    out: Path,
    progress: bool,
) -> None:
    """Publish synthetic marketplace traffic (hidden ground truth, see producers/simulator.py).

    Organic traffic by default; with --closed-loop, the simulator shows the
    worker's next-best-actions and reacts to them (rate: decisions per second,
    default 2000).
    """
    import time
    import uuid

    from loopwise.producers.simulator import MarketConfig, Marketplace
    from loopwise.producers.traffic import publish_traffic

    tag = run_tag if run_tag is not None else uuid.uuid4().hex[:8]
    # Simulated time runs faster than the wall clock and the worker refuses events dated in
    # its future: the run's history is placed so that it ends now.
    now_ms = int(time.time() * 1000)
    config = MarketConfig(n_users=users, n_items=items, seed=seed, run_tag=tag)
    market = Marketplace(config.ending_by(now_ms, n_decisions if closed_loop else n_events))
    if closed_loop:
        from loopwise.producers.closed_loop import run_closed_loop

        result = run_closed_loop(
            _settings(ctx),
            market,
            n_decisions,
            out,
            rate=rate or 2000.0,
            seed=seed,
            progress=progress,
        )
        console.print(
            f"showed {result.decisions:,} decisions ({result.default_views:,} default views, "
            f"{result.stale_skips:,} stale nba skipped); written to {out}"
        )
        return
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


BENCHMARKS: dict[str, str] = {
    "worker": "events/s through the worker vs the raw-consumption ceiling",
    "freshness": "click -> nba:{user} latency under load vs Kafka delivery",
    "ope": "replay records/s on a 1M-record log vs a per-record loop",
    "policies": "offline learning of the policies on the simulator",
    "fuzz": "1M hostile messages through the worker, every count reconciled",
    "soak": "worker RSS and Redis memory under 10 min of steady traffic: levels off or not",
    "faults": "worker SIGKILLs, broker and Redis kill -9, poison input: what was lost",
    "profile": "the worker under py-spy: CPU µs per event, stage by stage",
    "serving": "GET nba:{user} p50/p99/p999 under the worker's load vs a bare GET of its size",
    "learner": "the learner's examples/s vs VW's own C++ driver on the same logged examples",
    "scale": "events/s with 1, 2, 3 workers on 6 partitions; snapshot -> every worker's decisions",
}
"""The modules ``bench/bench_{name}.py`` of the source checkout, with what each measures."""


class BenchCommand(click.Command):
    """Everything after the benchmark's name is the benchmark's own, ``--help`` included.

    Click would answer ``loopwise bench worker --help`` itself, with this command's help;
    here it reaches the benchmark's argparse, which prints its options.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in BENCHMARKS:
            super().parse_args(ctx, args[:1])
            ctx.args = list(args[1:])
            return ctx.args
        return super().parse_args(ctx, args)


@main.command(
    cls=BenchCommand,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    help="Run a benchmark of bench/ (a source checkout); the ARGS go to it.\n\n\b\n"
    + "\n".join(f"{name:10} {what}" for name, what in BENCHMARKS.items())
    + "\n\nThose that need Kafka and Redis start their own on free ports. "
    "`loopwise bench NAME --help` shows a benchmark's options.",
)
@click.argument("name", type=click.Choice(list(BENCHMARKS)), metavar="NAME")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[ARGS]...")
@click.pass_context
def bench(ctx: click.Context, name: str, args: tuple[str, ...]) -> None:
    import runpy

    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "bench" / f"bench_{name}.py").is_file():
        raise UserError(
            f"bench/bench_{name}.py is not next to this installation ({checkout}): the "
            "benchmarks live in the source checkout; clone it, `make install`, run them there"
        )
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))  # bench/ is not installed (one namespace: loopwise)
    sys.argv = [f"bench_{name}", *args, *ctx.args]  # argv[0]: runpy sets the file name
    sys.modules.pop(f"bench.bench_{name}", None)  # imported already (by a test): run it afresh
    runpy.run_module(f"bench.bench_{name}", run_name="__main__", alter_sys=True)


@main.command()
@click.argument("user_id")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the worker to apply the forget (0: do not wait).",
)
@click.pass_context
def forget(ctx: click.Context, user_id: str, wait_s: float) -> None:
    """Erase everything Loopwise holds about USER_ID.

    Publishes a `forget` event keyed like the user's events, so the worker applies it in
    order after everything sent before: it deletes the user's state, next-best-action and
    latest decision, drops their open decisions (never logged), and keeps a tombstone (a
    hash of the id) so that an older event of the user, replayed or late, re-creates
    nothing. Then the user's remaining stored decisions are deleted. What remains, and
    why, is in the README ("Forgetting a user").
    """
    import asyncio
    import time

    from loopwise.producers.sdk import EventPublisher
    from loopwise.streams.redis_store import RedisStore

    settings = _settings(ctx)
    with EventPublisher.from_settings(settings) as publisher:
        publisher.forget(user_id)
    stored_id = settings.pseudonym(user_id)  # the id itself without pseudonym_key

    async def run() -> tuple[bool, int]:
        store = RedisStore.connect(settings)
        try:
            deadline = time.monotonic() + wait_s
            applied = await store.forgotten_at(stored_id) is not None
            while not applied and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                applied = await store.forgotten_at(stored_id) is not None
            return applied, await store.erase_decisions(stored_id) if applied else 0
        finally:
            await store.close()

    applied, decisions = asyncio.run(run())
    if applied:
        console.print(
            f"forgot {user_id}: state, next-best-action and open decisions erased by the "
            f"worker; {decisions} stored decisions deleted; tombstone kept"
        )
    else:
        console.print(
            f"forget of {user_id} published to {settings.events_topic}; the worker has not "
            f"applied it within {wait_s:g} s (is it running?): it will when it consumes it"
        )


@main.command()
@click.argument("user_ids", nargs=-1, required=True, metavar="USER_ID...")
@click.pass_context
def pseudonym(ctx: click.Context, user_ids: tuple[str, ...]) -> None:
    """Print the id Loopwise stores for each USER_ID (as in `nba:{id}`).

    With `LOOPWISE_PSEUDONYM_KEY` set: `p-` and the first 32 hex digits of
    HMAC-SHA256(key, id), which a serving layer computes the same way to read
    `nba:{pseudonym}`; without it, the id itself.
    """
    settings = _settings(ctx)
    if settings.pseudonym_key is None:
        console.print(
            "[yellow]pseudonymization is off (LOOPWISE_PSEUDONYM_KEY is not set): ids are "
            "stored as they are",
            highlight=False,
        )
    for user_id in user_ids:
        click.echo(f"{user_id}\t{settings.pseudonym(user_id)}")


@main.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="FILE.jsonl or FILE.parquet.",
)
@click.option("--from", "start", default=None, help="Logged at or after TIME (ms or ISO 8601).")
@click.option("--to", "end", default=None, help="Logged before TIME (ms or ISO 8601).")
@click.option("--start-offset", type=click.IntRange(min=0), default=None)
@click.option("--end-offset", type=click.IntRange(min=0), default=None, help="Exclusive.")
@click.option("--partition", "partitions", type=int, multiple=True, help="Only these partitions.")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
@click.option("--progress/--no-progress", default=True)
@click.pass_context
def export(
    ctx: click.Context,
    out: Path,
    start: str | None,
    end: str | None,
    start_offset: int | None,
    end_offset: int | None,
    partitions: tuple[int, ...],
    as_json: bool,
    progress: bool,
) -> None:
    """Write propensity-log records (all by default) to JSONL or Parquet.

    Time ranges are by the time a record was logged (its decision closed);
    ranges are half-open, [from, to).
    """
    from loopwise.export import LogRange, export_log

    report = export_log(
        _settings(ctx),
        out,
        LogRange.parse(start, end, start_offset, end_offset, partitions),
        progress=progress,
        console=console,
    )
    if as_json:
        click.echo(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        console.print(
            f"wrote {report.records_written:,} records to {out}"
            + (
                f"; skipped {report.records_skipped:,} {report.skipped}"
                if report.records_skipped
                else ""
            )
        )


@main.command()
@click.argument("logs", nargs=-1, required=True)
@click.option(
    "--target",
    "targets",
    multiple=True,
    required=True,
    help="A candidate policy: uniform, logged, pmf:FILE, snapshot:FILE, "
    "vw:ARGS (e.g. 'vw:--cb_explore_adf --squarecb'), linucb[:alpha=...]. Repeatable.",
)
@click.option(
    "--estimator",
    "estimators",
    multiple=True,
    help="ips, clipped_ips, snips, dm, dr, sndr, switch_dr (default: all). Repeatable.",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Bootstrap replicates of the intervals (one draw shared by every candidate).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="1 - confidence of the intervals.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--folds",
    type=click.IntRange(min=2),
    default=2,
    show_default=True,
    help="Cross-fitting folds of the DM/DR reward model.",
)
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=1_000,
    show_default=True,
    help="Records held in memory at a time (validated and scored together).",
)
@click.option("--json", "as_json", is_flag=True, help="docs/contracts.md's JSON on stdout.")
@click.option(
    "--from", "start", default=None, help="kafka: logged at or after TIME (ms or ISO 8601)."
)
@click.option("--to", "end", default=None, help="kafka: logged before TIME (ms or ISO 8601).")
@click.option("--start-offset", type=click.IntRange(min=0), default=None, help="kafka: from.")
@click.option("--end-offset", type=click.IntRange(min=0), default=None, help="kafka: exclusive.")
@click.option("--partition", "partitions", type=int, multiple=True, help="kafka: only these.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write an HTML page with plots (estimates, weights, cumulative) into DIR.",
)
@click.option("--progress/--no-progress", default=True)
@click.pass_context
def replay(
    ctx: click.Context,
    logs: tuple[str, ...],
    targets: tuple[str, ...],
    estimators: tuple[str, ...],
    bootstrap: int,
    alpha: float,
    seed: int,
    folds: int,
    chunk: int,
    as_json: bool,
    start: str | None,
    end: str | None,
    start_offset: int | None,
    end_offset: int | None,
    partitions: tuple[int, ...],
    report_dir: Path | None,
    progress: bool,
) -> None:
    """Estimate how candidate policies would have done, from the propensity log alone.

    LOGS are exported files (.jsonl / .parquet from `loopwise export`) or
    `kafka:` for the topic (a range with --from/--to or the offsets). Unreadable
    lines and invalid records (a missing or invalid propensity, one that is not
    pmf[chosen], ...) are counted under `excluded`, never used.

    \b
    Example:
      loopwise replay log.parquet --target logged --target uniform \\
        --target 'vw:--cb_explore_adf --squarecb' --report replay-report/
    """
    from loopwise.export import LogRange
    from loopwise.replay import DEFAULT_ESTIMATORS, print_table, replay_details

    kafka_range = LogRange.parse(start, end, start_offset, end_offset, partitions)
    result, details = replay_details(
        list(logs),
        list(targets),
        _settings(ctx),
        estimators=list(estimators) or list(DEFAULT_ESTIMATORS),
        chunk=chunk,
        n_bootstrap=bootstrap,
        alpha=alpha,
        seed=seed,
        folds=folds,
        progress=progress,
        console=console,
        keep_rounds=report_dir is not None,
        kafka_range=kafka_range,
    )
    if as_json:
        click.echo(orjson.dumps(result).decode())
    else:
        print_table(result, Console())
    if report_dir is not None and details is not None:
        from loopwise.replay_report import write_report

        page = write_report(result, details, report_dir, logs=list(logs))
        console.print(f"report: {page}")


@main.command()
@click.argument("decisions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--holdout", default="popularity", show_default=True, help="The holdout arm.")
@click.option("--last", type=click.IntRange(min=1), default=None, help="Also over the last N.")
@click.option("--window", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a plot of reward rate over time per arm.",
)
@click.option("--json", "as_json", is_flag=True)
def report(
    decisions: Path, holdout: str, last: int | None, window: int, png: Path | None, as_json: bool
) -> None:
    """Per-arm reward rates, lift over the holdout (95% CI), oracle and uniform references.

    DECISIONS is the file written by `loopwise simulate --closed-loop --out`.
    """
    from loopwise.report import build_report, plot_report, print_report

    try:
        result = build_report(decisions, holdout=holdout, last=last, window=window)
    except ValueError as exc:  # report.py says so when DECISIONS holds no usable decision
        raise UserError(str(exc)) from exc
    if as_json:
        click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print_report(result, Console())
    if png is not None:
        plot_report(decisions, png, window, holdout=holdout)
        console.print(f"plot written to {png}")


@main.command()
@click.option("--events", "n_events", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--keep-infra", is_flag=True, help="Leave Kafka and Redis running afterwards.")
@click.option(
    "--decisions",
    "n_decisions",
    type=click.IntRange(min=100),
    default=20_000,
    show_default=True,
    help="Closed-loop decisions after the organic traffic.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Where the decisions file and the learning-curve PNG go.",
)
@click.pass_context
def demo(
    ctx: click.Context, n_events: int, keep_infra: bool, n_decisions: int, out_dir: Path
) -> None:
    """The main job end to end: infra up, worker, simulator, summary of what landed in Redis."""
    from loopwise.demo import run_demo

    sys.exit(
        run_demo(
            _settings(ctx),
            n_events,
            keep_infra=keep_infra,
            n_decisions=n_decisions,
            out_dir=out_dir,
        )
    )


if __name__ == "__main__":
    main()
