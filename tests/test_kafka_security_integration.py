"""Loopwise against a broker that wants TLS, a client certificate and a SCRAM login, and a
Redis that wants TLS, an ACL user and a password.

The module starts its own broker (free ports, its own folder) with a SASL_SSL listener: a local
CA and the broker's PKCS12 keystore and truststore made with openssl and keytool, SCRAM users
created by Kafka's own ``StorageTool format --add-scram``, client certificates required. Its
Redis listens for TLS only and knows one ACL user with a password (the ``default`` user off).
Every Loopwise client goes through both: the real worker process (Faust's consumer and
producer, the topic admin, the learner, its Redis store), the SDK publishing a closed loop,
``loopwise export``, ``loopwise replay kafka:`` and ``loopwise stats``; the step-1 pipeline
traffic (good events, redeliveries, malformed messages) gives the pipeline test's exact counts
there too. Then what the broker must refuse: a wrong password, an unknown user, no client
certificate, another CA, a PLAINTEXT client. Neither password is ever in an output.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError as AIOKafkaError
from kafka import KafkaConsumer
from kafka.errors import KafkaError
from test_pipeline_integration import (
    N_DUPLICATES,
    NO_CONSENT_USERS,
    assert_users_match,
    build_traffic,
    committed_lag,
    read_topic,
    reference_state,
)
from worker_helpers import stats, wait_until

from loopwise import kafka_clients
from loopwise.config import Settings, load_settings
from loopwise.infra import LocalInfra
from loopwise.infra.kafka_broker import KafkaBroker
from loopwise.infra.local import free_port
from loopwise.infra.redis_server import RedisServer
from loopwise.producers.closed_loop import run_closed_loop
from loopwise.producers.sdk import EventPublisher
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.redis_clients import redis_client
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

USER = "loopwise"
PASSWORD = "S3cret-" + uuid.uuid4().hex[:12]  # searched for in every output: never printed
OTHER_USER, OTHER_PASSWORD = "analyst", "An4lyst-pw"
WRONG_PASSWORD = "Wr0ng-" + uuid.uuid4().hex[:12]
REDIS_USER = "loopwise-app"
REDIS_PASSWORD = "R3dis-" + uuid.uuid4().hex[:16]  # searched for in every output too


def assert_no_password_in(*outputs: str) -> None:
    for output in outputs:
        assert PASSWORD not in output
        assert REDIS_PASSWORD not in output


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    """A broker whose SASL_SSL listener requires a client certificate, and a TLS-only Redis
    with the ACL user ``REDIS_USER`` and its password (the default user off)."""
    base = tmp_path_factory.mktemp("secured-infra")
    ports: list[int] = []
    while len(ports) < 4:
        port = free_port()
        if port not in ports:
            ports.append(port)
    kafka_port, controller_port, sasl_port, redis_port = ports
    version = (
        os.environ.get("LOOPWISE_KAFKA_VERSION") or Settings.model_fields["kafka_version"].default
    )
    local = LocalInfra(
        KafkaBroker(
            version,
            port=kafka_port,
            controller_port=controller_port,
            state_dir=base / "kafka",
            sasl_ssl_port=sasl_port,
            scram_users={USER: PASSWORD, OTHER_USER: OTHER_PASSWORD},
            require_client_cert=True,
        ),
        RedisServer(
            port=redis_port,
            state_dir=base / "redis",
            username=REDIS_USER,
            password=REDIS_PASSWORD,
            tls=True,
        ),
        redis_clients_ca=base / "redis" / "tls" / "ca.crt",  # generated at its start
    )
    try:
        local.up()
        yield local
    finally:
        local.down()


@pytest.fixture
def s(secured: LocalInfra, tmp_path: Path) -> Settings:
    """Settings on the SASL_SSL listener (SCRAM-SHA-512, CA, client certificate) and the TLS
    Redis (ACL user, password, CA), with topics, group and key prefix of this test's own."""
    broker = secured.kafka
    suffix = uuid.uuid4().hex[:10]
    return load_settings(
        bootstrap_servers=broker.sasl_ssl_bootstrap_servers,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=USER,
        sasl_password=PASSWORD,
        kafka_ssl_cafile=broker.ca_file,
        kafka_ssl_certfile=broker.client_cert_file,
        kafka_ssl_keyfile=broker.client_key_file,
        redis_url=secured.redis_url,
        redis_username=REDIS_USER,
        redis_password=REDIS_PASSWORD,
        redis_ssl_ca_certs=secured.redis.ca_file,
        kafka_controller_port=broker.controller_port,
        state_dir=tmp_path / "state",
        events_topic=f"sec.events.{suffix}",
        deadletter_topic=f"sec.deadletter.{suffix}",
        propensity_log_topic=f"sec.propensity-log.{suffix}",
        app_id=f"sec-worker-{suffix}",
        key_prefix=f"sec{suffix}:",
        # Short windows, frequent snapshots: every decision closes and is learned in the test.
        attribution_window_ms=1_000,
        snapshot_interval_s=1.0,
    )


def with_(s: Settings, **changes: object) -> Settings:
    return load_settings(**{**s.model_dump(), **changes})


def run_cli(s: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``loopwise ARGS`` with exactly these settings in its environment (as the worker gets
    them: ``Settings.as_env``, the passwords included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWISE_")}
    return subprocess.run(
        [sys.executable, "-m", "loopwise.cli", *args],
        env={**env, **s.as_env()},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def open_decisions(r: redis.Redis, s: Settings) -> int:
    return sum(r.hlen(s.key("join", str(p))) for p in range(s.topic_partitions))


def outbox_empty(r: redis.Redis, s: Settings) -> bool:
    return all(r.llen(s.key("outbox", str(p))) == 0 for p in range(s.topic_partitions))


def test_worker_sdk_export_and_replay_work_over_sasl_ssl_with_scram_and_a_client_cert(
    s: Settings, tmp_path: Path
) -> None:
    ensure_topics(s)  # the topic admin, through the secured listener too
    r = redis_client(s)
    log_path = tmp_path / "worker.log"
    worker = spawn_worker(s, log_level="debug", output=log_path.open("wb"))
    try:
        # The SDK (EventPublisher.from_settings) plays the serving layer: catalog, then shown
        # decisions with their clicks; the worker creates the topics, applies every event to
        # Redis, closes the decisions into the log and its learner learns from the log.
        market = Marketplace(MarketConfig(n_users=50, n_items=8, seed=4, run_tag=s.key_prefix))
        report = run_closed_loop(
            s, market, 300, tmp_path / "decisions.jsonl", rate=1000.0, progress=False
        )
        assert report.decisions == 300
        wait_until(
            lambda: (
                stats(r, s)["accepted"] == report.published
                and open_decisions(r, s) == 0
                and outbox_empty(r, s)
            ),
            90,
            "the worker to apply every event and log every decision",
            worker,
        )
        assert next(r.scan_iter(match=s.key("user", "*")), None) is not None
        counts = stats(r, s)
        assert counts["consumed"] == counts["accepted"] == report.published
        assert counts["duplicates"] == counts["deadlettered"] == 0
        closed = counts["decisions_closed"]

        # `loopwise export` reads the propensity log through the secured listener...
        out = tmp_path / "log.jsonl"
        exported = run_cli(s, "export", "--out", str(out), "--json", "--no-progress")
        assert exported.returncode == 0, exported.stderr
        summary = orjson.loads(exported.stdout)
        records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert summary["records_written"] == len(records) >= 300
        shown = {orjson.loads(x)["decision_id"] for x in (tmp_path / "decisions.jsonl").open()}
        assert shown <= {rec["decision_id"] for rec in records}
        assert closed == len(records)

        # ... and so does `loopwise replay kafka:`.
        replayed = run_cli(
            s, "replay", "kafka:", "--target", "uniform", "--bootstrap", "20", "--json",
            "--no-progress",
        )  # fmt: skip
        assert replayed.returncode == 0, replayed.stderr
        result = orjson.loads(replayed.stdout)
        assert result["n"] + sum(result["excluded"].values()) == len(records)
        assert result["n"] > 0

        # The learner (Faust's consumer of the log) learned every record once.
        def learned() -> int:
            offsets = r.hget(s.key("model"), "offsets")
            return sum(orjson.loads(offsets).values()) if offsets else 0

        wait_until(lambda: learned() == len(records), 30, "a snapshot of every record", worker)
        assert stop_worker(worker) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        r.close()
    text = log_path.read_text(errors="replace")
    assert "worker ready" in text
    assert_no_password_in(
        text, exported.stdout + exported.stderr, replayed.stdout + replayed.stderr
    )


N_REDELIVERED = 500  # good events sent again after a restart of the worker


def test_pipeline_counts_are_exact_over_sasl_ssl_and_a_password_redis(
    s: Settings, tmp_path: Path
) -> None:
    """The pipeline test (tests/test_pipeline_integration.py) over the secured broker and
    Redis: the SDK publishes the catalog, the good events and their redeliveries, a producer
    of ``kafka_clients`` the malformed messages the SDK refuses; every user hash equals the
    reference, every bad message is dead-lettered with its reason, the counts reconcile
    exactly, the offsets are committed, and redeliveries after a restart change nothing."""
    # Nothing gets into this Redis without the user's password.
    anonymous = with_(s, redis_username=None, redis_password=None)
    with redis_client(anonymous, retry=None) as client, pytest.raises(redis.AuthenticationError):
        client.ping()

    ensure_topics(s)
    traffic = build_traffic(s)  # the pipeline test's 20,000 messages for 500 users
    catalog = traffic["market"].catalog_events()
    stream = traffic["stream"]
    r = redis_client(s)
    sdk = EventPublisher.from_settings(s)
    raw = kafka_clients.producer(s, linger_ms=5, acks="all")
    log_path = tmp_path / "worker.log"
    log_file = log_path.open("ab")
    worker = spawn_worker(s, output=log_file)
    try:
        for e in catalog:
            sdk.send(e)
        sdk.flush()
        wait_until(lambda: r.hlen(s.key("catalog")) == len(catalog), 120, "the catalog", worker)

        for key, value, reason in stream:
            if reason is None:  # a good event or its redelivery: the same bytes from the SDK
                sdk.send(orjson.loads(value))
            else:
                raw.send(s.events_topic, key=key, value=value)
        sdk.flush()
        raw.flush()
        published = len(catalog) + len(stream)
        wait_until(lambda: stats(r, s)["consumed"] == published, 180, "all messages", worker)
        assert stop_worker(worker) == 0, "SIGTERM must stop the worker cleanly"

        counts = stats(r, s)
        assert counts["accepted"] == len(catalog) + len(traffic["good"])
        assert counts["duplicates"] == N_DUPLICATES
        assert counts["deadlettered"] == traffic["n_bad"]
        assert counts["accepted"] + counts["duplicates"] + counts["deadlettered"] == published
        assert counts["no_consent"] == NO_CONSENT_USERS

        # Every bad message is on the dead-letter topic (read over SASL_SSL), once, with its
        # reason and source.
        expected_reasons = {value: reason for _, value, reason in stream if reason}
        dead = read_topic(s, s.deadletter_topic, len(expected_reasons))
        assert len(dead) == len(expected_reasons)
        for record in dead:
            original = base64.b64decode(record["original_b64"])
            assert record["reason"] == expected_reasons[original], record
            assert record["source"]["topic"] == s.events_topic
            assert record["source"]["offset"] >= 0
        assert {base64.b64decode(d["original_b64"]) for d in dead} == set(expected_reasons)

        categories = {e["item_id"]: e["features"]["category"] for e in catalog}
        expected = reference_state(traffic["good"], categories, s)
        assert_users_match(r, s, expected)
        assert committed_lag(s) == 0

        # `loopwise stats` reads the same counters through the password Redis.
        shown = run_cli(s, "stats", "--json")
        assert shown.returncode == 0, shown.stderr
        summary = orjson.loads(shown.stdout)
        assert summary["reconciled"]
        assert summary["stats"]["accepted"] == counts["accepted"]
        assert summary["stats"]["deadlettered"] == counts["deadlettered"]

        # Redelivered after a restart: already-applied events change nothing.
        before = {uid: r.hgetall(s.key("user", uid)) for uid in expected}
        worker = spawn_worker(s, output=log_file)
        for e in random.Random(3).sample(traffic["good"], N_REDELIVERED):
            sdk.send(e)
        sdk.flush()
        wait_until(
            lambda: stats(r, s)["consumed"] == published + N_REDELIVERED,
            120,
            "the redeliveries",
            worker,
        )
        assert stop_worker(worker) == 0
        after = stats(r, s)
        assert after["duplicates"] == N_DUPLICATES + N_REDELIVERED
        assert after["accepted"] == counts["accepted"]
        assert after["deadlettered"] == counts["deadlettered"]
        assert {uid: r.hgetall(s.key("user", uid)) for uid in expected} == before
    finally:
        if worker.poll() is None:
            worker.kill()
        sdk.close()
        raw.close()
        r.close()
        log_file.close()
    assert_no_password_in(log_path.read_text(errors="replace"), shown.stdout + shown.stderr)


def test_other_scram_and_plain_mechanisms_log_in(s: Settings) -> None:
    for mechanism in ("SCRAM-SHA-256", "PLAIN"):
        other = with_(
            s,
            kafka_sasl_mechanism=mechanism,
            kafka_sasl_username=OTHER_USER,
            sasl_password=OTHER_PASSWORD,
        )
        admin = kafka_clients.admin(other, client_id="sec-test", request_timeout_ms=10_000)
        try:
            assert isinstance(admin.list_topics(), list)
        finally:
            admin.close()


def test_a_wrong_password_is_one_clear_error_at_once_never_showing_it(s: Settings) -> None:
    wrong = with_(s, sasl_password=WRONG_PASSWORD)
    started = time.monotonic()
    with pytest.raises(kafka_clients.KafkaAccessError) as refused:
        kafka_clients.consumer(wrong, group_id=None)
    assert time.monotonic() - started < 15
    assert f"refused the SASL login of user '{USER}' with SCRAM-SHA-512" in str(refused.value)
    with pytest.raises(kafka_clients.KafkaAccessError):
        EventPublisher.from_settings(wrong)

    # The worker and export stop at once with that line (exit 2: the user's error).
    for args in (("worker",), ("export", "--out", "x.jsonl", "--no-progress")):
        started = time.monotonic()
        result = run_cli(wrong, *args, timeout=60)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert time.monotonic() - started < 40
        assert "refused the SASL login" in result.stderr, result.stderr
        assert "LOOPWISE_SASL_PASSWORD" in result.stderr
        assert WRONG_PASSWORD not in result.stdout + result.stderr
        assert_no_password_in(result.stdout + result.stderr)

    unknown = with_(s, kafka_sasl_username="nobody")
    with pytest.raises(kafka_clients.KafkaAccessError, match="user 'nobody'"):
        kafka_clients.admin(unknown)


def test_tls_refusals_name_the_settings(s: Settings) -> None:
    # The listener requires a client certificate signed by its CA.
    no_cert = with_(s, kafka_ssl_certfile=None, kafka_ssl_keyfile=None)
    with pytest.raises(kafka_clients.KafkaAccessError, match="requires a client certificate"):
        kafka_clients.admin(no_cert)
    # The system's CAs do not know the local CA.
    other_ca = with_(s, kafka_ssl_cafile=None)
    with pytest.raises(kafka_clients.KafkaAccessError, match="CERTIFICATE_VERIFY_FAILED"):
        kafka_clients.admin(other_ca)
    # SASL without TLS on the TLS port.
    no_tls = load_settings(
        bootstrap_servers=s.bootstrap_servers,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=USER,
        sasl_password=PASSWORD,
    )
    with pytest.raises(kafka_clients.KafkaAccessError, match="listener for SASL_PLAINTEXT"):
        kafka_clients.admin(no_tls)


def test_a_plaintext_client_cannot_read_the_secured_listener(s: Settings) -> None:
    # kafka-python: no bootstrap, within its (shortened) timeout.
    with pytest.raises(KafkaError):
        consumer = KafkaConsumer(
            s.propensity_log_topic,
            bootstrap_servers=s.bootstrap_servers,
            bootstrap_timeout_ms=4_000,
            request_timeout_ms=3_000,
        )
        consumer.close()

    # aiokafka: refused at start.
    async def aio() -> None:
        consumer = AIOKafkaConsumer(
            s.propensity_log_topic, bootstrap_servers=s.bootstrap_servers, request_timeout_ms=3_000
        )
        try:
            await consumer.start()
        finally:
            await consumer.stop()

    with pytest.raises(AIOKafkaError):
        asyncio.run(aio())
