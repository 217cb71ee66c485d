"""Kafka security settings and the one module that turns them into client arguments (no
broker: ``test_kafka_security_integration.py`` runs them against one)."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import AuthProtocol, SASLMechanism

from loopwise import kafka_clients
from loopwise.cli import main
from loopwise.config import ConfigError, Settings, load_settings
from loopwise.infra import InfraError
from loopwise.infra.kafka_broker import KafkaBroker
from loopwise.producers.sdk import EventPublisher

PASSWORD = "pw-never-printed-7f3c"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LOOPWISE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate (used as CA and as client certificate) and its key."""
    d = tmp_path_factory.mktemp("pem")
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed (it also makes the local broker's certificates)"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", d / "key.pem", "-out", d / "cert.pem", "-days", "2",
         "-subj", "/CN=loopwise-test"],
        check=True, capture_output=True,
    )  # fmt: skip
    (d / "not-pem.txt").write_text("not a certificate\n")
    return {"cert": d / "cert.pem", "key": d / "key.pem", "junk": d / "not-pem.txt"}


def sasl_ssl(pem: dict[str, Path], **changes: object) -> Settings:
    return load_settings(
        **{
            "bootstrap_servers": "broker-1:9094,broker-2:9094",
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": "loopwise",
            "sasl_password": PASSWORD,
            "kafka_ssl_cafile": pem["cert"],
            "kafka_ssl_certfile": pem["cert"],
            "kafka_ssl_keyfile": pem["key"],
            **changes,
        }
    )


def error_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    return str(exc.value)


# --- settings ----------------------------------------------------------------------------------


def test_the_default_is_plaintext_with_nothing_else() -> None:
    s = load_settings()
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.kafka_sasl_mechanism is None and s.kafka_sasl_username is None
    assert s.sasl_password is None and s.kafka_ssl_cafile is None
    assert s.kafka_ssl_check_hostname is True


def test_sasl_ssl_from_the_environment(
    pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPWISE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("LOOPWISE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("LOOPWISE_KAFKA_SASL_USERNAME", "loopwise")
    monkeypatch.setenv("LOOPWISE_SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("LOOPWISE_KAFKA_SSL_CAFILE", str(pem["cert"]))
    monkeypatch.setenv("LOOPWISE_KAFKA_SSL_CHECK_HOSTNAME", "false")
    s = load_settings()
    assert s.kafka_sasl_mechanism == "SCRAM-SHA-256"
    assert s.sasl_password is not None and s.sasl_password.get_secret_value() == PASSWORD
    assert s.kafka_ssl_cafile == pem["cert"] and s.kafka_ssl_check_hostname is False
    assert PASSWORD not in repr(s) and PASSWORD not in str(s)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"LOOPWISE_KAFKA_SECURITY_PROTOCOL": "TLS"},
            "setting 'kafka_security_protocol' (LOOPWISE_KAFKA_SECURITY_PROTOCOL) = 'TLS': "
            "Input should be 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'",
        ),
        (
            {
                "LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "LOOPWISE_KAFKA_SASL_MECHANISM": "GSSAPI",
            },
            "Input should be 'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'",
        ),
        (
            {"LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            "setting 'kafka_sasl_mechanism' (LOOPWISE_KAFKA_SASL_MECHANISM) = None: required with "
            "kafka_security_protocol=SASL_SSL: set LOOPWISE_KAFKA_SASL_MECHANISM to PLAIN, "
            "SCRAM-SHA-256 or SCRAM-SHA-512",
        ),
        (
            {"LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
            "setting 'kafka_sasl_username' (LOOPWISE_KAFKA_SASL_USERNAME) = None: required with "
            "kafka_security_protocol=SASL_PLAINTEXT",
        ),
        (
            {"LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            "setting 'sasl_password' (LOOPWISE_SASL_PASSWORD) = <hidden>: required with "
            "kafka_security_protocol=SASL_SSL: set LOOPWISE_SASL_PASSWORD (environment only)",
        ),
        (
            {
                "LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "LOOPWISE_KAFKA_SASL_MECHANISM": "PLAIN",
                "LOOPWISE_KAFKA_SASL_USERNAME": "",
                "LOOPWISE_SASL_PASSWORD": PASSWORD,
            },
            "setting 'kafka_sasl_username' (LOOPWISE_KAFKA_SASL_USERNAME) = '': required",
        ),
        (
            {"LOOPWISE_SASL_PASSWORD": PASSWORD},
            "setting 'sasl_password' (LOOPWISE_SASL_PASSWORD) = <hidden>: only used with "
            "kafka_security_protocol SASL_PLAINTEXT or SASL_SSL, not PLAINTEXT",
        ),
        (
            {"LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SSL", "LOOPWISE_KAFKA_SASL_USERNAME": "bob"},
            "setting 'kafka_sasl_username' (LOOPWISE_KAFKA_SASL_USERNAME) = 'bob': only used "
            "with kafka_security_protocol SASL_PLAINTEXT or SASL_SSL, not SSL",
        ),
        (
            {"LOOPWISE_KAFKA_SSL_CAFILE": "<cert>"},
            "setting 'kafka_ssl_cafile' (LOOPWISE_KAFKA_SSL_CAFILE) = '<cert>': TLS files are only "
            "used with kafka_security_protocol SSL or SASL_SSL, not PLAINTEXT",
        ),
        (
            {
                "LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "LOOPWISE_KAFKA_SSL_CERTFILE": "<cert>",
            },
            "TLS files are only used with kafka_security_protocol SSL or SASL_SSL, not "
            "SASL_PLAINTEXT",
        ),
        (
            {"LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SSL", "LOOPWISE_KAFKA_SSL_CAFILE": "/no/ca.pem"},
            "setting 'kafka_ssl_cafile' (LOOPWISE_KAFKA_SSL_CAFILE) = '/no/ca.pem': /no/ca.pem "
            "is not a readable file",
        ),
        (
            {"LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SSL", "LOOPWISE_KAFKA_SSL_KEYFILE": "<key>"},
            "setting 'kafka_ssl_keyfile' (LOOPWISE_KAFKA_SSL_KEYFILE) = '<key>': a key without a "
            "certificate: set LOOPWISE_KAFKA_SSL_CERTFILE too",
        ),
        (
            {"LOOPWISE_KAFKA_SSL_CHECK_HOSTNAME": "false"},
            "setting 'kafka_ssl_check_hostname' (LOOPWISE_KAFKA_SSL_CHECK_HOSTNAME) = 'false': "
            "only used with kafka_security_protocol SSL or SASL_SSL, not PLAINTEXT",
        ),
    ],
)
def test_security_settings_are_checked_together_and_errors_name_the_setting(
    env: dict[str, str],
    expected: str,
    pem: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        k: v.replace("<cert>", str(pem["cert"])).replace("<key>", str(pem["key"]))
        for k, v in env.items()
    }
    expected = expected.replace("<cert>", str(pem["cert"])).replace("<key>", str(pem["key"]))
    message = error_of(env, monkeypatch)
    assert expected in message
    assert PASSWORD not in message


def test_tls_paths_are_made_absolute_for_child_processes(
    pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pem["cert"].parent)
    s = load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile="cert.pem")
    assert s.kafka_ssl_cafile == pem["cert"]
    assert s.as_env()["LOOPWISE_KAFKA_SSL_CAFILE"] == str(pem["cert"])


def test_the_password_is_refused_from_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "loopwise.toml"
    config.write_text(
        f'[loopwise]\nkafka_security_protocol = "SASL_SSL"\nsasl_password = "{PASSWORD}"\n'
    )
    monkeypatch.setenv("LOOPWISE_CONFIG", str(config))
    with pytest.raises(ConfigError) as exc:
        load_settings()
    message = str(exc.value)
    assert "sets sasl_password: secrets are read only from the environment" in message
    assert "LOOPWISE_SASL_PASSWORD" in message and PASSWORD not in message


def test_the_rest_comes_from_the_config_file_and_the_password_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "loopwise.toml"
    config.write_text(
        '[loopwise]\nkafka_security_protocol = "SASL_PLAINTEXT"\n'
        'kafka_sasl_mechanism = "PLAIN"\nkafka_sasl_username = "loopwise"\n'
    )
    monkeypatch.setenv("LOOPWISE_CONFIG", str(config))
    monkeypatch.setenv("LOOPWISE_SASL_PASSWORD", PASSWORD)
    s = load_settings()
    assert s.kafka_security_protocol == "SASL_PLAINTEXT" and s.kafka_sasl_username == "loopwise"


def test_child_processes_get_the_password_and_every_security_setting(
    pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = sasl_ssl(pem, kafka_ssl_check_hostname=False)
    env = s.as_env()
    assert env["LOOPWISE_SASL_PASSWORD"] == PASSWORD
    assert env["LOOPWISE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings() == s  # what spawn_worker's child reads back


def test_the_password_is_never_printed_by_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "LOOPWISE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "LOOPWISE_KAFKA_SASL_MECHANISM": "PLAIN",
        "LOOPWISE_SASL_PASSWORD": PASSWORD,  # no user: an invalid configuration
    }
    runner = CliRunner()
    result = runner.invoke(main, ["stats"], env=env)
    assert result.exit_code == 2
    assert "kafka_sasl_username" in result.output + result.stderr
    assert PASSWORD not in result.output + result.stderr
    for args in (["--help"], ["worker", "--help"], ["export", "--help"]):
        assert PASSWORD not in runner.invoke(main, args, env=env).output


# --- client arguments --------------------------------------------------------------------------


def test_plaintext_clients_get_the_servers_and_nothing_else() -> None:
    s = load_settings(bootstrap_servers="k1:9092,k2:9092")
    assert kafka_clients.kafka_python_config(s) == {
        "bootstrap_servers": "k1:9092,k2:9092",
        "security_protocol": "PLAINTEXT",
    }
    assert kafka_clients.aiokafka_config(s) == kafka_clients.kafka_python_config(s)
    assert kafka_clients.ssl_context(s) is None
    assert kafka_clients.faust_broker_config(s) == {
        "broker": "kafka://k1:9092;kafka://k2:9092",
        "broker_credentials": None,
    }


def test_sasl_ssl_arguments_for_kafka_python_and_aiokafka(pem: dict[str, Path]) -> None:
    s = sasl_ssl(pem)
    for config in (kafka_clients.kafka_python_config(s), kafka_clients.aiokafka_config(s)):
        context = config.pop("ssl_context")
        assert config == {
            "bootstrap_servers": "broker-1:9094,broker-2:9094",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "loopwise",
            "sasl_plain_password": PASSWORD,
        }
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert [c["subject"] for c in context.get_ca_certs()] == [
            ((("commonName", "loopwise-test"),),)
        ]


def test_the_host_name_check_can_be_turned_off_but_not_the_verification(
    pem: dict[str, Path],
) -> None:
    context = kafka_clients.ssl_context(sasl_ssl(pem, kafka_ssl_check_hostname=False))
    assert context is not None
    assert context.check_hostname is False and context.verify_mode == ssl.CERT_REQUIRED


def test_ssl_without_sasl_and_sasl_without_ssl(pem: dict[str, Path]) -> None:
    tls = load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=pem["cert"])
    config = kafka_clients.kafka_python_config(tls)
    assert config["security_protocol"] == "SSL" and "sasl_mechanism" not in config
    assert isinstance(config["ssl_context"], ssl.SSLContext)
    sasl = load_settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        sasl_password=PASSWORD,
    )
    config = kafka_clients.aiokafka_config(sasl)
    assert config["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in config
    assert config["sasl_plain_password"] == PASSWORD


def test_faust_gets_credentials_it_hands_to_aiokafka_unchanged(pem: dict[str, Path]) -> None:
    creds = kafka_clients.faust_credentials(sasl_ssl(pem))
    assert isinstance(creds, SASLCredentials)
    assert creds.protocol is AuthProtocol.SASL_SSL
    assert creds.mechanism is SASLMechanism.SCRAM_SHA_512
    assert PASSWORD not in repr(creds)
    auth = credentials_to_aiokafka_auth(creds)  # what Faust's consumer and producer get
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("loopwise", PASSWORD)
    assert isinstance(auth["ssl_context"], ssl.SSLContext)

    sasl = load_settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="u",
        sasl_password=PASSWORD,
    )
    auth = credentials_to_aiokafka_auth(kafka_clients.faust_credentials(sasl))
    assert auth["security_protocol"] == "SASL_PLAINTEXT" and auth["ssl_context"] is None
    assert auth["sasl_mechanism"] == "SCRAM-SHA-256"

    tls = kafka_clients.faust_credentials(
        load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=pem["cert"])
    )
    assert isinstance(tls, SSLCredentials)
    assert credentials_to_aiokafka_auth(tls)["security_protocol"] == "SSL"


def test_the_worker_app_is_built_with_the_credentials(pem: dict[str, Path]) -> None:
    from loopwise.streams.app import build_app

    app = build_app(sasl_ssl(pem, decisions=False))  # no learner: reads no Redis
    assert isinstance(app.conf.broker_credentials, SASLCredentials)
    assert app.conf.broker_credentials.protocol is AuthProtocol.SASL_SSL
    assert [str(url) for url in app.conf.broker] == [
        "kafka://broker-1:9094",
        "kafka://broker-2:9094",
    ]


def test_files_that_are_not_pem_name_their_setting(pem: dict[str, Path]) -> None:
    bad_ca = load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=pem["junk"])
    with pytest.raises(ConfigError, match=r"'kafka_ssl_cafile' \(LOOPWISE_KAFKA_SSL_CAFILE\)"):
        kafka_clients.ssl_context(bad_ca)
    bad_key = load_settings(
        kafka_security_protocol="SSL", kafka_ssl_certfile=pem["cert"], kafka_ssl_keyfile=pem["junk"]
    )
    with pytest.raises(ConfigError, match="kafka_ssl_keyfile"):
        kafka_clients.ssl_context(bad_key)


def test_callers_cannot_override_what_the_settings_decide(pem: dict[str, Path]) -> None:
    s = load_settings()
    with pytest.raises(TypeError, match="bootstrap_servers"):
        kafka_clients.producer(s, bootstrap_servers="elsewhere:9092")
    with pytest.raises(TypeError, match="security_protocol"):
        kafka_clients.consumer(s, security_protocol="PLAINTEXT")
    with pytest.raises(TypeError, match="sasl_plain_password"):
        EventPublisher.from_settings(sasl_ssl(pem), sasl_plain_password="x")


def test_the_access_check_skips_plaintext_and_leaves_an_unreachable_broker_to_the_clients(
    pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_probe(*args: object) -> None:
        raise AssertionError("PLAINTEXT needs no check")

    with monkeypatch.context() as m:
        m.setattr(kafka_clients, "_probe", no_probe)
        kafka_clients.check_access(load_settings())
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    s = sasl_ssl(pem, bootstrap_servers=f"127.0.0.1:{port}")
    kafka_clients.check_access(s, timeout_s=2)  # no error: the clients retry as usual
    assert kafka_clients._access_key(s) not in kafka_clients._checked  # checked again next time


def test_no_product_code_makes_a_kafka_client_but_through_kafka_clients() -> None:
    """Every client of streams/, producers/, loopwise/ and bench/ comes from
    loopwise.kafka_clients, so none can miss the security settings."""
    made = re.compile(
        r"\b(KafkaProducer|KafkaConsumer|KafkaAdminClient|AIOKafkaConsumer|AIOKafkaProducer|"
        r"AIOKafkaAdminClient|AIOKafkaClient)\(|\bfaust\.App\("
    )
    allowed = {
        "loopwise/kafka_clients.py",  # the factories
        "producers/sdk.py",  # EventPublisher(servers, **config): the SDK's own constructor
        "loopwise/infra/kafka_broker.py",  # readiness probe of the local PLAINTEXT listener
        "streams/app.py",  # faust.App(**kafka_clients.faust_broker_config(settings))
    }
    found = []
    for folder in ("streams", "producers", "loopwise", "bench", "config", "learners"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if made.search(line) and rel not in allowed:
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "Kafka clients made without loopwise.kafka_clients:\n" + "\n".join(found)
    app = (ROOT / "streams/app.py").read_text()
    assert "**kafka_clients.faust_broker_config(settings)" in app
    sdk = (ROOT / "producers/sdk.py").read_text()
    assert "kafka_clients.kafka_python_config(settings)" in sdk


# --- the local broker's SASL_SSL listener -----------------------------------------------------


def broker(tmp_path: Path, **options: object) -> KafkaBroker:
    return KafkaBroker("4.1.1", port=19092, controller_port=19093, state_dir=tmp_path, **options)  # type: ignore[arg-type]


def test_the_default_broker_is_plaintext_only(tmp_path: Path) -> None:
    b = broker(tmp_path)
    b._write_config()
    text = b.server_properties.read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093\n" in text
    assert "SASL" not in text and "ssl." not in text
    with pytest.raises(InfraError, match="no SASL_SSL listener"):
        _ = b.sasl_ssl_bootstrap_servers


def test_a_sasl_ssl_listener_is_configured_with_scram_plain_and_tls(tmp_path: Path) -> None:
    b = broker(
        tmp_path, sasl_ssl_port=19094, scram_users={"alice": "a-pw"}, require_client_cert=True
    )
    b._write_config()
    text = b.server_properties.read_text()
    assert "SASL_SSL://127.0.0.1:19094" in text
    assert (
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL"
        in text
    )
    assert "sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN\n" in text
    assert 'user_alice="a-pw"' in text
    assert "ssl.keystore.type=PKCS12\n" in text
    assert "listener.name.sasl_ssl.ssl.client.auth=required\n" in text
    assert b.server_properties.stat().st_mode & 0o077 == 0  # passwords inside: owner only
    assert b.sasl_ssl_bootstrap_servers == "127.0.0.1:19094"
    assert b.ca_file == tmp_path.absolute() / "tls" / "ca.pem"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sasl_ssl_port": 19092, "scram_users": {"a": "b"}}, "must differ"),
        ({"sasl_ssl_port": 19094}, "at least one user"),
        ({"scram_users": {"a": "b"}}, "need a sasl_ssl_port"),
        ({"sasl_ssl_port": 19094, "scram_users": {"a b": "pw"}}, "SCRAM user name"),
        ({"sasl_ssl_port": 19094, "scram_users": {"a": 'p"w'}}, "password of SCRAM user 'a'"),
        ({"sasl_ssl_port": 19094, "scram_users": {"a": "p,w]"}}, "password of SCRAM user 'a'"),
    ],
)
def test_broker_options_are_checked(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(InfraError, match=re.escape(message)):
        broker(tmp_path, **options)
