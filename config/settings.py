"""Typed settings for every Loopwise command.

Values come, highest precedence first, from: keyword arguments, ``LOOPWISE_*``
environment variables, a TOML config file (``LOOPWISE_CONFIG`` or ``--config``),
then the defaults below. Secrets (passwords in URLs, SASL credentials) are read
from the environment only, never from the file.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

SECRETS = frozenset(
    {"redis_password", "sasl_password", "snapshot_key", "pseudonym_key"}
)  # never printed


class ConfigError(ValueError):
    """A setting has a value that is not allowed; the message names it and what is allowed."""


class TomlFileSource(PydanticBaseSettingsSource):
    """Reads the ``[loopwise]`` table (or the top level) of a TOML file."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is None:
            return
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist (set by LOOPWISE_CONFIG or --config)"
            )
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        data = raw.get("loopwise", raw)
        secrets = SECRETS & set(data)
        if secrets:
            raise ConfigError(
                f"config file {path} sets {', '.join(sorted(secrets))}: secrets are read only from "
                "the environment (LOOPWISE_REDIS_PASSWORD, LOOPWISE_SASL_PASSWORD, "
                "LOOPWISE_SNAPSHOT_KEY, LOOPWISE_PSEUDONYM_KEY)"
            )
        _refuse_unknown(data, f"config file {path}", lambda name: name)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    """Every knob of Loopwise, with its default. Environment: ``LOOPWISE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LOOPWISE_", extra="forbid", frozen=True)

    # Where things are.
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    redis_password: SecretStr | None = Field(
        None,
        description="Redis password (environment only: LOOPWISE_REDIS_PASSWORD); with "
        "redis_username, the ACL user's",
    )
    redis_username: str | None = Field(
        None,
        description="Redis ACL user (default: the user in redis_url, else Redis's 'default' user)",
    )
    redis_ssl_ca_certs: Path | None = Field(
        None,
        description="CA certificates (PEM file) that verify the Redis server's certificate "
        "(rediss:// only; default: the system's CAs)",
    )
    redis_ssl_certfile: Path | None = Field(
        None,
        description="client certificate (PEM file) for a Redis that requires one (rediss:// only)",
    )
    redis_ssl_keyfile: Path | None = Field(
        None,
        description="private key (PEM file) of redis_ssl_certfile, if not in that file",
    )
    redis_ssl_check_hostname: bool = Field(
        True,
        description="the Redis server's certificate must name the host of redis_url "
        "(rediss:// only)",
    )
    key_prefix: str = Field("loopwise:", description="prefix of every Redis key")
    redis_cluster: bool = Field(
        False,
        description="redis_url is a node of a Redis Cluster: per-partition keys carry the "
        "hash tag {p<N>} and each events partition commits in a transaction of its own",
    )
    state_dir: Path = Field(
        Path("state"), description="folder for local infra data, logs and pid files"
    )

    # Kafka security: applied to every Kafka client Loopwise makes (loopwise.kafka_clients).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="how every Kafka client talks to the broker: PLAINTEXT, SSL (TLS), "
        "SASL_PLAINTEXT (SASL login, no TLS) or SASL_SSL (SASL login over TLS)",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None,
        validate_default=True,
        description="SASL mechanism, required with SASL_PLAINTEXT and SASL_SSL",
    )
    kafka_sasl_username: str | None = Field(
        None, validate_default=True, description="SASL user, required with SASL_* protocols"
    )
    sasl_password: SecretStr | None = Field(
        None,
        validate_default=True,
        description="SASL password, required with SASL_* protocols "
        "(environment only: LOOPWISE_SASL_PASSWORD)",
    )
    kafka_ssl_cafile: Path | None = Field(
        None,
        description="PEM file of the CA(s) that signed the broker's certificate "
        "(SSL, SASL_SSL; default: the system's CAs)",
    )
    kafka_ssl_certfile: Path | None = Field(
        None,
        description="PEM client certificate for brokers that require one (SSL, SASL_SSL); "
        "may also hold the key",
    )
    kafka_ssl_keyfile: Path | None = Field(
        None, description="PEM private key of kafka_ssl_certfile (unencrypted)"
    )
    kafka_ssl_check_hostname: bool = Field(
        True,
        validate_default=True,
        description="check that the broker's certificate names the host connected to "
        "(SSL, SASL_SSL); the certificate is verified against the CA either way",
    )

    @staticmethod
    def _security_error(message: str) -> Exception:
        from pydantic_core import PydanticCustomError

        return PydanticCustomError("kafka_security", message)

    @field_validator("kafka_sasl_mechanism", "kafka_sasl_username", "sasl_password")
    @classmethod
    def _sasl_only_with_sasl(cls, value: Any, info: Any) -> Any:
        protocol = info.data.get("kafka_security_protocol")
        name = str(info.field_name)
        shown = "LOOPWISE_" + name.upper()
        if protocol is None:  # the protocol itself was refused; that error is enough
            return value
        empty = value is None or (
            (value.get_secret_value() if isinstance(value, SecretStr) else value) == ""
        )
        if protocol.startswith("SASL_") and empty:
            allowed = (
                " to PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                if name == "kafka_sasl_mechanism"
                else (" (environment only)" if name == "sasl_password" else "")
            )
            raise cls._security_error(
                f"required with kafka_security_protocol={protocol}: set {shown}{allowed}",
            )
        if not protocol.startswith("SASL_") and value is not None:
            raise cls._security_error(
                f"only used with kafka_security_protocol SASL_PLAINTEXT or SASL_SSL, not "
                f"{protocol}: unset {shown} or set LOOPWISE_KAFKA_SECURITY_PROTOCOL to SASL_SSL",
            )
        return value

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _tls_files_exist(cls, value: Path | None, info: Any) -> Path | None:
        if value is None:
            return None
        protocol = info.data.get("kafka_security_protocol")
        if protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            raise cls._security_error(
                f"TLS files are only used with kafka_security_protocol SSL or SASL_SSL, not "
                f"{protocol}: set LOOPWISE_KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL, or unset "
                f"LOOPWISE_{str(info.field_name).upper()}",
            )
        path = Path(os.path.abspath(value.expanduser()))  # child processes may run elsewhere
        if not path.is_file() or not os.access(path, os.R_OK):
            raise cls._security_error(f"{path} is not a readable file; give the path of a PEM file")
        if (
            info.field_name == "kafka_ssl_keyfile"
            and info.data.get("kafka_ssl_certfile", 0) is None
        ):
            raise cls._security_error(
                "a key without a certificate: set LOOPWISE_KAFKA_SSL_CERTFILE too",
            )
        return path

    @field_validator("kafka_ssl_check_hostname")
    @classmethod
    def _hostname_check_with_tls(cls, value: bool, info: Any) -> bool:
        protocol = info.data.get("kafka_security_protocol")
        if not value and protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            raise cls._security_error(
                f"only used with kafka_security_protocol SSL or SASL_SSL, not {protocol}",
            )
        return value

    # Topics.
    events_topic: str = "loopwise.events"
    deadletter_topic: str = "loopwise.deadletter"
    propensity_log_topic: str = "loopwise.propensity-log"
    topic_partitions: int = Field(
        4, ge=1, le=1024, description="partitions of topics Loopwise creates"
    )

    # Worker.
    app_id: str = Field("loopwise-worker", description="Faust app id = Kafka consumer group")
    batch_size: int = Field(2000, ge=1, le=100_000, description="max events per processed batch")
    batch_within_s: float = Field(
        0.2,
        gt=0,
        le=60,
        description="a batch takes the events there now and waits for more only while they "
        "keep coming, this many seconds at most",
    )
    max_event_bytes: int = Field(
        65_536, ge=256, le=10_485_760, description="larger events are dead-lettered unread"
    )
    max_log_record_bytes: int = Field(
        900_000,
        ge=10_000,
        le=100_000_000,
        description="a larger propensity-log record is dead-lettered (log_record_too_large) "
        "instead of logged: keep it under the broker's message.max.bytes (1 MiB by default)",
    )
    max_future_skew_ms: int = Field(
        300_000,
        ge=0,
        description="events dated further ahead of the worker's clock are dead-lettered "
        "(out_of_range, timestamp): a producer's clock cannot close decisions early",
    )
    dedupe_window_s: int = Field(
        3_600,
        ge=60,
        description="an event_id applied within this many seconds is a duplicate when sent "
        "again (redelivered messages are recognised by offset, whatever their age); Redis "
        "keeps ~56 bytes per event for one to two windows",
    )
    recover_gaps: bool = Field(
        True,
        description="re-read offsets acked to Kafka that Redis does not hold (it lost its "
        "last writes); turn off if you move the group's offsets forward on purpose",
    )
    recent_items: int = Field(20, ge=0, le=1000, description="how many last items to keep per user")
    affinity_half_life_ms: int = Field(
        7 * 86_400_000, ge=1, description="half-life of category affinities (event time)"
    )
    affinity_weights: dict[str, float] = Field(
        default_factory=lambda: {"view": 1.0, "click": 3.0, "purchase": 10.0},
        description="affinity added per event type",
    )
    worker_log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines of every command: text, or one JSON object per line"
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus metrics port of the worker (0: off)"
    )

    # Learning loop.
    attribution_window_ms: int = Field(
        600_000, ge=1, description="how long a decision collects rewards"
    )
    default_reward: float = Field(
        0.0, description="reward of a decision whose window saw no reward"
    )
    reward_click: float = Field(1.0, description="reward for at least one click in the window")
    reward_purchase: float = Field(
        0.0, description="reward for at least one purchase in the window"
    )
    reward_revenue: float = Field(0.0, description="reward per unit of revenue (price x quantity)")
    arms: dict[str, float] = Field(
        default_factory=lambda: {"vw": 0.9, "popularity": 0.1},
        description="experiment arms (policy name -> share of users); shares sum to 1",
    )
    holdout_arm: str = Field(
        "popularity", description="the non-personalized arm, also for no-consent users"
    )
    vw_args: str | None = Field(
        None,
        description="Vowpal Wabbit arguments (default: measured squarecb); learning options "
        "only (nothing that reads or writes files)",
    )
    snapshot_key: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key signing model snapshots; when set, unsigned or "
        "badly signed snapshots are refused (environment only: LOOPWISE_SNAPSHOT_KEY)",
    )
    pseudonym_key: SecretStr | None = Field(
        None,
        description="turns pseudonymization on: user ids are replaced by HMAC-SHA256 "
        "pseudonyms before anything is stored, and the log and the models see a random "
        "per-user token that forget deletes (environment only: LOOPWISE_PSEUDONYM_KEY, "
        "at least 16 characters)",
    )
    pmf_floor: float = Field(0.001, ge=0, lt=1, description="least probability of every candidate")
    max_candidates: int = Field(100, ge=2, le=10_000, description="candidates per decision")
    nba_ttl_s: int = Field(
        86_400, ge=1, description="lifetime of nba:{user_id} and stored decisions"
    )
    superseded_decision_ttl_s: int = Field(
        120,
        ge=1,
        description="how long a decision stays showable once a newer one replaced it in "
        "nba:{user_id} (a serving layer may have read it just before)",
    )
    decision_interval_ms: int = Field(
        0,
        ge=0,
        description="staleness budget: a user decided less than this long ago is decided "
        "again only when it is over (with their latest state), so a busy user costs one "
        "decision per interval; 0: every batch that touches a user decides for them",
    )
    replaced_decisions_kept: int = Field(
        2,
        ge=0,
        description="how many replaced decisions per user stay showable (each for "
        "superseded_decision_ttl_s); an older one is deleted at once, so stored decisions "
        "stay below (1 + this) per user whatever the decision rate",
    )
    snapshot_interval_s: float = Field(5.0, gt=0, description="how often models are snapshotted")
    learner_lease_s: float = Field(
        10.0,
        ge=1,
        description="one worker at a time learns, holding a lease in Redis this long "
        "(renewed every third of it); when it dies another worker learns after this long",
    )
    model_reload_s: float = Field(
        1.0,
        gt=0,
        description="how often a worker that does not learn looks for a newer model "
        "snapshot to decide with",
    )
    learn_sample_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of propensity-log records the policies learn, chosen by a hash of "
        "decision_id (the same records whichever worker learns); for a log faster than one "
        "learner (~2,000 records/s); the log keeps every record for replay",
    )
    decisions: bool = Field(True, description="run the learning loop (false: user state only)")

    # Local infrastructure.
    kafka_version: str = Field(
        "4.1.1", description="Apache Kafka broker release fetched from Maven Central"
    )
    kafka_controller_port: int = Field(9093, ge=1, le=65535)

    @field_validator("pseudonym_key")
    @classmethod
    def _pseudonym_key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (a random secret)")
        return value

    @field_validator("vw_args")
    @classmethod
    def _vw_args_learn_only(cls, value: str | None) -> str | None:
        from loopwise.learners.vw_options import check_vw_args

        if value is not None:
            check_vw_args(value)
        return value

    @field_validator("arms")
    @classmethod
    def _arms_are_shares(cls, value: dict[str, float]) -> dict[str, float]:
        known = {"vw", "linucb", "popularity"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown arm(s) {sorted(unknown)}; known policies: {sorted(known)}")
        if any(share < 0 for share in value.values()) or abs(sum(value.values()) - 1) > 1e-9:
            raise ValueError(
                'shares must be >= 0 and sum to 1, e.g. {"vw": 0.9, "popularity": 0.1}'
            )
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix_is_printable(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a non-empty string without whitespace, e.g. 'loopwise:'")
        return value

    @field_validator("redis_cluster")
    @classmethod
    def _cluster_keys_can_be_tagged(cls, value: bool, info: Any) -> bool:
        prefix = info.data.get("key_prefix") or ""
        if value and ("{" in prefix or "}" in prefix):
            raise ValueError(
                f"with redis_cluster the key prefix {prefix!r} (key_prefix) must not contain "
                "'{' or '}': Loopwise places the keys' hash tags itself"
            )
        if value and (info.data.get("redis_url") or "").startswith("unix://"):
            raise ValueError("a Redis Cluster is reached over TCP: use a redis:// or rediss:// url")
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_have_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{server!r} is not host:port; expected e.g. '127.0.0.1:9092'")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must start with redis://, rediss:// or unix://, e.g. 'redis://127.0.0.1:6379/0'"
            )
        return value

    @field_validator("redis_password", "redis_username")
    @classmethod
    def _redis_credentials(cls, value: Any, info: Any) -> Any:
        """Each credential in one place: the setting, or redis_url (not two different ones)."""
        from urllib.parse import unquote, urlsplit

        if value is None:
            return None
        url = urlsplit(info.data.get("redis_url") or "")
        if info.field_name == "redis_password":
            if url.password is not None:  # the message shows neither password
                raise ValueError(
                    "redis_url carries a password too; give it in one place (preferably "
                    "LOOPWISE_REDIS_PASSWORD, and a URL without it)"
                )
            return value
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a Redis ACL user name: non-empty, without whitespace")
        if url.username and unquote(url.username) != value:
            raise ValueError(
                f"redis_url names another user ({unquote(url.username)!r}); name the user in "
                "one place, or the same user in both"
            )
        return value

    @field_validator("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile")
    @classmethod
    def _redis_tls_file(cls, value: Path | None, info: Any) -> Path | None:
        if value is None:
            return None
        url = info.data.get("redis_url")
        if url is not None and not url.startswith("rediss://"):
            raise ValueError(
                "TLS files apply only to a rediss:// redis_url (this one is not TLS); use "
                "rediss://HOST:PORT/DB, or unset this setting"
            )
        if not value.is_file():
            raise ValueError(f"must be an existing PEM file; {str(value)!r} is not a file")
        if (
            info.field_name == "redis_ssl_keyfile"
            and info.data.get("redis_ssl_certfile", 0) is None
        ):
            raise ValueError("is the key of redis_ssl_certfile, which is not set; set both")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("LOOPWISE_CONFIG")
        return (
            init_settings,
            env_settings,
            TomlFileSource(settings_cls, Path(path) if path else None),
        )

    # Derived values.
    @property
    def decision_ttl_s(self) -> int:
        """Lifetime of a stored decision: its next-best-action's plus the attribution window."""
        return self.nba_ttl_s + self.attribution_window_ms // 1000 + 1

    def key(self, *parts: str) -> str:
        """The Redis key ``{prefix}{part0}:{part1}…``; on a Redis Cluster the model's keys
        (``model``, ``model:lease``, written together by one script) carry the hash tag
        ``{model}``: ``{prefix}{model}:model``."""
        if self.redis_cluster and parts and parts[0] == "model":
            return self.key_prefix + "{model}:" + ":".join(parts)
        return self.key_prefix + ":".join(parts)

    def partition_key(self, partition: int, *parts: str) -> str:
        """The key of a per-partition family (``user``, ``seen``, ``positions``, ``stats``,
        ``join``, ``outbox``, ``decision``, ``forgotten``) for a user or an event of events
        partition ``partition``: :meth:`key`, and on a Redis Cluster with the partition's
        hash tag after the prefix, ``{prefix}{p3}:user:u-42``, so that one partition's
        batch writes one slot in one transaction."""
        if self.redis_cluster:
            return f"{self.key_prefix}{{p{partition}}}:" + ":".join(parts)
        return self.key_prefix + ":".join(parts)

    def partition_pattern(self, *parts: str) -> str:
        """A SCAN MATCH pattern of a per-partition family's keys over every partition:
        ``parts`` may end in ``*``; the prefix is matched literally."""
        prefix = "".join("\\" + c if c in "\\*?[]" else c for c in self.key_prefix)
        return prefix + ("{p*}:" if self.redis_cluster else "") + ":".join(parts)

    def as_env(self) -> dict[str, str]:
        """These settings as ``LOOPWISE_*`` variables, to hand to a child process."""
        env = {}
        for name, value in self.model_dump(exclude_none=True).items():
            if isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif isinstance(value, dict):
                text = orjson.dumps(value).decode()
            else:
                text = str(value)
            env["LOOPWISE_" + name.upper()] = text
        return env

    def pseudonym(self, user_id: str) -> str:
        """The id Loopwise stores for ``user_id``: the id itself, or with ``pseudonym_key``
        its pseudonym (:func:`loopwise.pseudonyms.pseudonym`), as in ``nba:{pseudonym}``."""
        if self.pseudonym_key is None:
            return user_id
        from loopwise.pseudonyms import pseudonym

        return pseudonym(self.pseudonym_key.get_secret_value().encode(), user_id)

    @property
    def snapshot_key_bytes(self) -> bytes | None:
        """The snapshot signing key as bytes (None: snapshots are neither signed nor checked)."""
        key = self.snapshot_key
        return None if key is None else key.get_secret_value().encode()

    @property
    def kafka_port(self) -> int:
        return int(self.bootstrap_servers.split(",")[0].rpartition(":")[2])

    @property
    def redis_port(self) -> int:
        from urllib.parse import urlparse

        return urlparse(self.redis_url).port or 6379


# LOOPWISE_* variables that are not settings: the config file's path.
NOT_SETTINGS = frozenset({"LOOPWISE_CONFIG"})


def _refuse_unknown(names: Any, where: str, spell: Any) -> None:
    """A ``ConfigError`` naming the first of ``names`` that is no setting, and the nearest one
    (``spell`` writes a setting's name as ``where`` does)."""
    known = sorted(Settings.model_fields)
    for name in names:
        if name in Settings.model_fields:
            continue
        nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = (
            f"did you mean {spell(nearest[0])}?"
            if nearest
            else f"settings: {', '.join(spell(k) for k in known)}"
        )
        raise ConfigError(f"{where}: {spell(name)} is not a Loopwise setting; {hint}")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, turning pydantic's errors into one ``ConfigError`` a user can act on.

    An unknown ``LOOPWISE_*`` variable or config-file key is an error naming it and the
    nearest setting (a typo must not silently leave a default in place)."""
    if config_file is not None:
        os.environ["LOOPWISE_CONFIG"] = str(config_file)
    env_names = [
        var[len("LOOPWISE_") :].lower()
        for var in os.environ
        if var.upper().startswith("LOOPWISE_") and var.upper() not in NOT_SETTINGS
    ]
    _refuse_unknown(env_names, "environment", lambda name: "LOOPWISE_" + name.upper())
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "?"
            env = "LOOPWISE_" + str(err["loc"][0]).upper() if err["loc"] else ""
            allowed = _allowed(err)
            shown = "<hidden>" if name in SECRETS else repr(err.get("input"))
            lines.append(f"setting '{name}' ({env}) = {shown}: {err['msg']}{allowed}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def _allowed(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        known = ", ".join(sorted(Settings.model_fields))
        return f" (unknown setting; known settings: {known})"
    return ""
