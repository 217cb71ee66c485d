"""``loopwise worker``: run the Faust app until SIGTERM/SIGINT, then stop cleanly."""

from __future__ import annotations

import faust
from prometheus_client import start_http_server

from config import Settings
from streams.app import build_app
from streams.topics import ensure_topics


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
