"""Redis access settings (ACL user, password, TLS), the one client builder, and what a
refusal says: unit tests, no server (tests/test_redis_security_integration.py has one)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions

from loopwise.config import ConfigError, Settings, load_settings
from loopwise.infra import InfraError, LocalInfra, RedisServer
from loopwise.infra.redis_server import _quoted
from loopwise.redis_clients import (
    async_redis_client,
    redis_client,
    redis_connection_options,
    redis_credentials,
    redis_error_message,
)

SECRET = "hunter2-do-not-print"


@pytest.fixture(autouse=True)
def _no_loopwise_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LOOPWISE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    """A file standing for a certificate (the settings check that it exists, not its content)."""
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    return str(caught.value)


# --- settings --------------------------------------------------------------------------------


def test_the_password_is_a_secret_never_shown_but_handed_to_children() -> None:
    s = load_settings(redis_password=SECRET, redis_username="loopwise")
    assert s.redis_password is not None and s.redis_password.get_secret_value() == SECRET
    for shown in (repr(s), str(s), s.model_dump_json(), str(s.model_dump())):
        assert SECRET not in shown
    env = s.as_env()
    assert env["LOOPWISE_REDIS_PASSWORD"] == SECRET
    assert env["LOOPWISE_REDIS_USERNAME"] == "loopwise"
    assert "LOOPWISE_REDIS_SSL_CA_CERTS" not in env  # unset settings are not passed on
    # model_dump() feeds load_settings again (the tests' fixtures do): the secret survives.
    again = load_settings(**s.model_dump())
    assert again.redis_password == s.redis_password


def test_the_password_comes_from_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "loopwise.toml"
    config.write_text(f'redis_password = "{SECRET}"\n')
    monkeypatch.setenv("LOOPWISE_CONFIG", str(config))
    with pytest.raises(ConfigError, match="LOOPWISE_REDIS_PASSWORD") as caught:
        load_settings()
    assert SECRET not in str(caught.value)
    monkeypatch.delenv("LOOPWISE_CONFIG")
    monkeypatch.setenv("LOOPWISE_REDIS_PASSWORD", SECRET)
    monkeypatch.setenv("LOOPWISE_REDIS_USERNAME", "app")
    s = load_settings()
    assert redis_credentials(s) == ("app", SECRET)


def test_every_new_setting_has_a_variable_and_a_default() -> None:
    s = load_settings()
    assert s.redis_username is None and s.redis_password is None
    assert s.redis_ssl_ca_certs is None and s.redis_ssl_certfile is None
    assert s.redis_ssl_keyfile is None and s.redis_ssl_check_hostname is True
    for name in (
        "redis_username",
        "redis_ssl_ca_certs",
        "redis_ssl_certfile",
        "redis_ssl_keyfile",
        "redis_ssl_check_hostname",
    ):
        assert name in Settings.model_fields


def test_rediss_urls_are_accepted_with_tls_files(
    pem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPWISE_REDIS_URL", "rediss://redis.example:6380/1")
    monkeypatch.setenv("LOOPWISE_REDIS_SSL_CA_CERTS", str(pem))
    monkeypatch.setenv("LOOPWISE_REDIS_SSL_CERTFILE", str(pem))
    monkeypatch.setenv("LOOPWISE_REDIS_SSL_KEYFILE", str(pem))
    monkeypatch.setenv("LOOPWISE_REDIS_SSL_CHECK_HOSTNAME", "false")
    s = load_settings()
    assert s.redis_ssl_ca_certs == pem and s.redis_ssl_keyfile == pem
    assert s.redis_ssl_check_hostname is False


def test_a_user_name_with_whitespace_is_refused() -> None:
    message = error(redis_username="bad user")
    assert "setting 'redis_username' (LOOPWISE_REDIS_USERNAME)" in message
    assert "without whitespace" in message


def test_the_user_in_the_url_and_the_setting_must_agree() -> None:
    s = load_settings(redis_url="redis://app@h:1/0", redis_username="app")
    assert redis_credentials(s) == ("app", None)
    message = error(redis_url="redis://app@h:1/0", redis_username="other")
    assert "setting 'redis_username'" in message and "redis_url names another user" in message


def test_a_password_in_the_url_and_in_the_environment_is_refused_without_showing_either() -> None:
    message = error(redis_url="redis://app:url-secret@h:1/0", redis_password=SECRET)
    assert "setting 'redis_password' (LOOPWISE_REDIS_PASSWORD) = <hidden>" in message
    assert "one place" in message
    assert SECRET not in message and "url-secret" not in message


def test_tls_files_need_a_rediss_url(pem: Path) -> None:
    message = error(redis_url="redis://h:1/0", redis_ssl_ca_certs=pem)
    assert "setting 'redis_ssl_ca_certs' (LOOPWISE_REDIS_SSL_CA_CERTS)" in message
    assert "rediss://" in message


def test_tls_files_must_exist(tmp_path: Path) -> None:
    for name in ("redis_ssl_ca_certs", "redis_ssl_certfile"):
        message = error(redis_url="rediss://h:1/0", **{name: tmp_path / "nope.pem"})
        assert f"setting '{name}' (LOOPWISE_{name.upper()})" in message
        assert "must be an existing PEM file" in message


def test_a_key_without_its_certificate_is_refused(pem: Path) -> None:
    message = error(redis_url="rediss://h:1/0", redis_ssl_keyfile=pem)
    assert "setting 'redis_ssl_keyfile'" in message and "redis_ssl_certfile" in message


# --- the client builder ----------------------------------------------------------------------


def test_a_plain_url_makes_a_plain_client_with_the_credentials() -> None:
    s = load_settings(
        redis_url="redis://127.0.0.1:6390/3", redis_username="app", redis_password=SECRET
    )
    client = redis_client(s, decode_responses=True)
    pool = client.connection_pool
    assert pool.connection_class is redis.Connection
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6390, 3)
    assert (kwargs["username"], kwargs["password"]) == ("app", SECRET)
    assert kwargs["decode_responses"] is True
    assert not any(k.startswith("ssl") for k in kwargs)
    client.close()


def test_a_rediss_url_makes_a_tls_client_verifying_the_server(pem: Path) -> None:
    s = load_settings(
        redis_url="rediss://redis.example:6380/0",
        redis_password=SECRET,
        redis_ssl_ca_certs=pem,
        redis_ssl_certfile=pem,
    )
    for client in (redis_client(s), async_redis_client(s)):
        pool = client.connection_pool
        assert pool.connection_class in (redis.SSLConnection, aioredis.SSLConnection)
        kwargs = pool.connection_kwargs
        assert kwargs["ssl_cert_reqs"] == "required"
        assert kwargs["ssl_ca_certs"] == str(pem) and kwargs["ssl_certfile"] == str(pem)
        assert kwargs["ssl_keyfile"] is None and kwargs["ssl_check_hostname"] is True
        assert (kwargs["username"], kwargs["password"]) == (None, SECRET)


def test_credentials_in_the_url_are_taken_out_of_it_and_given_as_keywords() -> None:
    s = load_settings(redis_url="rediss://a%40b:p%3Aw@h:1/2?socket_timeout=3")
    url, options = redis_connection_options(s)
    assert url == "rediss://h:1/2?socket_timeout=3"
    assert (options["username"], options["password"]) == ("a@b", "p:w")
    s = load_settings(redis_url="unix://app:pw@/run/redis.sock?db=2")
    url, options = redis_connection_options(s)
    assert url == "unix:///run/redis.sock?db=2"
    assert (options["username"], options["password"]) == ("app", "pw")
    assert redis_client(s).connection_pool.connection_kwargs["path"] == "/run/redis.sock"


def test_every_redis_client_of_the_product_is_made_by_the_builder() -> None:
    """No module of the product makes a Redis client of its own (the local server's
    readiness check aside: it has no settings, only its own access)."""
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for folder in ("streams", "producers", "loopwise", "bench", "learners", "config"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("Redis.from_url(", "redis.Redis(", "aioredis.Redis(", "StrictRedis"):
                if needle in text and path.name != "redis_clients.py":
                    offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == ["loopwise/infra/redis_server.py: redis.Redis("]


# --- what a refusal says ----------------------------------------------------------------------


def test_a_wrong_password_names_the_settings_and_not_the_password() -> None:
    s = load_settings(redis_url="rediss://h:1/0", redis_username="app", redis_password=SECRET)
    exc = redis.exceptions.AuthenticationError("WRONGPASS invalid username-password pair")
    message = redis_error_message(exc, s)
    assert message is not None
    assert message.startswith("Redis at rediss://h:1/0 refused user 'app'")
    assert "redis_password" in message and "LOOPWISE_REDIS_PASSWORD" in message
    assert "LOOPWISE_REDIS_USERNAME" in message and SECRET not in message


def test_a_missing_password_says_to_set_one() -> None:
    exc = redis.exceptions.AuthenticationError("NOAUTH Authentication required")
    message = redis_error_message(exc, load_settings())
    assert message is not None and "none is set" in message
    assert "LOOPWISE_REDIS_PASSWORD" in message


def test_a_tls_failure_names_the_tls_settings() -> None:
    exc = redis.exceptions.ConnectionError(
        "Error 1 connecting to h:1. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    message = redis_error_message(exc, load_settings(redis_url="rediss://h:1/0"))
    assert message is not None and message.startswith("TLS with Redis at rediss://h:1/0 failed")
    assert "redis_ssl_ca_certs" in message and "LOOPWISE_REDIS_SSL_CA_CERTS" in message


def test_a_plain_client_of_a_tls_server_is_told_about_rediss() -> None:
    exc = redis.exceptions.ConnectionError("Connection closed by server.")
    message = redis_error_message(exc, load_settings(redis_url="redis://h:1/0"))
    assert message is not None and message.startswith("cannot reach Redis at redis://h:1/0")
    assert "rediss://" in message and "LOOPWISE_REDIS_URL" in message


def test_other_errors_are_not_redis_refusals() -> None:
    assert redis_error_message(ValueError("x"), load_settings()) is None
    assert redis_error_message(redis.exceptions.ResponseError("x"), load_settings()) is None


# --- the local server's access ----------------------------------------------------------------


def test_redis_conf_arguments_are_quoted_so_no_password_breaks_the_file() -> None:
    assert _quoted("plain") == '"plain"'
    assert _quoted('a "b" \\ c') == '"a \\"b\\" \\\\ c"'
    assert _quoted("new\nline é") == '"new\\x0aline \\xc3\\xa9"'


def test_an_acl_user_turns_the_default_user_off(tmp_path: Path) -> None:
    server = RedisServer(port=6390, state_dir=tmp_path, username="app", password=SECRET)
    server._write_config()
    conf = server.conf_file.read_text()
    assert "user default off\n" in conf
    assert f'user "app" on ">{SECRET}" ~* &* +@all\n' in conf
    assert "requirepass" not in conf and "tls-port" not in conf
    assert stat.S_IMODE(server.conf_file.stat().st_mode) == 0o600
    assert SECRET not in repr(server)


def test_a_password_alone_protects_the_default_user(tmp_path: Path) -> None:
    server = RedisServer(port=6390, state_dir=tmp_path, password=SECRET)
    server._write_config()
    assert f'requirepass "{SECRET}"\n' in server.conf_file.read_text()


def test_tls_listens_on_the_tls_port_only(tmp_path: Path) -> None:
    server = RedisServer(port=6390, state_dir=tmp_path, tls=True)
    server._write_config()
    conf = server.conf_file.read_text()
    assert "port 0\ntls-port 6390\n" in conf and "tls-auth-clients no\n" in conf
    assert server.url == "rediss://127.0.0.1:6390/0"


def test_an_acl_user_without_a_password_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="LOOPWISE_REDIS_PASSWORD"):
        RedisServer(port=6390, state_dir=tmp_path, username="app")


def test_the_local_infra_takes_its_access_from_the_settings(tmp_path: Path, pem: Path) -> None:
    s = load_settings(
        redis_url="rediss://127.0.0.1:6391/2",
        redis_username="app",
        redis_password=SECRET,
        redis_ssl_ca_certs=pem,
        redis_ssl_certfile=pem,
        state_dir=tmp_path,
    )
    local = LocalInfra.from_settings(s)
    server = local.redis
    assert (server.host, server.port, server.username) == ("127.0.0.1", 6391, "app")
    assert server.tls and server.tls_auth_clients
    assert local.redis_url == "rediss://127.0.0.1:6391/2"
    plain = LocalInfra.from_settings(load_settings(state_dir=tmp_path))
    assert not plain.redis.tls and plain.redis_url == "redis://127.0.0.1:6379/0"
    with pytest.raises(InfraError, match="redis://HOST:PORT/DB") as caught:
        LocalInfra.from_settings(load_settings(redis_url="unix://app:pw@/run/redis.sock"))
    assert ":pw@" not in str(caught.value)
