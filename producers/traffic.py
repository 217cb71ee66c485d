"""Publish simulator traffic to Kafka at a chosen rate, with a progress bar."""

from __future__ import annotations

import time

from loopwise.config import Settings
from loopwise.producers.sdk import EventPublisher
from loopwise.producers.simulator import Marketplace
from loopwise.progress import progress_bar


class RateLimiter:
    """Paces a loop at ``rate`` per second (token bucket, bursts of up to 0.1 s of tokens)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._count = 0

    def wait(self) -> None:
        self._count += 1
        if self.rate is None:
            return
        due = self._start + self._count / self.rate
        delay = due - time.monotonic()
        if delay > 0.1:
            time.sleep(delay)


def publish_traffic(
    settings: Settings,
    market: Marketplace,
    n_events: int,
    *,
    rate: float | None = None,
    catalog: bool = True,
    progress: bool = True,
) -> int:
    """Publish the catalog (optional) then ``n_events`` of organic traffic; the number sent."""
    sent = 0
    with (
        EventPublisher.from_settings(settings) as publisher,
        progress_bar("[bold]simulate", "{task.fields[rate]:>8.0f} ev/s", enabled=progress) as bar,
    ):
        if catalog:
            for event in market.catalog_events():
                publisher.send(event)
                sent += 1
            publisher.flush()
        task = bar.add_task("simulate", total=n_events, rate=0.0)
        limiter = RateLimiter(rate)
        started = time.monotonic()
        for i, event in enumerate(market.events(n_events), start=1):
            limiter.wait()
            publisher.send(event)
            if i % 500 == 0 or i == n_events:
                bar.update(task, completed=i, rate=i / max(time.monotonic() - started, 1e-9))
        sent += n_events
    return sent
