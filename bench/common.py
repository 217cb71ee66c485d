"""What the benchmarks share: a Kafka broker and Redis of their own, settings on them, and
the JSON they write (not a benchmark itself)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from loopwise.config import Settings, load_settings
from loopwise.infra import LocalInfra
from loopwise.streams.topics import ensure_topics


@contextmanager
def own_infra(prefix: str) -> Iterator[LocalInfra]:
    """A Kafka broker and Redis on free ports, their files in a temporary folder named
    ``prefix...``; both stopped and the folder removed at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        infra = LocalInfra.for_tests(Path(tmp))
        infra.up()
        try:
            yield infra
        finally:
            infra.down()


def bench_settings(infra: LocalInfra, topics: str = "bench", **overrides: Any) -> Settings:
    """Settings on the bench's own infrastructure, with the topics ``{topics}.events``,
    ``{topics}.deadletter`` and ``{topics}.propensity-log`` (created here), and ``overrides``."""
    settings = load_settings(
        bootstrap_servers=infra.bootstrap_servers,
        redis_url=infra.redis_url,
        events_topic=f"{topics}.events",
        deadletter_topic=f"{topics}.deadletter",
        propensity_log_topic=f"{topics}.propensity-log",
        **overrides,
    )
    ensure_topics(settings)
    return settings


def write_json(path: Path, data: Any, console: Console, option: int = 0) -> None:
    """``data`` as indented JSON in ``path`` (its folder made if need be; ``option``: more
    orjson options), and a line on ``console`` saying so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | option))
    console.print(f"written to {path}")
