"""Shared fixtures: one real Kafka broker and Redis server for the whole test session.

They run on free ports in a private folder, so a developer's own ``loopwise infra up`` (or a
second test run) is never touched. Missing Java, Maven or redis-server fails the run loudly:
tests that talk to Kafka or Redis are never skipped and never faked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopwise.config.settings import Settings, load_settings
from loopwise.infra import LocalInfra


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    """A started Kafka broker + Redis, stopped at the end of the session even after failures."""
    local = LocalInfra.for_tests(tmp_path_factory.mktemp("infra"))
    try:
        local.up()
        yield local
    finally:
        local.down()


@pytest.fixture(scope="session")
def settings(infra: LocalInfra, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings pointing at the session infra, with a Redis key prefix of this session's own."""
    return load_settings(
        bootstrap_servers=infra.bootstrap_servers,
        redis_url=infra.redis_url,
        kafka_controller_port=infra.kafka.controller_port,
        key_prefix=f"test{uuid.uuid4().hex[:8]}:",
        state_dir=Path(tmp_path_factory.mktemp("state")),
    )


@pytest.fixture
def isolated_settings(settings: Settings) -> Settings:
    """Session settings with topics, consumer group and key prefix no other test uses."""
    suffix = uuid.uuid4().hex[:10]
    return load_settings(
        **{
            **settings.model_dump(),
            "events_topic": f"test.events.{suffix}",
            "deadletter_topic": f"test.deadletter.{suffix}",
            "propensity_log_topic": f"test.propensity-log.{suffix}",
            "app_id": f"test-worker-{suffix}",
            "key_prefix": f"test{suffix}:",
        }
    )
