"""The Kafka broker and Redis server Loopwise runs on this machine, as one thing to bring up.

Used by ``loopwise infra up|down|status``, the demo, the tests (on free ports, in a private
folder) and the benchmarks.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from loopwise.infra.kafka_broker import InfraError, KafkaBroker
from loopwise.infra.redis_server import RedisServer

if TYPE_CHECKING:
    from loopwise.config.settings import Settings

log = logging.getLogger("loopwise.infra")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick), for tests and benchmarks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class LocalInfra:
    """A local Kafka broker and Redis server, started and stopped together."""

    def __init__(
        self,
        kafka: KafkaBroker,
        redis: RedisServer,
        *,
        redis_db: int = 0,
        redis_clients_ca: Path | None = None,
    ) -> None:
        self.kafka = kafka
        self.redis = redis
        self.redis_db = redis_db
        self.redis_clients_ca = redis_clients_ca  # what clients verify a TLS Redis with

    def __repr__(self) -> str:
        return f"LocalInfra({self.kafka!r}, {self.redis!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalInfra:
        """The infra the settings point at: their ports, version, and ``state_dir``.

        The broker's files go to ``state_dir/kafka``, Redis's to ``state_dir/redis``.
        The local Redis requires the settings' password (``redis_password``, or the URL's),
        for the ACL user ``redis_username`` (or the URL's) when one is set, and speaks TLS
        only when ``redis_url`` is ``rediss://`` (client certificates required when
        ``redis_ssl_certfile`` is set); see :class:`RedisServer`.
        """
        from loopwise.redis_clients import redis_credentials
        from loopwise.streams.redis_store import url_without_password

        kafka_host = settings.bootstrap_servers.split(",")[0].strip().rpartition(":")[0]
        parsed = urlparse(settings.redis_url)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise InfraError(
                f"setting 'redis_url' (LOOPWISE_REDIS_URL) = "
                f"{url_without_password(settings.redis_url)!r}: the local Redis listens on "
                "TCP, so use redis://HOST:PORT/DB (or rediss:// for TLS), e.g. "
                "redis://127.0.0.1:6379/0"
            )
        db = parsed.path.lstrip("/")
        state_dir = Path(settings.state_dir)
        username, password = redis_credentials(settings)
        return cls(
            KafkaBroker(
                settings.kafka_version,
                kafka_host.strip("[]"),
                port=settings.kafka_port,
                controller_port=settings.kafka_controller_port,
                state_dir=state_dir / "kafka",
            ),
            RedisServer(
                parsed.hostname,
                port=settings.redis_port,
                state_dir=state_dir / "redis",
                username=username,
                password=password,
                tls=parsed.scheme == "rediss",
                tls_auth_clients=settings.redis_ssl_certfile is not None,
            ),
            redis_db=int(db) if db.isdigit() else 0,
            redis_clients_ca=settings.redis_ssl_ca_certs,
        )

    @classmethod
    def for_tests(cls, base_dir: Path, kafka_version: str | None = None) -> LocalInfra:
        """Infra on free ports with its files in ``base_dir``, beside any other running one.

        The Kafka version is ``kafka_version``, else ``LOOPWISE_KAFKA_VERSION``, else the
        settings' default, so a test run can measure another release without code changes.
        """
        from loopwise.config.settings import Settings

        version = (
            kafka_version
            or os.environ.get("LOOPWISE_KAFKA_VERSION")
            or Settings.model_fields["kafka_version"].default
        )
        ports: list[int] = []
        while len(ports) < 3:  # distinct, in case the kernel hands the same port out twice
            port = free_port()
            if port not in ports:
                ports.append(port)
        kafka_port, controller_port, redis_port = ports
        base_dir = Path(base_dir)
        return cls(
            KafkaBroker(
                version,
                port=kafka_port,
                controller_port=controller_port,
                state_dir=base_dir / "kafka",
            ),
            RedisServer(port=redis_port, state_dir=base_dir / "redis"),
        )

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers

    @property
    def redis_url(self) -> str:
        """The URL of the local Redis, without user or password (``rediss://`` with TLS)."""
        return self.redis.url.rpartition("/")[0] + f"/{self.redis_db}"

    def up(self, timeout: float = 90) -> None:
        """Start Redis, then Kafka (jars fetched on first use); each only if not already up.

        If Kafka fails, a Redis this call started is stopped again, so a failed ``up`` leaves
        things as they were.
        """
        started = time.monotonic()
        redis_was_up = self.redis.is_up()
        self.redis.start()
        try:
            self.kafka.start(timeout=timeout)
        except BaseException:
            if not redis_was_up:
                self.redis.stop()
            raise
        self._check_clients_trust_redis()
        log.info(
            "local infra up in %.1f s: Kafka %s, Redis %s",
            time.monotonic() - started,
            self.bootstrap_servers,
            self.redis_url,
        )

    def _check_clients_trust_redis(self) -> None:
        """Warn when a TLS Redis's clients would not verify its certificate: they verify
        with ``redis_ssl_ca_certs``, which must be the local CA (``tls/ca.crt``)."""
        if not self.redis.tls:
            return
        given = self.redis_clients_ca
        if given is not None and given.read_bytes() == self.redis.ca_file.read_bytes():
            return
        log.warning(
            "the local Redis's TLS certificate is signed by %s; clients verify it with "
            "redis_ssl_ca_certs, which is %s: set LOOPWISE_REDIS_SSL_CA_CERTS=%s",
            self.redis.ca_file,
            "not set (the system's CAs)" if given is None else f"another file ({given})",
            self.redis.ca_file,
        )

    def down(self) -> None:
        """Stop both; tries Redis even when stopping Kafka failed, then reports every failure."""
        errors: list[str] = []
        for service in (self.kafka, self.redis):
            try:
                service.stop()
            except InfraError as exc:
                errors.append(str(exc))
        if errors:
            raise InfraError("; ".join(errors))

    def status(self) -> dict[str, dict[str, Any]]:
        """``{"kafka": {"bootstrap_servers", "up"}, "redis": {"url", "up"}}`` (the contract)."""
        return {
            "kafka": {"bootstrap_servers": self.bootstrap_servers, "up": self.kafka.is_up()},
            "redis": {"url": self.redis_url, "up": self.redis.is_up()},
        }
