"""The local Kafka broker and Redis server: they answer real clients, restart idempotently, and
leave no process behind when brought down."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from loopwise.config.settings import Settings
from loopwise.infra import InfraError, KafkaBroker, LocalInfra, RedisServer, free_port
from loopwise.infra.kafka_broker import port_open

pytestmark = pytest.mark.integration


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text``: catches anything a test left behind."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


def test_kafka_python_produces_and_consumes_through_a_group(
    infra: LocalInfra, isolated_settings: Settings
) -> None:
    topic = isolated_settings.events_topic
    admin = KafkaAdminClient(bootstrap_servers=infra.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()

    producer = KafkaProducer(bootstrap_servers=infra.bootstrap_servers)
    try:
        producer.send(topic, key=b"user-1", value=b"hello").get(timeout=30)
    finally:
        producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=infra.bootstrap_servers,
        group_id=isolated_settings.app_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=30_000,
    )
    try:
        message = next(iter(consumer))
        consumer.commit()
    finally:
        consumer.close()
    assert (message.key, message.value) == (b"user-1", b"hello")


def test_aiokafka_produces_and_consumes_on_an_auto_created_topic(
    infra: LocalInfra, isolated_settings: Settings
) -> None:
    topic = isolated_settings.propensity_log_topic

    async def round_trip() -> tuple[bytes | None, bytes | None]:
        producer = AIOKafkaProducer(bootstrap_servers=infra.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(topic, key=b"user-2", value=b"world")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=infra.bootstrap_servers,
            group_id=isolated_settings.app_id,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            message = await asyncio.wait_for(consumer.getone(), timeout=30)
            await consumer.commit()
        finally:
            await consumer.stop()
        return message.key, message.value

    assert asyncio.run(round_trip()) == (b"user-2", b"world")


def test_redis_sets_and_gets(infra: LocalInfra, isolated_settings: Settings) -> None:
    client = redis.Redis.from_url(infra.redis_url)
    try:
        key = isolated_settings.key("probe")
        client.set(key, b"42")
        assert client.get(key) == b"42"
    finally:
        client.close()


def test_starting_again_keeps_the_running_processes(infra: LocalInfra) -> None:
    before = (infra.kafka.pid(), infra.redis.pid())
    assert None not in before
    infra.up()
    infra.kafka.start()
    infra.redis.start()
    assert (infra.kafka.pid(), infra.redis.pid()) == before


def test_status_reports_both_services(infra: LocalInfra) -> None:
    assert infra.status() == {
        "kafka": {"bootstrap_servers": infra.bootstrap_servers, "up": True},
        "redis": {"url": infra.redis_url, "up": True},
    }


def test_down_leaves_no_process_behind(tmp_path: Path) -> None:
    local = LocalInfra.for_tests(tmp_path)
    try:
        local.up()
        pids = [local.kafka.pid(), local.redis.pid()]
        assert None not in pids
        local.down()
        assert [pid for pid in pids if pid is not None and _running(pid)] == []
        assert _processes_mentioning(str(tmp_path)) == []
        assert not port_open("127.0.0.1", local.kafka.port)
        assert not port_open("127.0.0.1", local.redis.port)
        assert local.status()["kafka"]["up"] is False
        assert local.status()["redis"]["up"] is False
        local.down()  # stopping what is stopped is harmless
    finally:
        local.down()


def test_start_refuses_a_port_another_process_listens_on(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(InfraError, match="already in use"):
            RedisServer(port=port, state_dir=tmp_path / "redis").start()
        kafka = KafkaBroker(
            "4.1.1", port=port, controller_port=free_port(), state_dir=tmp_path / "kafka"
        )
        with pytest.raises(InfraError, match="already in use"):
            kafka.start()


def test_a_recycled_pid_in_the_pid_file_is_not_taken_for_ours(tmp_path: Path) -> None:
    server = RedisServer(port=free_port(), state_dir=tmp_path)
    server.pid_file.write_text(f"{os.getpid()}\n")  # alive, but not a redis-server
    assert server.pid() is None
    assert not server.is_up()
    server.stop()  # must not signal the test process itself
    assert not server.pid_file.exists()
