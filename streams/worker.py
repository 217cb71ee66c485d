"""``loopwise worker``: run the Faust app until SIGTERM/SIGINT, then stop cleanly.

Before Faust starts, the worker makes sure Redis still holds the state its consumer group's
committed offsets stand for (:func:`open_epoch`); while it runs, every batch checks the
same. A Redis that lost its data stops it with exit code :data:`DATA_LOST_EXIT` and one
CRITICAL line saying where and how to go on (``loopwise rebuild``, or
``loopwise worker --accept-empty-redis``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

import faust
from kafka.errors import KafkaError
from prometheus_client import start_http_server

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.redis_clients import redis_client
from loopwise.streams.app import build_app
from loopwise.streams.errors import RedisDataLost
from loopwise.streams.rebuild import committed_offsets
from loopwise.streams.redis_store import Epoch, data_lost
from loopwise.streams.topics import ensure_topics

log = logging.getLogger("loopwise.worker")

DATA_LOST_EXIT = 3
"""Exit code of a worker that stopped, or refused to start, because Redis lost its data."""


class _Worker(faust.Worker):
    """Faust's worker, saying in Loopwise's words (one line each) when it is ready and stops."""

    def __init__(self, app: faust.App, *, ready_message: str, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.ready_message = ready_message
        self.spinner = None  # writes cursor codes to stdout even when quiet

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        log.info("%s", self.ready_message)

    def on_worker_shutdown(self) -> None:
        super().on_worker_shutdown()
        log.info("worker stopping")


class _StopOnDataLost:
    """Called by the app when a batch or tick finds Redis without its epoch: says so once
    (CRITICAL), then stops the worker as SIGTERM does, acking nothing more."""

    def __init__(self) -> None:
        self.lost: RedisDataLost | None = None

    def __call__(self, exc: RedisDataLost) -> None:
        if self.lost is not None:
            return
        self.lost = exc
        log.critical("%s", exc)
        signal.raise_signal(signal.SIGTERM)


def open_epoch(settings: Settings, *, accept_empty_redis: bool = False) -> Epoch:
    """The epoch of the state this worker goes on with (``{p}epoch``).

    - Redis holds one: that one (``accept_empty_redis`` changes nothing then).
    - It holds none and the group has no committed offsets on the events topic: a first
      start; a new epoch.
    - None, but committed offsets: Redis lost the state they stand for. With
      ``accept_empty_redis`` a new epoch makes what Redis holds the truth; otherwise
      :class:`RedisDataLost`. (A Redis written by a Loopwise without epochs looks the same:
      its first start needs ``accept_empty_redis`` once.)

    A new epoch is written only where none is (SET NX), so workers of one group starting
    together agree on it.
    """
    key = settings.key("epoch")
    with redis_client(settings) as client:
        raw = client.get(key)
        if raw is None:
            if accept_empty_redis:
                origin = "accept_empty_redis"
            elif committed := committed_offsets(settings):
                raise data_lost(
                    settings,
                    f"it has no epoch key {key}, but the group has committed offsets on "
                    f"{settings.events_topic!r} ({sum(committed.values()):,} messages over "
                    f"{len(committed)} partitions); the worker does not start",
                )
            else:
                origin = "first_start"
            created = Epoch.new(origin)
            if client.set(key, created.to_json(), nx=True):
                if origin == "accept_empty_redis":
                    log.warning(
                        "--accept-empty-redis: new epoch %s; the state Redis holds now "
                        "goes on from the group's committed offsets",
                        created.id,
                    )
                else:
                    log.info("first start of group %s: new epoch %s", settings.app_id, created.id)
                return created
            raw = client.get(key)  # another worker of the group wrote it first
        epoch = Epoch.from_json(raw) if raw is not None else None
        if epoch is None:
            raise data_lost(settings, f"its epoch key {key} holds {raw!r}, not an epoch")
        if accept_empty_redis:
            log.warning("--accept-empty-redis: Redis holds epoch %s; going on with it", epoch.id)
        return epoch


def run_worker(settings: Settings, *, accept_empty_redis: bool = False) -> int:
    """Create the topics, check Redis's epoch, then run the worker; returns its exit code:
    0 after a clean shutdown, :data:`DATA_LOST_EXIT` if Redis lost its data (before the
    start or while running).

    Logging is the caller's (``loopwise.logs.configure_logging``; the ``loopwise worker``
    command sets it up): Faust's worker is told not to set up its own (``override_logging``),
    which would replace the root handler with a colored one at Faust's level, show every
    library's INFO lines, and turn ``print`` into log records (``redirect_stdouts``).
    """
    ensure_topics(settings)
    _wait_for_group_coordinator(settings)
    try:
        epoch = open_epoch(settings, accept_empty_redis=accept_empty_redis)
    except RedisDataLost as exc:
        log.critical("%s", exc)
        return DATA_LOST_EXIT
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1")
        log.info("metrics on http://127.0.0.1:%d/metrics", settings.metrics_port)
    stop_on_data_lost = _StopOnDataLost()
    app = build_app(settings, epoch, stop_on_data_lost)
    learning = (
        f"; learns from {settings.propensity_log_topic} while it holds the learner's lease"
        if settings.decisions
        else ""
    )
    worker = _Worker(
        app,
        ready_message=f"worker ready: group {settings.app_id} consuming {settings.events_topic} "
        f"on {settings.bootstrap_servers}{learning}",
        quiet=True,
        override_logging=False,
        redirect_stdouts=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    log.info("worker stopped")
    return DATA_LOST_EXIT if stop_on_data_lost.lost is not None else 0


def _wait_for_group_coordinator(settings: Settings, timeout_s: float = 30) -> None:
    """Return once the broker names a coordinator for the worker's consumer group.

    A fresh broker creates ``__consumer_offsets`` on the first such question and answers
    "not available" until then; Faust's consumer would log that answer as an ERROR on every
    first start. Past ``timeout_s``, or on any other answer, Faust's own retries take over.
    """
    admin = kafka_clients.admin(settings, client_id="loopwise")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                admin.describe_groups([settings.app_id])
                return
            except KafkaError as exc:
                if not exc.retriable or time.monotonic() > deadline:
                    return
                log.debug("waiting for the group coordinator: %s", exc)
                time.sleep(0.2)
    finally:
        admin.close()


def spawn_worker(
    settings: Settings,
    log_level: str | None = None,
    output: IO[bytes] | None = None,
    args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start ``loopwise worker [args]`` as a child process on exactly these settings.

    The child gets the settings as ``LOOPWISE_*`` variables (replacing any the parent had),
    so the demo, the tests and the benchmarks run the real worker process, not an in-process
    imitation of it. Its stdout and stderr are the parent's, or both go to ``output``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWISE_")}
    env.update(settings.as_env())
    if log_level is not None:
        env["LOOPWISE_WORKER_LOG_LEVEL"] = log_level
    return subprocess.Popen(
        [sys.executable, "-m", "loopwise.cli", "worker", *args],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
    )


def stop_worker(worker: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """SIGTERM, wait for the clean shutdown (SIGKILL after ``timeout_s``); the exit code."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return worker.returncode
