"""Loopwise against a Redis that requires an ACL user, a password and TLS.

Each test starts a Redis of its own (its own port and folder, ``RedisServer`` as ``loopwise
infra up`` runs it: ``user default off``, one ACL user, TLS only with certificates generated
by openssl) and runs the real worker process or CLI against it and the session's Kafka
broker. A client without the user's password, without TLS, or without the CA is refused.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from kafka import KafkaProducer
from worker_helpers import stats, wait_until

from loopwise.config import Settings, load_settings
from loopwise.infra import LocalInfra, RedisServer, free_port
from loopwise.producers.simulator import MarketConfig, Marketplace
from loopwise.redis_clients import redis_client
from loopwise.streams.topics import ensure_topics
from loopwise.streams.worker import spawn_worker, stop_worker

pytestmark = pytest.mark.integration

USER = "loopwise-app"


@pytest.fixture
def password() -> str:
    return "pw-" + secrets.token_hex(12) + ' "quoted" \\ and spaces'


@pytest.fixture
def secured_redis(tmp_path: Path, password: str) -> Iterator[RedisServer]:
    """A TLS-only Redis with the ACL user ``USER`` (the default user off)."""
    server = RedisServer(
        port=free_port(),
        state_dir=tmp_path / "redis",
        username=USER,
        password=password,
        tls=True,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def on_secured(settings: Settings, server: RedisServer, **overrides: Any) -> Settings:
    """``settings`` pointed at ``server`` with its user, password and CA."""
    return load_settings(
        **{
            **settings.model_dump(),
            "redis_url": server.url,
            "redis_username": server.username,
            "redis_ssl_ca_certs": server.ca_file,
            **overrides,
        }
    )


def cli(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``loopwise ARGS`` in a child process whose only settings are ``s`` (environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWISE_")}
    env.update(s.as_env())
    return subprocess.run(
        [sys.executable, "-m", "loopwise.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def traffic(s: Settings, n: int) -> list[dict[str, Any]]:
    """The catalog, then ``n`` organic events dated in the past."""
    market = Marketplace(
        MarketConfig(n_users=40, n_items=8, seed=11, run_tag=s.key_prefix.strip(":")).ending_by(
            int(time.time() * 1000), n
        )
    )
    return market.catalog_events() + list(market.events(n))


def test_the_worker_and_the_cli_work_with_an_acl_user_a_password_and_tls(
    isolated_settings: Settings, secured_redis: RedisServer, password: str, tmp_path: Path
) -> None:
    s = on_secured(isolated_settings, secured_redis, redis_password=password)
    ensure_topics(s)
    events = traffic(s, 400)
    expected: dict[str, Counter[str]] = {}
    for event in events:
        if event["type"] != "item":
            expected.setdefault(event["user_id"], Counter())[event["type"] + "s"] += 1
    r = redis_client(s)  # the product's builder: user, password, TLS with the CA
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
    log_file = (tmp_path / "worker.log").open("wb")
    worker = spawn_worker(s, output=log_file)
    try:
        for event in events:
            key = event.get("user_id", event["item_id"]).encode()
            producer.send(s.events_topic, key=key, value=orjson.dumps(event))
        producer.flush()
        wait_until(lambda: stats(r, s)["consumed"] == len(events), 120, "every event", worker)
        counters = stats(r, s)
        assert counters["accepted"] == len(events)
        assert counters["duplicates"] == counters["deadlettered"] == 0
        assert r.hlen(s.key("catalog")) == 8
        for user_id, counts in expected.items():
            stored = r.hgetall(s.key("user", user_id))
            for field in ("views", "clicks", "purchases"):
                assert int(stored.get(field.encode(), b"0")) == counts[field], (user_id, field)
        wait_until(lambda: r.exists(s.key("nba", "__default__")), 60, "nba:__default__", worker)

        shown = cli(s, "stats", "--json")
        assert shown.returncode == 0, shown.stderr
        summary = orjson.loads(shown.stdout)
        assert summary["stats"]["accepted"] == len(events) and summary["reconciled"]
        assert summary["users"] == len(expected) and summary["catalog_items"] == 8
        assert password not in shown.stdout + shown.stderr
        assert worker.poll() is None
        assert stop_worker(worker) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        producer.close()
        r.close()
        log_file.close()
    assert password not in (tmp_path / "worker.log").read_text()


def test_a_wrong_password_is_one_line_naming_the_setting_without_the_password(
    isolated_settings: Settings, secured_redis: RedisServer, password: str
) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    s = on_secured(isolated_settings, secured_redis, redis_password=wrong)
    for command in (("stats",), ("worker",)):
        done = cli(s, *command)
        assert done.returncode == 2, (command, done.stderr)
        output = done.stdout + done.stderr
        [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        assert f"refused user '{USER}' with the password given" in line, line
        assert "redis_password" in line and "LOOPWISE_REDIS_PASSWORD" in line
        assert wrong not in output and password not in output
    missing = cli(on_secured(isolated_settings, secured_redis), "stats")
    assert missing.returncode == 2
    assert "none is set: set LOOPWISE_REDIS_PASSWORD" in missing.stderr
    untrusted = cli(
        on_secured(
            isolated_settings, secured_redis, redis_password=password, redis_ssl_ca_certs=None
        ),
        "stats",
    )
    assert untrusted.returncode == 2
    assert "certificate verify failed" in untrusted.stderr
    assert "LOOPWISE_REDIS_SSL_CA_CERTS" in untrusted.stderr


def test_the_server_refuses_clients_without_the_credentials_or_tls(
    secured_redis: RedisServer, password: str
) -> None:
    host, port, ca = secured_redis.host, secured_redis.port, str(secured_redis.ca_file)
    # retry=None: redis-py would retry each refusal for seconds (a refusal is no outage)
    anonymous = redis.Redis(host=host, port=port, ssl=True, ssl_ca_certs=ca, retry=None)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    as_default = redis.Redis(
        host=host, port=port, ssl=True, ssl_ca_certs=ca, password=password, retry=None
    )
    with pytest.raises(redis.AuthenticationError):  # the default user is off
        as_default.ping()
    plain = redis.Redis(host=host, port=port, username=USER, password=password, retry=None)
    with pytest.raises(redis.ConnectionError):  # TLS only: no plain-text port
        plain.ping()
    unverified = redis.Redis(
        host=host, port=port, ssl=True, username=USER, password=password, retry=None
    )
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        unverified.ping()  # the system's CAs do not know the local CA
    good = redis.Redis(
        host=host, port=port, ssl=True, ssl_ca_certs=ca, username=USER, password=password
    )
    assert good.ping()
    for client in (anonymous, as_default, plain, unverified, good):
        client.close()


def test_client_certificates_and_new_access_from_the_settings(
    isolated_settings: Settings, tmp_path: Path, password: str
) -> None:
    """The local Redis as ``loopwise infra up`` runs it from the settings: with
    redis_ssl_certfile it requires a client certificate signed by its CA; ``infra status``
    checks it with that access; under a new password, ``start`` restarts it."""
    state_dir = tmp_path / "state"
    server = RedisServer(
        port=free_port(),
        state_dir=state_dir / "redis",
        username=USER,
        password=password,
        tls=True,
        tls_auth_clients=True,
    )
    server.start()  # generates the CA, the server's and a client's certificate
    try:
        s = on_secured(
            isolated_settings,
            server,
            redis_password=password,
            redis_ssl_certfile=server.client_cert_file,
            redis_ssl_keyfile=server.client_key_file,
            state_dir=state_dir,
        )
        with redis_client(s) as client:
            assert client.ping()
        no_cert = on_secured(isolated_settings, server, redis_password=password)
        with redis_client(no_cert, retry=None) as client, pytest.raises(redis.ConnectionError):
            client.ping()

        status = cli(s, "infra", "status", "--json")
        assert orjson.loads(status.stdout)["redis"] == {"url": server.url, "up": True}
        assert password not in status.stdout + status.stderr

        other = load_settings(**{**s.model_dump(), "redis_password": password + "-new"})
        local = LocalInfra.from_settings(other).redis
        assert local.tls_auth_clients and local.state_dir == server.state_dir
        assert not local.is_up()  # it runs, but with the old password
        local.start()  # restarts it with the new one
        with redis_client(other) as client:
            assert client.ping()
        with redis_client(s, retry=None) as client, pytest.raises(redis.AuthenticationError):
            client.ping()
    finally:
        server.stop()
