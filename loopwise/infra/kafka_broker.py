"""A real single-node Apache Kafka broker (KRaft mode), run from jars fetched from Maven Central.

No Docker and no tarball: ``mvn dependency:copy-dependencies`` over a tiny generated pom gives
the broker's classpath, cached once per version outside the repo, and the machine's Java runs
``kafka.Kafka`` with a config written here. The process plumbing at the bottom of this module
(pid files, locks, detached start, process-group stop) is shared with
:mod:`loopwise.infra.redis_server`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

log = logging.getLogger("loopwise.infra")

#: Pinned because Maven 3.8's default maven-dependency-plugin is too old to be trusted.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
_LOG4J = "org.apache.logging.log4j"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: SCRAM users: names and passwords go into ``--add-scram 'MECH=[name=N,password=P]'`` and a
#: JAAS line in server.properties, so characters those syntaxes give a meaning are refused.
_SCRAM_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SCRAM_PASSWORD = re.compile(r"[A-Za-z0-9._~!@#$%^&*()+:;?/|{}<>-]{1,128}")
#: The SASL mechanisms of the SASL_SSL listener; every user exists for each of them.
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


class InfraError(RuntimeError):
    """Local infrastructure could not be fetched, started or stopped; the message says why."""


def _version_tuple(version: str) -> tuple[int, int, int]:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise InfraError(f"Kafka version {version!r} is not MAJOR.MINOR.PATCH, e.g. '4.1.1'")
    return int(parts[0]), int(parts[1]), int(parts[2])


def logging_dependencies(version: str) -> list[tuple[str, str, str]]:
    """The logging jars the broker needs beside ``kafka_2.13``: only the tarball ships them.

    Without the SLF4J binding the broker runs but logs nothing, which makes a failed start
    impossible to diagnose. Versions follow each Kafka release's own build.
    """
    v = _version_tuple(version)
    if v[:2] == (3, 9):
        return [("org.slf4j", "slf4j-reload4j", "1.7.36")]
    if v[:2] == (4, 0):
        return [(_LOG4J, a, "2.24.3") for a in ("log4j-slf4j-impl", "log4j-api", "log4j-core")]
    if (4, 1, 0) <= v <= (4, 1, 1):
        return [(_LOG4J, "log4j-slf4j-impl", "2.24.3")]
    if (4, 1, 2) <= v < (4, 3, 0):
        return [(_LOG4J, "log4j-slf4j-impl", "2.25.3")]
    if v[:2] == (4, 3):
        return [(_LOG4J, "log4j-slf4j-impl", "2.25.4")]
    raise InfraError(
        f"Kafka version {version!r} is not supported by loopwise.infra "
        "(supported: 3.9.x, 4.0.x, 4.1.x, 4.2.x, 4.3.x); set LOOPWISE_KAFKA_VERSION to one of them"
    )


def render_pom(version: str) -> str:
    """A pom whose only job is to name the broker's jars for ``dependency:copy-dependencies``."""
    deps = [("org.apache.kafka", "kafka_2.13", version), *logging_dependencies(version)]
    dep_xml = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.loopwise</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dep_xml}
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>{DEPENDENCY_PLUGIN_VERSION}</version>
      </plugin>
    </plugins>
  </build>
</project>
"""


def new_cluster_id() -> str:
    """16 random bytes, URL-safe base64 without padding, as ``StorageTool random-uuid`` makes.

    Made here so formatting needs one JVM start instead of two; an id starting with '-'
    would be read as a command-line flag, so it is redrawn.
    """
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):
            return cid


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/loopwise/kafka``, default ``~/.cache/loopwise/kafka``: outside the repo."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loopwise" / "kafka"


class KafkaBroker:
    """One single-node KRaft broker whose config, data, logs and pid file live in ``state_dir``.

    ``start`` is idempotent and ``stop`` harmless when nothing runs, so the CLI, the demo and
    the tests can all call them without first asking what state things are in.

    ``cache_dir`` is the root of the jar cache; jars live in ``cache_dir/{version}/libs``.

    By default the broker has one PLAINTEXT listener (``port``). With ``sasl_ssl_port`` it also
    has a SASL_SSL listener there: TLS with a certificate of a local CA made with ``openssl``
    in ``tls_dir`` (default ``state_dir/tls``: ``ca.pem`` for clients, the broker's PKCS12
    keystore and truststore, and a client certificate ``client.pem``/``client.key``), and SASL
    with SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN for each of ``scram_users`` (name ->
    password). The SCRAM credentials are created by Kafka's own ``StorageTool format
    --add-scram`` when the storage is first formatted. ``require_client_cert`` makes that
    listener refuse clients without a certificate signed by the CA (mutual TLS).
    """

    def __init__(
        self,
        version: str,
        host: str = "127.0.0.1",
        *,
        port: int,
        controller_port: int,
        state_dir: Path,
        cache_dir: Path | None = None,
        heap: str = "512M",
        sasl_ssl_port: int | None = None,
        scram_users: Mapping[str, str] | None = None,
        tls_dir: Path | None = None,
        require_client_cert: bool = False,
    ) -> None:
        logging_dependencies(version)  # reject an unsupported version now, not at start
        if port == controller_port:
            raise InfraError(f"Kafka port and controller port must differ (both are {port})")
        if sasl_ssl_port is not None and sasl_ssl_port in (port, controller_port):
            raise InfraError(
                f"the SASL_SSL port must differ from the Kafka and controller ports "
                f"({sasl_ssl_port})"
            )
        users = dict(scram_users or {})
        if sasl_ssl_port is None and (users or tls_dir is not None or require_client_cert):
            raise InfraError("scram_users, tls_dir and require_client_cert need a sasl_ssl_port")
        if sasl_ssl_port is not None and not users:
            raise InfraError("a SASL_SSL listener needs at least one user in scram_users")
        for name, password in users.items():
            if not _SCRAM_NAME.fullmatch(name):
                raise InfraError(f"SCRAM user name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
            if not _SCRAM_PASSWORD.fullmatch(password):
                raise InfraError(
                    f"the password of SCRAM user {name!r}: use 1-128 letters, digits and "
                    "punctuation other than quotes, backslash, comma, = and brackets"
                )
        self.version = version
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.state_dir = Path(state_dir).absolute()
        self.cache_dir = Path(cache_dir).absolute() if cache_dir else default_cache_dir()
        self.heap = heap
        self.sasl_ssl_port = sasl_ssl_port
        self.scram_users = users
        self.tls_dir = Path(tls_dir).absolute() if tls_dir else self.state_dir / "tls"
        self.require_client_cert = require_client_cert

    def __repr__(self) -> str:
        return (
            f"KafkaBroker(version={self.version!r}, bootstrap={self.bootstrap_servers!r}, "
            f"controller_port={self.controller_port}, state_dir={str(self.state_dir)!r})"
        )

    # Where things are.
    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        """``host:port`` of the SASL_SSL listener (an error when the broker has none)."""
        if self.sasl_ssl_port is None:
            raise InfraError("this broker has no SASL_SSL listener (no sasl_ssl_port)")
        return f"{self.host}:{self.sasl_ssl_port}"

    @property
    def ca_file(self) -> Path:
        """PEM certificate of the local CA that signed the broker's (``kafka_ssl_cafile``)."""
        return self.tls_dir / "ca.pem"

    @property
    def client_cert_file(self) -> Path:
        """PEM client certificate signed by the local CA (``kafka_ssl_certfile``)."""
        return self.tls_dir / "client.pem"

    @property
    def client_key_file(self) -> Path:
        """Unencrypted PEM key of :attr:`client_cert_file` (``kafka_ssl_keyfile``)."""
        return self.tls_dir / "client.key"

    @property
    def jars_dir(self) -> Path:
        return self.cache_dir / self.version / "libs"

    @property
    def server_properties(self) -> Path:
        return self.state_dir / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "kraft-logs"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def server_log(self) -> Path:
        return self.logs_dir / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "kafka.pid"

    @property
    def _legacy_logging(self) -> bool:
        """3.9.x logs through reload4j (log4j 1 properties), 4.x through Log4j 2."""
        return _version_tuple(self.version) < (4, 0, 0)

    @property
    def _logging_config(self) -> Path:
        name = "log4j.properties" if self._legacy_logging else "log4j2.yaml"
        return self.state_dir / name

    # Jars.
    def ensure_jars(self) -> Path:
        """The broker's classpath folder, fetched once per version with ``mvn``.

        The fetch goes to a temporary folder renamed into place, under a file lock, so a
        half-finished download is never used and two concurrent starts fetch once.
        """
        libs = self.jars_dir
        if self._has_jars(libs):
            return libs
        with file_lock(libs.parent / ".fetch.lock", f"fetch of Kafka {self.version} jars"):
            if self._has_jars(libs):
                return libs
            if libs.exists():  # e.g. jars deleted by hand: fetch everything again
                shutil.rmtree(libs)
            mvn = shutil.which("mvn")
            if mvn is None:
                raise InfraError(
                    "mvn not found on PATH: it fetches the Kafka broker's jars from Maven "
                    "Central; install Maven (Debian: apt-get install maven)"
                )
            log.info(
                "fetching Kafka %s jars from Maven Central into %s (once per version)...",
                self.version,
                libs,
            )
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=libs.parent) as tmp:
                pom = Path(tmp) / "pom.xml"
                pom.write_text(render_pom(self.version))
                cmd = [mvn, "-q", "-B", "dependency:copy-dependencies", "-DoutputDirectory=libs"]
                try:
                    result = subprocess.run(
                        cmd, cwd=tmp, capture_output=True, text=True, timeout=900, check=False
                    )
                except subprocess.TimeoutExpired as exc:
                    raise InfraError(
                        f"mvn did not finish fetching Kafka {self.version} jars in 900 s"
                    ) from exc
                output = (result.stdout or "") + (result.stderr or "")
                fetched = Path(tmp) / "libs"
                if result.returncode != 0 or not self._has_jars(fetched):
                    raise InfraError(
                        f"mvn could not fetch the Kafka {self.version} jars "
                        f"(exit code {result.returncode}; is Maven Central reachable?). "
                        f"Last lines of its output:\n{_last_lines(output, 40)}"
                    )
                shutil.copyfile(pom, libs.parent / "pom.xml")
                fetched.rename(libs)
            log.info(
                "fetched %d Kafka %s jars in %.1f s",
                len(list(libs.glob("*.jar"))),
                self.version,
                time.monotonic() - started,
            )
        return libs

    def _has_jars(self, libs: Path) -> bool:
        return (libs / f"kafka_2.13-{self.version}.jar").is_file()

    # Lifecycle.
    def start(self, timeout: float = 90) -> None:
        """Start the broker unless ours already runs; return once it answers a metadata request.

        A broker that does not answer within ``timeout`` seconds is killed and the error carries
        the tail of its log.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.state_dir / ".lock", f"Kafka in {self.state_dir}"):
            if self.is_up():
                log.debug("Kafka already up on %s (pid %s)", self.bootstrap_servers, self.pid())
                return
            stale = self.pid()
            if stale is not None:  # ours, alive, but not listening: hung or half started
                log.warning("Kafka pid %d does not accept connections; restarting it", stale)
                self._stop_unlocked(timeout=30)
            ports = [self.port, self.controller_port]
            if self.sasl_ssl_port is not None:
                ports.append(self.sasl_ssl_port)
            for port in ports:
                if port_open(self.host, port):
                    raise InfraError(
                        f"{self.host}:{port} is already in use by a process that is not the Kafka "
                        f"broker of {self.state_dir}; stop it or choose other ports "
                        "(LOOPWISE_BOOTSTRAP_SERVERS, LOOPWISE_KAFKA_CONTROLLER_PORT)"
                    )
            java = find_java()
            libs = self.ensure_jars()
            if self.sasl_ssl_port is not None:
                self._ensure_tls(java)
            self._write_config()
            self._format_storage(java, libs)
            log.info("starting Kafka %s on %s...", self.version, self.bootstrap_servers)
            argv = [
                java,
                f"-Xmx{self.heap}",
                f"-Xms{self.heap}",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                *self._logging_flags(),
                "-cp",
                str(libs / "*"),
                "kafka.Kafka",
                str(self.server_properties),
            ]
            started = time.monotonic()
            pid = spawn_detached(argv, self.logs_dir / "stdout.log")
            self.pid_file.write_text(f"{pid}\n")
            try:
                self._wait_ready(pid, started + timeout, timeout)
            except BaseException:
                self._stop_unlocked(timeout=10)
                raise
            log.info(
                "Kafka up on %s (pid %d) in %.1f s",
                self.bootstrap_servers,
                pid,
                time.monotonic() - started,
            )

    def stop(self, timeout: float = 30) -> None:
        """Stop our broker (SIGTERM, then SIGKILL after ``timeout``); harmless when none runs."""
        if not self.state_dir.is_dir():
            return
        with file_lock(self.state_dir / ".lock", f"Kafka in {self.state_dir}"):
            self._stop_unlocked(timeout)

    def _stop_unlocked(self, timeout: float) -> None:
        pid = self.pid()
        if pid is not None:
            log.info("stopping Kafka on %s (pid %d)...", self.bootstrap_servers, pid)
            terminate(pid, timeout)
        self.pid_file.unlink(missing_ok=True)

    def pid(self) -> int | None:
        """The pid of this state dir's broker if it is alive (a recycled pid does not count)."""
        marker = str(self.server_properties)
        return read_live_pid(self.pid_file, lambda cmdline: marker in cmdline)

    def is_up(self) -> bool:
        """Our broker's process is alive and its port accepts connections."""
        return self.pid() is not None and port_open(self.host, self.port)

    # Startup steps.
    def _logging_flags(self) -> list[str]:
        flags = [f"-Dkafka.logs.dir={self.logs_dir}"]
        if self._legacy_logging:
            flags.append(f"-Dlog4j.configuration=file:{self._logging_config}")
        else:
            flags.append(f"-Dlog4j2.configurationFile={self._logging_config}")
        return flags

    def _write_config(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        h, p, c = self.host, self.port, self.controller_port
        listeners = f"PLAINTEXT://{h}:{p},CONTROLLER://{h}:{c}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        if self.sasl_ssl_port is not None:
            listeners += f",SASL_SSL://{h}:{self.sasl_ssl_port}"
            protocols += ",SASL_SSL:SASL_SSL"
        # The SASL_SSL listener holds passwords: nobody else may read the file.
        self.server_properties.touch(mode=0o600, exist_ok=True)
        self.server_properties.chmod(0o600)
        self.server_properties.write_text(
            "# Written by loopwise.infra on every start; edits are overwritten.\n"
            "process.roles=broker,controller\n"
            "node.id=1\n"
            f"controller.quorum.bootstrap.servers={h}:{c}\n"
            f"listeners={listeners}\n"
            f"advertised.listeners={listeners}\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            "controller.listener.names=CONTROLLER\n"
            f"listener.security.protocol.map={protocols}\n"
            f"log.dirs={self.data_dir}\n"
            "num.partitions=1\n"
            "offsets.topic.replication.factor=1\n"
            "offsets.topic.num.partitions=4\n"
            "transaction.state.log.replication.factor=1\n"
            "transaction.state.log.min.isr=1\n"
            "share.coordinator.state.topic.replication.factor=1\n"
            "share.coordinator.state.topic.min.isr=1\n"
            "group.initial.rebalance.delay.ms=0\n" + self._sasl_ssl_config()
        )
        if self._legacy_logging:
            self._logging_config.write_text(
                "log4j.rootLogger=INFO, F\n"
                "log4j.appender.F=org.apache.log4j.FileAppender\n"
                "log4j.appender.F.File=${kafka.logs.dir}/server.log\n"
                "log4j.appender.F.layout=org.apache.log4j.PatternLayout\n"
                "log4j.appender.F.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            )
        else:
            self._logging_config.write_text(
                "Configuration:\n"
                "  Appenders:\n"
                "    File:\n"
                "      name: F\n"
                '      fileName: "${sys:kafka.logs.dir}/server.log"\n'
                "      PatternLayout:\n"
                '        pattern: "[%d] %p %m (%c)%n"\n'
                "  Loggers:\n"
                "    Root:\n"
                "      level: INFO\n"
                "      AppenderRef:\n"
                "        - ref: F\n"
            )

    def _sasl_ssl_config(self) -> str:
        """server.properties lines of the SASL_SSL listener ("" without one)."""
        if self.sasl_ssl_port is None:
            return ""
        password = self._store_password()
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        plain_users = " ".join(f'user_{n}="{pw}"' for n, pw in sorted(self.scram_users.items()))
        plain = f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};"
        return (
            f"sasl.enabled.mechanisms={','.join(SASL_MECHANISMS)}\n"
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}\n"
            f"listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={scram}\n"
            f"listener.name.sasl_ssl.plain.sasl.jaas.config={plain}\n"
            "ssl.keystore.type=PKCS12\n"
            f"ssl.keystore.location={self.tls_dir / 'broker.p12'}\n"
            f"ssl.keystore.password={password}\n"
            f"ssl.key.password={password}\n"
            "ssl.truststore.type=PKCS12\n"
            f"ssl.truststore.location={self.tls_dir / 'truststore.p12'}\n"
            f"ssl.truststore.password={password}\n"
            # Only the listener-prefixed form applies to a SASL_SSL listener (KIP-684).
            "listener.name.sasl_ssl.ssl.client.auth="
            f"{'required' if self.require_client_cert else 'none'}\n"
        )

    def _store_password(self) -> str:
        """The password of the broker's keystore and truststore, made once per ``tls_dir``."""
        path = self.tls_dir / "store.password"
        if not path.is_file():
            self.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(base64.urlsafe_b64encode(os.urandom(18)).decode("ascii") + "\n")
        return path.read_text().strip()

    def _ensure_tls(self, java: str) -> None:
        """A local CA, the broker's certificate (for ``host``, ``localhost`` and 127.0.0.1) in
        a PKCS12 keystore, a PKCS12 truststore holding the CA, and a client certificate; made
        with ``openssl`` (and Java's ``keytool`` for the truststore) once per ``tls_dir``."""
        d = self.tls_dir
        names = ["DNS:localhost", "IP:127.0.0.1"]
        try:
            ipaddress.ip_address(self.host)
            own = f"IP:{self.host}"
        except ValueError:
            own = f"DNS:{self.host}"
        if own not in names:
            names.append(own)
        san = ",".join(names)
        wanted = ("broker.p12", "truststore.p12", "ca.pem", "client.pem", "client.key")
        marker = d / "broker.san"
        made = all((d / f).is_file() for f in wanted) and marker.is_file()
        if made and marker.read_text().strip() == san:
            return
        openssl = shutil.which("openssl")
        if openssl is None:
            raise InfraError(
                "openssl not found on PATH: it makes the certificates of the SASL_SSL listener "
                "(Debian: apt-get install openssl)"
            )
        keytool = Path(java).resolve().parent / "keytool"
        if not keytool.is_file():
            found = shutil.which("keytool")
            if found is None:
                raise InfraError(
                    f"keytool not found beside {java} nor on PATH (it comes with Java)"
                )
            keytool = Path(found)
        log.info("making a local CA and certificates for the SASL_SSL listener in %s", d)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        password = self._store_password()
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        run = _run_tool
        run(
            [openssl, "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem",
             "-days", "3650", "-subj", "/CN=Loopwise local CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            "making the local CA",
        )  # fmt: skip
        for who, cn, usage, alt in (
            ("broker", "localhost", "serverAuth", f"subjectAltName={san}\n"),
            ("client", "loopwise-client", "clientAuth", ""),
        ):
            (d / f"{who}.ext").write_text(
                f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{alt}"
            )
            run(
                [openssl, "req", *ec, "-keyout", d / f"{who}.key", "-out", d / f"{who}.csr",
                 "-subj", f"/CN={cn}"],
                f"making the {who} key",
            )  # fmt: skip
            run(
                [openssl, "x509", "-req", "-in", d / f"{who}.csr", "-CA", d / "ca.pem",
                 "-CAkey", d / "ca.key", "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                 "-days", "3650", "-extfile", d / f"{who}.ext", "-out", d / f"{who}.pem"],
                f"signing the {who} certificate",
            )  # fmt: skip
        (d / "broker.p12").unlink(missing_ok=True)
        run(
            [openssl, "pkcs12", "-export", "-in", d / "broker.pem", "-inkey", d / "broker.key",
             "-certfile", d / "ca.pem", "-name", "broker", "-out", d / "broker.p12",
             "-passout", "env:LW_KAFKA_STORE_PASSWORD"],
            "writing the broker's PKCS12 keystore",
            password,
        )  # fmt: skip
        (d / "truststore.p12").unlink(missing_ok=True)
        run(
            [keytool, "-importcert", "-noprompt", "-alias", "loopwise-local-ca",
             "-file", d / "ca.pem", "-keystore", d / "truststore.p12", "-storetype", "PKCS12",
             "-storepass:env", "LW_KAFKA_STORE_PASSWORD"],
            "writing the broker's PKCS12 truststore",
            password,
        )  # fmt: skip
        for path in d.iterdir():
            path.chmod(0o600)
        marker.write_text(san + "\n")

    def _users_digest(self) -> str:
        text = "\n".join(f"{n}\0{pw}" for n, pw in sorted(self.scram_users.items()))
        return hashlib.sha256(text.encode()).hexdigest()

    def _format_storage(self, java: str, libs: Path) -> None:
        """Format the KRaft log dir once; a formatted dir (``meta.properties``) is left alone.

        SCRAM users are created by this format only: a formatted dir whose users differ from
        ``scram_users`` is an error (it would silently keep the old ones)."""
        users_file = self.state_dir / "scram-users.sha256"
        if (self.data_dir / "meta.properties").is_file():
            had = users_file.read_text().strip() if users_file.is_file() else ""
            if self.scram_users and had != self._users_digest():
                raise InfraError(
                    f"the Kafka storage in {self.data_dir} was formatted with other SCRAM users "
                    f"than {sorted(self.scram_users)}; users are created when the storage is "
                    f"formatted: delete {self.state_dir} (and its topics) to format it again"
                )
            return
        cluster_id = new_cluster_id()
        log.info("formatting Kafka storage in %s (cluster id %s)", self.data_dir, cluster_id)
        argv = [
            java,
            "-Xmx256M",
            *self._logging_flags(),
            "-cp",
            str(libs / "*"),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.server_properties),
            "--standalone",
        ]
        for name, password in sorted(self.scram_users.items()):
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                argv += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            for password in self.scram_users.values():
                output = output.replace(password, "<hidden>")
            raise InfraError(
                f"formatting Kafka storage in {self.data_dir} failed (exit code "
                f"{result.returncode}):\n{_last_lines(output, 30)}"
            )
        if self.scram_users:
            users_file.write_text(self._users_digest() + "\n")

    def _wait_ready(self, pid: int, deadline: float, timeout: float) -> None:
        """Wait for a real metadata answer: an open port alone comes before the broker serves."""
        log.info(
            "waiting for Kafka on %s to answer (up to %.0f s)...", self.bootstrap_servers, timeout
        )
        last_error = "port not open yet"
        while True:
            if not process_alive(pid):
                raise InfraError(f"Kafka exited during startup. {self._log_tails()}")
            if port_open(self.host, self.port) and (
                self.sasl_ssl_port is None or port_open(self.host, self.sasl_ssl_port)
            ):
                remaining = max(1.0, deadline - time.monotonic())
                try:
                    if self._answers_metadata(min(remaining, 10.0)):
                        return
                    last_error = "metadata lists no broker yet"
                except Exception as exc:  # any client error just means "not ready yet"
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"Kafka on {self.bootstrap_servers} did not answer a metadata request within "
                    f"{timeout:.0f} s (last: {last_error}); it was killed. {self._log_tails()}"
                )
            time.sleep(0.2)

    def _answers_metadata(self, timeout: float) -> bool:
        from kafka import KafkaAdminClient  # imported late: only startup needs it

        ms = int(timeout * 1000)
        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            client_id="loopwise-infra-probe",
            request_timeout_ms=ms,
            bootstrap_timeout_ms=ms,
        )
        try:
            return bool(admin.describe_cluster().get("brokers"))
        finally:
            admin.close()

    def _log_tails(self) -> str:
        return (
            f"Last lines of {self.server_log}:\n{tail(self.server_log, 30)}\n"
            f"Last lines of {self.logs_dir / 'stdout.log'}:\n"
            f"{tail(self.logs_dir / 'stdout.log', 15)}"
        )


def _run_tool(argv: list[str | Path], what: str, store_password: str | None = None) -> None:
    """Run openssl or keytool; an :class:`InfraError` with its output when it fails. The
    store password goes through the environment, never the command line."""
    env = dict(os.environ)
    if store_password is not None:
        env["LW_KAFKA_STORE_PASSWORD"] = store_password
    try:
        result = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, timeout=120, env=env,
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InfraError(f"{what} failed: {exc}") from exc
    if result.returncode != 0:
        raise InfraError(
            f"{what} failed (exit code {result.returncode}, {Path(str(argv[0])).name}):\n"
            f"{_last_lines(result.stdout + result.stderr, 20)}"
        )


def find_java() -> str:
    """``$JAVA_HOME/bin/java`` if there is one, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise InfraError(
            "java not found (looked in $JAVA_HOME/bin and on PATH): the Kafka broker needs "
            "Java 17 or newer; install it (Debian: apt-get install openjdk-17-jre-headless) "
            "or set JAVA_HOME"
        )
    return found


# Process plumbing shared by the broker and Redis.


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            # With nothing listening on a port of the ephemeral range, a loopback connect can
            # pick that very port as its source and "connect" to itself (TCP simultaneous open).
            return bool(sock.getsockname() != sock.getpeername())
    except OSError:
        return False


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: serializes starts and stops across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process busy with the %s...", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def spawn_detached(argv: list[str], output: Path) -> int:
    """Start ``argv`` in its own session, stdout and stderr appended to ``output``; its pid.

    A new session means no terminal signal reaches it and the whole group can be stopped at
    once; ``posix_spawn`` leaves no ``Popen`` object to warn about a child still running when
    the CLI that started it exits.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(output), flags, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        return os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions, setsid=True)
    except OSError as exc:
        raise InfraError(f"could not start {argv[0]}: {exc}") from exc


def process_alive(pid: int) -> bool:
    """``pid`` runs. Our own child is reaped once it has exited, so it leaves no zombie.

    Another parent's zombie counts as dead only once all its threads are gone: a JVM's main
    thread shows state Z while its other threads are still shutting down and holding ports.
    """
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (or already reaped): look it up below
    else:
        return done != pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    state = fields.get("State", "R").split()[0]
    threads = int(fields.get("Threads", "1").strip() or 1)
    return not (state in ("Z", "X") and threads <= 1)


def read_live_pid(pid_file: Path, is_ours: Callable[[str], bool]) -> int | None:
    """The pid in ``pid_file`` if that process is alive and ``is_ours(its command line)``."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or not process_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    return pid if is_ours(cmdline) else None


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM ``pid``'s process group, wait up to ``timeout`` s, then SIGKILL it."""
    _signal_group(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout):
        return
    log.warning("pid %d did not stop within %.0f s of SIGTERM; killing it", pid, timeout)
    _signal_group(pid, signal.SIGKILL)
    if not _wait_gone(pid, 10):
        raise InfraError(f"process {pid} is still alive after SIGKILL")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:  # leader of its own group, as spawn_detached makes it
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or a note that it does not exist."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return f"({path} does not exist)"
    return _last_lines(text, lines) or "(empty)"


def _last_lines(text: str, lines: int) -> str:
    return "\n".join(_ANSI_ESCAPE.sub("", text).rstrip().splitlines()[-lines:])
