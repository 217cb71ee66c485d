"""``loopwise worker``: run the Faust app until SIGTERM/SIGINT, then stop cleanly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import IO, Any

import faust
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from prometheus_client import start_http_server

from loopwise.config import Settings
from loopwise.streams.app import build_app
from loopwise.streams.topics import ensure_topics

log = logging.getLogger("loopwise.worker")


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


def run_worker(settings: Settings) -> None:
    """Create the topics, then run the worker; returns after a clean shutdown.

    Logging is the caller's (``loopwise.logs.configure_logging``; the ``loopwise worker``
    command sets it up): Faust's worker is told not to set up its own (``override_logging``),
    which would replace the root handler with a colored one at Faust's level, show every
    library's INFO lines, and turn ``print`` into log records (``redirect_stdouts``).
    """
    ensure_topics(settings)
    _wait_for_group_coordinator(settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1")
        log.info("metrics on http://127.0.0.1:%d/metrics", settings.metrics_port)
    app = build_app(settings)
    topics = [settings.events_topic]
    if settings.decisions:
        topics.append(settings.propensity_log_topic)
    worker = _Worker(
        app,
        ready_message=f"worker ready: group {settings.app_id} consuming {', '.join(topics)} "
        f"on {settings.bootstrap_servers}",
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


def _wait_for_group_coordinator(settings: Settings, timeout_s: float = 30) -> None:
    """Return once the broker names a coordinator for the worker's consumer group.

    A fresh broker creates ``__consumer_offsets`` on the first such question and answers
    "not available" until then; Faust's consumer would log that answer as an ERROR on every
    first start. Past ``timeout_s``, or on any other answer, Faust's own retries take over.
    """
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, client_id="loopwise")
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
    settings: Settings, log_level: str | None = None, output: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``loopwise worker`` as a child process on exactly these settings.

    The child gets the settings as ``LOOPWISE_*`` variables (replacing any the parent had),
    so the demo, the tests and the benchmarks run the real worker process, not an in-process
    imitation of it. Its stdout and stderr are the parent's, or both go to ``output``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWISE_")}
    env.update(settings.as_env())
    if log_level is not None:
        env["LOOPWISE_WORKER_LOG_LEVEL"] = log_level
    return subprocess.Popen(
        [sys.executable, "-m", "loopwise.cli", "worker"],
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
