"""Every Kafka client Loopwise makes, from the settings: the one place that applies the
broker address and the security settings (``kafka_security_protocol``, ``kafka_sasl_*``,
``sasl_password``, ``kafka_ssl_*``).

Three client libraries talk to Kafka in Loopwise, and each spells the same things its own way:

- kafka-python (``KafkaProducer``, ``KafkaConsumer``, ``KafkaAdminClient``): :func:`producer`,
  :func:`consumer`, :func:`admin`, or the arguments alone, :func:`kafka_python_config`;
- aiokafka (``AIOKafkaConsumer``): :func:`aio_consumer`, or :func:`aiokafka_config`;
- Faust (the worker's app): :func:`faust_broker_config` (``broker`` and ``broker_credentials``).

All of them get one TLS setup, :func:`ssl_context` (the CA file, else the system's CAs; the
client certificate and key when given; the host name check unless turned off), and the same
SASL mechanism, user and password. The factories refuse a caller's own ``bootstrap_servers``
or security arguments, so no client of the product can be made that ignores the settings.

Before the first client of a process is made with TLS or SASL, :func:`check_access` opens one
connection and logs in: a refused password, certificate or mechanism is then one clear
:class:`KafkaAccessError` at once, where the clients themselves would retry for their whole
bootstrap timeout (kafka-python: 30 s) and end with "Unable to bootstrap".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from loopwise.config.settings import ConfigError, Settings

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer
    from faust.types.auth import CredentialsT
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

log = logging.getLogger("loopwise.kafka")

#: Arguments the settings decide; a caller of the factories may not pass them.
OWNED = frozenset(
    {
        "bootstrap_servers",
        "security_protocol",
        "ssl_context",
        "ssl_check_hostname",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
    }
)

#: The arguments of a consumer outside any consumer group, which reads the partitions it is
#: assigned from where it seeks (else the earliest offset) and commits nothing.
GROUPLESS: Final[Mapping[str, Any]] = MappingProxyType(
    {"group_id": None, "enable_auto_commit": False, "auto_offset_reset": "earliest"}
)


def uses_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of every client (None without TLS): verifies the broker's certificate
    against ``kafka_ssl_cafile`` (else the system's CAs), checks the host name unless
    ``kafka_ssl_check_hostname`` is false, presents ``kafka_ssl_certfile`` when set.

    A file that is not what it should be is a :class:`ConfigError` naming the setting."""
    if not uses_tls(settings):
        return None
    cafile = settings.kafka_ssl_cafile
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"setting 'kafka_ssl_cafile' (LOOPWISE_KAFKA_SSL_CAFILE) = {str(cafile)!r}: "
            f"not a PEM file of CA certificates ({exc})"
        ) from None
    certfile, keyfile = settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile
    if certfile is not None:
        try:
            context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"settings 'kafka_ssl_certfile', 'kafka_ssl_keyfile' (LOOPWISE_KAFKA_SSL_CERTFILE"
                f" = {str(certfile)!r}, LOOPWISE_KAFKA_SSL_KEYFILE = "
                f"{str(keyfile) if keyfile else None!r}): not a PEM certificate and its "
                f"unencrypted private key ({exc})"
            ) from None
    # After loading: the default context checks host names; turning that off keeps the
    # certificate verified (CERT_REQUIRED), only the name is not compared.
    context.check_hostname = settings.kafka_ssl_check_hostname
    return context


def _sasl(settings: Settings) -> dict[str, Any]:
    if not uses_sasl(settings):
        return {}
    password = settings.sasl_password
    return {
        "sasl_mechanism": settings.kafka_sasl_mechanism,
        "sasl_plain_username": settings.kafka_sasl_username,
        "sasl_plain_password": password.get_secret_value() if password is not None else None,
    }


def kafka_python_config(settings: Settings) -> dict[str, Any]:
    """``bootstrap_servers`` and the security arguments of a kafka-python client."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        **_sasl(settings),
    }
    context = ssl_context(settings)
    if context is not None:  # kafka-python then ignores its other ssl_* arguments
        config["ssl_context"] = context
    return config


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """``bootstrap_servers`` and the security arguments of an aiokafka client (aiokafka takes
    TLS only as an ``ssl_context``)."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        **_sasl(settings),
    }
    context = ssl_context(settings)
    if context is not None:
        config["ssl_context"] = context
    return config


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """The Faust app's ``broker_credentials`` (None with PLAINTEXT)."""
    import faust

    protocol = settings.kafka_security_protocol
    context = ssl_context(settings)
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    password = settings.sasl_password
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=password.get_secret_value() if password is not None else None,
        ssl_context=context,  # with a context Faust speaks SASL_SSL, without SASL_PLAINTEXT
        mechanism=settings.kafka_sasl_mechanism,
    )


def faust_broker_config(settings: Settings) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` for ``faust.App``."""
    return {
        "broker": "kafka://" + settings.bootstrap_servers.replace(",", ";kafka://"),
        "broker_credentials": faust_credentials(settings),
    }


def refuse_owned(config: dict[str, Any], what: str) -> None:
    taken = sorted(OWNED & set(config))
    if taken:
        raise TypeError(
            f"{what}: {', '.join(taken)} come from the settings (bootstrap_servers, "
            "kafka_security_protocol, kafka_sasl_*, sasl_password, kafka_ssl_*), not from callers"
        )


class KafkaAccessError(ConfigError):
    """The broker refused the settings' TLS or SASL (a wrong password, CA, certificate,
    mechanism, or a listener of another protocol); the message names the settings to check."""


_checked: set[str] = set()
_checked_lock = threading.Lock()


def _access_key(settings: Settings) -> str:
    password = settings.sasl_password
    parts = [
        settings.bootstrap_servers,
        settings.kafka_security_protocol,
        str(settings.kafka_sasl_mechanism),
        str(settings.kafka_sasl_username),
        password.get_secret_value() if password is not None else "",
        str(settings.kafka_ssl_cafile),
        str(settings.kafka_ssl_certfile),
        str(settings.kafka_ssl_keyfile),
        str(settings.kafka_ssl_check_hostname),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()  # no password kept in memory


def check_access(settings: Settings, timeout_s: float = 15.0) -> None:
    """Log in to the broker once with the settings' TLS and SASL; raise
    :class:`KafkaAccessError` when it refuses them. Nothing to check with PLAINTEXT.

    Only a refusal is an error: a broker that cannot be reached (down, restarting) is left to
    the clients' own retries, as without TLS/SASL. A successful check is remembered for the
    process."""
    if settings.kafka_security_protocol == "PLAINTEXT":
        return
    key = _access_key(settings)
    with _checked_lock:
        if key in _checked:
            return
    outcome: list[BaseException | bool] = []

    def probe() -> None:
        try:
            outcome.append(asyncio.run(_probe(settings, timeout_s)))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    # A thread of its own: callers may be inside a running event loop, or not.
    thread = threading.Thread(target=probe, name="loopwise-kafka-check", daemon=True)
    thread.start()
    thread.join(timeout_s * len(settings.bootstrap_servers.split(",")) + 5)
    result = outcome[0] if outcome else False
    if isinstance(result, BaseException):
        raise result
    if result:
        with _checked_lock:
            _checked.add(key)


async def _probe(settings: Settings, timeout_s: float) -> bool:
    """True once a broker accepted the login; False when none could be reached."""
    from aiokafka import errors

    config = aiokafka_config(settings)
    servers = [s.strip() for s in config.pop("bootstrap_servers").split(",")]
    refused = (
        errors.SaslAuthenticationFailed,
        errors.AuthenticationFailedError,
        errors.UnsupportedSaslMechanismError,
        errors.IllegalSaslStateError,
    )
    # A broker that closes the connection in the middle of the handshake, twice, speaks
    # another protocol on that port (e.g. PLAINTEXT for a TLS client, TLS for SASL_PLAINTEXT).
    closed = (
        ConnectionResetError,
        ConnectionAbortedError,
        BrokenPipeError,
        asyncio.IncompleteReadError,
        errors.KafkaConnectionError,
    )
    protocol = settings.kafka_security_protocol
    for server in servers:
        host, _, port = server.rpartition(":")
        for attempt in (1, 2):
            try:
                await asyncio.wait_for(
                    _login(host.strip("[]"), int(port), config, timeout_s), timeout_s
                )
            except refused as exc:
                raise KafkaAccessError(
                    f"the Kafka broker at {server} refused the SASL login of user "
                    f"{settings.kafka_sasl_username!r} with {settings.kafka_sasl_mechanism} "
                    f"({_text(exc)}): check kafka_sasl_username (LOOPWISE_KAFKA_SASL_USERNAME), "
                    "LOOPWISE_SASL_PASSWORD, kafka_sasl_mechanism (LOOPWISE_KAFKA_SASL_MECHANISM)"
                    f", and that {server} is a listener for {protocol} (kafka_security_protocol)"
                ) from None
            except ssl.SSLError as exc:
                raise KafkaAccessError(
                    f"TLS with the Kafka broker at {server} failed ({_text(exc)}): check "
                    "kafka_ssl_cafile (LOOPWISE_KAFKA_SSL_CAFILE), kafka_ssl_certfile and "
                    "kafka_ssl_keyfile, kafka_ssl_check_hostname, and that "
                    f"{server} is a listener for {protocol} (kafka_security_protocol)"
                ) from None
            except closed as exc:
                log.debug("access check: %s closed the connection: %r", server, exc)
                if attempt == 1:
                    await asyncio.sleep(1.0)
                    continue
                certificate = (
                    ", and whether it requires a client certificate: kafka_ssl_certfile "
                    "(LOOPWISE_KAFKA_SSL_CERTFILE) and kafka_ssl_keyfile, signed by a CA it trusts"
                    if uses_tls(settings)
                    else ""
                )
                raise KafkaAccessError(
                    f"the Kafka broker at {server} closed the connection during the "
                    f"{protocol} handshake ({_text(exc)}): check that {server} is a listener "
                    f"for {protocol} (setting kafka_security_protocol, "
                    f"LOOPWISE_KAFKA_SECURITY_PROTOCOL){certificate}"
                ) from None
            except (TimeoutError, OSError, errors.KafkaError) as exc:
                log.debug("access check: %s not reachable: %r", server, exc)
                break
            return True
    return False


async def _login(host: str, port: int, config: dict[str, Any], timeout_s: float) -> None:
    """Connect, log in, and ask for metadata (a listener that wants a login another client
    skipped answers that with a closed connection)."""
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    conn = await create_conn(
        host,
        port,
        client_id="loopwise-access-check",
        request_timeout_ms=int(timeout_s * 1000),
        **config,
    )
    try:
        await conn.send(MetadataRequest([]))
    finally:
        conn.close()


def _text(exc: BaseException) -> str:
    return str(exc).rstrip(".") or type(exc).__name__


def producer(settings: Settings, **config: Any) -> KafkaProducer:
    """A kafka-python ``KafkaProducer`` on the settings' broker and security."""
    from kafka import KafkaProducer

    refuse_owned(config, "KafkaProducer")
    check_access(settings)
    return KafkaProducer(**kafka_python_config(settings), **config)


def consumer(settings: Settings, *topics: str, **config: Any) -> KafkaConsumer:
    """A kafka-python ``KafkaConsumer`` on the settings' broker and security."""
    from kafka import KafkaConsumer

    refuse_owned(config, "KafkaConsumer")
    check_access(settings)
    return KafkaConsumer(*topics, **kafka_python_config(settings), **config)


def admin(settings: Settings, **config: Any) -> KafkaAdminClient:
    """A kafka-python ``KafkaAdminClient`` on the settings' broker and security."""
    from kafka import KafkaAdminClient

    refuse_owned(config, "KafkaAdminClient")
    check_access(settings)
    return KafkaAdminClient(**kafka_python_config(settings), **config)


def aio_consumer(settings: Settings, *topics: str, **config: Any) -> AIOKafkaConsumer:
    """An aiokafka ``AIOKafkaConsumer`` on the settings' broker and security (not started)."""
    from aiokafka import AIOKafkaConsumer

    refuse_owned(config, "AIOKafkaConsumer")
    check_access(settings)
    return AIOKafkaConsumer(*topics, **aiokafka_config(settings), **config)
