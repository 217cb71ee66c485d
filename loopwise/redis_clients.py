"""The one place where Loopwise makes Redis clients from the settings.

Every Redis client of the product (the worker, its learner, ``RedisStore``, the CLI's
``stats``/``forget``/``rebuild``/``demo``, the closed-loop simulator, the benchmarks) is made
here, so that all of them connect the same way:

- ``redis_url``: ``redis://`` (plain TCP), ``rediss://`` (TLS) or ``unix://``;
- the ACL user: ``redis_username``, else the user named in the URL, else Redis's ``default``;
- the password: ``redis_password`` (environment only: ``LOOPWISE_REDIS_PASSWORD``), else the
  one in the URL (the settings refuse both at once);
- TLS (``rediss://`` only): the server's certificate is verified against
  ``redis_ssl_ca_certs`` (default: the system's CAs), its host name checked unless
  ``redis_ssl_check_hostname`` is false, and ``redis_ssl_certfile``/``redis_ssl_keyfile``
  are presented to a server that requires client certificates.

The password is handed to redis-py as a keyword, never put in a URL or a message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.exceptions

from loopwise.config import Settings


def redis_credentials(settings: Settings) -> tuple[str | None, str | None]:
    """``(username, password)`` the settings give: the settings' own, else the URL's."""
    url = urlsplit(settings.redis_url)
    username = settings.redis_username or (unquote(url.username) if url.username else None)
    if settings.redis_password is not None:
        password: str | None = settings.redis_password.get_secret_value()
    else:
        password = unquote(url.password) if url.password is not None else None
    return username, password


def redis_connection_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The URL without user or password, and the keywords of ``Redis.from_url``.

    redis-py lets a URL's user and password win over keywords, so they are taken out of the
    URL and given as keywords (:func:`redis_credentials`).
    """
    url = urlsplit(settings.redis_url)
    bare = settings.redis_url
    if "@" in url.netloc:
        bare = urlunsplit(url._replace(netloc=url.netloc.rpartition("@")[2]))
        if url.scheme == "unix":  # urlunsplit writes unix:/path, which redis-py refuses
            bare = "unix://" + bare.removeprefix("unix:")
    username, password = redis_credentials(settings)
    options: dict[str, Any] = {"username": username, "password": password}
    if url.scheme == "rediss":
        ca_certs = settings.redis_ssl_ca_certs
        certfile = settings.redis_ssl_certfile
        keyfile = settings.redis_ssl_keyfile
        options.update(
            ssl_cert_reqs="required",
            ssl_ca_certs=str(ca_certs) if ca_certs is not None else None,
            ssl_certfile=str(certfile) if certfile is not None else None,
            ssl_keyfile=str(keyfile) if keyfile is not None else None,
            ssl_check_hostname=settings.redis_ssl_check_hostname,
        )
    return bare, options


def redis_client(settings: Settings, **options: Any) -> redis.Redis:
    """A synchronous client of the settings' Redis; ``options`` go to redis-py
    (``decode_responses``, timeouts, ...). With ``redis_cluster``, a
    :class:`redis.cluster.RedisCluster` that discovers the other nodes from ``redis_url``
    (it has the same commands; multi-key ones must stay within one slot, see :func:`mget`)."""
    url, connection = redis_connection_options(settings)
    if settings.redis_cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **connection, **options)  # type: ignore[return-value]
    return redis.Redis.from_url(url, **connection, **options)


def async_redis_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """An asyncio client of the settings' Redis, made like :func:`redis_client`."""
    url, connection = redis_connection_options(settings)
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

        return AsyncRedisCluster.from_url(url, **connection, **options)  # type: ignore[return-value]
    return aioredis.Redis.from_url(url, **connection, **options)


def mget(client: Any, keys: list[str]) -> list[Any]:
    """``MGET`` of ``keys``, split by slot on a Redis Cluster (where one MGET must stay in one
    slot): one value or None per key, in order."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return list(client.mget_nonatomic(keys))
    return list(client.mget(keys))


def redis_error_message(exc: BaseException, settings: Settings | None) -> str | None:
    """One line saying what to fix when ``exc`` is Redis refusing us or out of reach (None:
    not such an error). It names the settings involved and never shows a password."""
    from loopwise.streams.redis_store import url_without_password

    if not isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return None
    text = str(exc).rstrip(".") or type(exc).__name__
    where = "Redis" if settings is None else f"Redis at {url_without_password(settings.redis_url)}"
    if isinstance(exc, redis.exceptions.AuthenticationError):
        username, password = redis_credentials(settings) if settings else (None, None)
        if settings is not None and password is None:
            return (
                f"{where} requires a password, and none is set: set LOOPWISE_REDIS_PASSWORD "
                "(setting redis_password, environment only), and redis_username "
                f"(LOOPWISE_REDIS_USERNAME) for an ACL user: {text}"
            )
        who = f"user {username!r}" if username else "the default user"
        return (
            f"{where} refused {who} with the password given (settings redis_password, "
            "LOOPWISE_REDIS_PASSWORD, environment only; redis_username, "
            f"LOOPWISE_REDIS_USERNAME): {text}"
        )
    tls = settings is not None and settings.redis_url.startswith("rediss://")
    lowered = text.lower()
    if tls and ("certificate" in lowered or "ssl" in lowered or "tls" in lowered):
        return (
            f"TLS with {where} failed: {text}; the server's certificate must be signed by a CA "
            "in redis_ssl_ca_certs (LOOPWISE_REDIS_SSL_CA_CERTS; default: the system's CAs) "
            "and name the URL's host (redis_ssl_check_hostname), and a server that requires "
            "client certificates needs redis_ssl_certfile / redis_ssl_keyfile"
        )
    hint = "is it running? `loopwise infra up` starts a local one"
    if not tls and ("closed by server" in lowered or "reset by peer" in lowered):
        hint += "; a TLS-only Redis closes plain connections: then use rediss:// in redis_url"
    return f"cannot reach {where} (setting redis_url, LOOPWISE_REDIS_URL): {text}; {hint}"
