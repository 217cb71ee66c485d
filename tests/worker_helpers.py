"""Helpers shared by the integration tests that run a real worker process."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable

import redis

from loopwise.config import Settings


def stats(r: redis.Redis, s: Settings) -> Counter[str]:
    """The worker's counters (``stats`` hash) as ints."""
    return Counter({k.decode(): int(v) for k, v in r.hgetall(s.key("stats")).items()})


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    worker: subprocess.Popen[bytes] | None = None,
    poll_s: float = 0.2,
) -> None:
    """Poll ``predicate`` until true; fail on timeout or, when given, if ``worker`` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if worker is not None:
            assert worker.poll() is None, (
                f"worker exited with {worker.returncode} while waiting for {what}"
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)
