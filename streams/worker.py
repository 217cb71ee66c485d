"""``loopwise worker``: run the Faust app until SIGTERM/SIGINT, then stop cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import faust
from prometheus_client import start_http_server

from loopwise.config import Settings
from loopwise.streams.app import build_app
from loopwise.streams.topics import ensure_topics


def run_worker(settings: Settings) -> None:
    """Create the topics, then run the worker; returns after a clean shutdown."""
    ensure_topics(settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1")
    app = build_app(settings)
    worker = faust.Worker(app, loglevel=settings.worker_log_level.upper(), quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def spawn_worker(settings: Settings, log_level: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``loopwise worker`` as a child process on exactly these settings.

    The child gets the settings as ``LOOPWISE_*`` variables (replacing any the parent had),
    so the demo, the tests and the benchmarks run the real worker process, not an in-process
    imitation of it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWISE_")}
    env.update(settings.as_env())
    if log_level is not None:
        env["LOOPWISE_WORKER_LOG_LEVEL"] = log_level
    return subprocess.Popen([sys.executable, "-m", "loopwise.cli", "worker"], env=env)


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
