"""Debian's ``redis-server`` run by Loopwise on a port of its choosing, its files in one folder.

A private server instead of the system one: the tests and the demo pick their own port and
data folder, start and stop it without root, and never touch data someone else keeps.

**Persistence: append-only file** (``appendonly yes``, ``appendfsync everysec``, in
``state_dir/data/appendonlydir``; no RDB snapshots). Every write is appended to the file
before Redis replies to it and the file is fsynced once a second, so after a restart Redis
holds what it held before. What a crash can still lose:

- **Redis alone crashes** (kill -9, the OOM killer): nothing it acknowledged, as a rule: the
  write reached the operating system before the reply. The exception is a disk so slow that
  the previous fsync still runs: Redis then holds new writes in memory for up to 2 s.
- **The machine crashes** (power, kernel): up to ~1 s of acknowledged writes (~2 s on a
  slow disk), the part not fsynced yet.
- **Never half a batch.** A batch is one MULTI/EXEC; a transaction cut off at the end of the
  file is dropped when it is loaded (``aof-load-truncated``), so each batch is in Redis whole
  or not at all.
- **But its offsets may be committed.** The worker acks a batch after its transaction and
  Faust commits acked offsets within ``broker_commit_interval`` (1 s). After a machine crash
  the lost last second's batches may thus have committed offsets: the worker would resume
  after them and their events would be missing from Redis, silently (its epoch survived, so
  the worker has nothing to notice). ``loopwise rebuild --force`` recomputes the state from
  the events topic up to the committed offsets, those batches included; run it after a
  machine crash when exact counts matter.

A Redis that comes back empty (no persistence, a lost disk, FLUSHALL) is noticed by the
worker through its epoch key (:mod:`loopwise.streams.redis_store`): it stops, and
``loopwise rebuild`` recomputes the state from Kafka.

**Access.** With a ``password`` the server requires it: for Redis's ``default`` user
(``requirepass``), or, with a ``username``, for that ACL user (all keys, channels and
commands), the ``default`` user then being off. With ``tls`` the server listens for TLS only
(no plain port), with the certificate ``state_dir/tls/server.crt`` signed by
``state_dir/tls/ca.crt``; files missing there are generated with ``openssl`` (an EC P-256
CA, a server certificate for the host, ``localhost``, 127.0.0.1 and ::1, and with
``tls_auth_clients`` a client certificate ``client.crt``), so one's own files can be put
there instead. With ``tls_auth_clients`` the server requires a client certificate signed by
``ca.crt``. The config file holds the password: it is written readable by its owner only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopwise.infra.kafka_broker import (
    InfraError,
    file_lock,
    port_open,
    process_alive,
    read_live_pid,
    spawn_detached,
    tail,
    terminate,
)

if TYPE_CHECKING:
    import redis

log = logging.getLogger("loopwise.infra")


class RedisServer:
    """One ``redis-server`` whose config, data, log and pid file live in ``state_dir``.

    Persisted in an append-only file fsynced every second (see the module's docstring for
    what a crash can lose). ``start`` is idempotent and ``stop`` harmless when nothing runs.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        port: int,
        state_dir: Path,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        tls_auth_clients: bool = False,
        cluster: bool = False,
    ) -> None:
        if username is not None and not password:
            raise InfraError(
                f"the local Redis's ACL user {username!r} (setting redis_username) needs a "
                "password: set LOOPWISE_REDIS_PASSWORD (environment only)"
            )
        if tls_auth_clients and not tls:
            raise InfraError("client certificates need TLS: use a rediss:// redis_url")
        self.host = host
        self.port = port
        self.state_dir = Path(state_dir).absolute()
        self.username = username
        self._password = password  # never in a repr, a log line or an error
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.cluster = cluster  # a node of a Redis Cluster (loopwise.infra.redis_cluster)

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, state_dir={str(self.state_dir)!r})"

    @property
    def url(self) -> str:
        """``redis://host:port/0`` (``rediss://`` with TLS), without user or password: the URL
        clients use for this server."""
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    @property
    def tls_dir(self) -> Path:
        """``ca.crt``, ``server.crt``/``.key``, ``client.crt``/``.key``: given or generated."""
        return self.state_dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA that signs the server's certificate (clients: ``redis_ssl_ca_certs``)."""
        return self.tls_dir / "ca.crt"

    @property
    def client_cert_file(self) -> Path:
        """A client certificate signed by the CA (``redis_ssl_certfile``)."""
        return self.tls_dir / "client.crt"

    @property
    def client_key_file(self) -> Path:
        """Its key (``redis_ssl_keyfile``)."""
        return self.tls_dir / "client.key"

    def client(self, **options: Any) -> redis.Redis:
        """A client of this server with its user, password, and TLS (verifying the server's
        certificate with ``ca.crt``; with ``tls_auth_clients``, presenting ``client.crt``)."""
        import redis  # imported late: only startup and checks need it

        if self.tls:
            options.setdefault("ssl", True)
            options.setdefault("ssl_ca_certs", str(self.ca_file))
            if self.tls_auth_clients:
                options.setdefault("ssl_certfile", str(self.client_cert_file))
                options.setdefault("ssl_keyfile", str(self.client_key_file))
        options.setdefault("username", self.username)
        options.setdefault("password", self._password)
        return redis.Redis(host=self.host, port=self.port, **options)

    @property
    def conf_file(self) -> Path:
        return self.state_dir / "redis.conf"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "redis.pid"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs_dir / "redis.log"

    def start(self, timeout: float = 30) -> None:
        """Start the server unless ours already runs; return once it answers PING."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.state_dir / ".lock", f"Redis in {self.state_dir}"):
            if self.is_up():
                log.debug("Redis already up on %s (pid %s)", self.url, self.pid())
                return
            stale = self.pid()
            if stale is not None:  # ours, alive, but not answering (or not with our access)
                log.warning(
                    "Redis pid %d does not answer PING with the configured access (user, "
                    "password, TLS); restarting it",
                    stale,
                )
                terminate(stale, 10)
            if port_open(self.host, self.port):
                raise InfraError(
                    f"{self.host}:{self.port} is already in use by a process that is not the Redis "
                    f"server of {self.state_dir}; stop it or choose another port "
                    "(LOOPWISE_REDIS_URL)"
                )
            binary = shutil.which("redis-server")
            if binary is None:
                raise InfraError(
                    "redis-server not found: run `make install` (installs Debian's redis-server)"
                )
            if self.tls:
                self._ensure_tls_files()
            self._write_config()
            started = time.monotonic()
            pid = spawn_detached([binary, str(self.conf_file)], self.logs_dir / "stdout.log")
            self.pid_file.write_text(f"{pid}\n")
            try:
                self._wait_ready(pid, started + timeout, timeout)
            except BaseException:
                terminate(pid, 10)
                self.pid_file.unlink(missing_ok=True)
                raise
            log.info("Redis up on %s (pid %d) in %.1f s", self.url, pid, time.monotonic() - started)

    def stop(self, timeout: float = 30) -> None:
        """Stop our server (SIGTERM: it fsyncs the append-only file, then exits)."""
        if not self.state_dir.is_dir():
            return
        with file_lock(self.state_dir / ".lock", f"Redis in {self.state_dir}"):
            pid = self.pid()
            if pid is not None:
                log.info("stopping Redis on %s (pid %d)...", self.url, pid)
                terminate(pid, timeout)
            self.pid_file.unlink(missing_ok=True)

    def pid(self) -> int | None:
        """The pid of this state dir's server if it is alive (a recycled pid does not count)."""
        conf, port = str(self.conf_file), f":{self.port}"

        # Redis rewrites its process title to "redis-server host:port" once it runs.
        def is_ours(cmdline: str) -> bool:
            return "redis-server" in cmdline and (conf in cmdline or port in cmdline)

        return read_live_pid(self.pid_file, is_ours)

    def is_up(self) -> bool:
        """Our server's process is alive and answers PING with our user, password and TLS."""
        if self.pid() is None or not port_open(self.host, self.port):
            return False
        import redis  # imported late: only startup and checks need it

        client = self.client(socket_connect_timeout=1.0, socket_timeout=2.0, retry=None)
        try:
            return bool(client.ping())
        except redis.BusyLoadingError:
            return True  # up, loading its append-only file
        except redis.AuthenticationError as exc:
            log.info("Redis on %s runs but refuses the configured user/password: %s", self.url, exc)
            return False
        except redis.RedisError as exc:
            log.debug("Redis on %s does not answer PING: %s", self.url, exc)
            return False
        finally:
            client.close()

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            tls = self.tls_dir
            listen = (
                "port 0\n"
                f"tls-port {self.port}\n"
                f"tls-cert-file {_quoted(str(tls / 'server.crt'))}\n"
                f"tls-key-file {_quoted(str(tls / 'server.key'))}\n"
                f"tls-ca-cert-file {_quoted(str(self.ca_file))}\n"
                f"tls-auth-clients {'yes' if self.tls_auth_clients else 'no'}\n"
            )
        else:
            listen = f"port {self.port}\n"
        if self._password is None:
            access = ""
        elif self.username is None or self.username == "default":
            access = f"requirepass {_quoted(self._password)}\n"
        else:
            access = (
                "user default off\n"
                f"user {_quoted(self.username)} on {_quoted('>' + self._password)} "
                "~* &* +@all\n"
            )
        # The file may hold a password: readable by its owner only, from the first byte on.
        self.conf_file.unlink(missing_ok=True)
        fd = os.open(self.conf_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as conf:
            conf.write(
                "# Written by loopwise.infra on every start; edits are overwritten.\n"
                f"bind {self.host}\n"
                f"{listen}"
                f"{access}"
                "protected-mode yes\n"
                "daemonize no\n"
                f'pidfile "{self.pid_file}"\n'
                f'logfile "{self.log_file}"\n'
                "loglevel notice\n"
                f'dir "{self.data_dir}"\n'
                'save ""\n'
                "appendonly yes\n"
                'appenddirname "appendonlydir"\n'
                "appendfsync everysec\n"
                "aof-load-truncated yes\n"
            )
            if self.cluster:
                conf.write(
                    "cluster-enabled yes\n"
                    f'cluster-config-file "{self.state_dir / "nodes.conf"}"\n'
                    "cluster-node-timeout 5000\n"
                )

    def _ensure_tls_files(self) -> None:
        """Generate what is missing of ``ca.crt``/``.key``, ``server.crt``/``.key`` (and with
        ``tls_auth_clients`` ``client.crt``/``.key``) in ``tls_dir``; keep what is there."""
        tls = self.tls_dir
        tls.mkdir(parents=True, exist_ok=True)
        leaves = ["server"] + (["client"] if self.tls_auth_clients else [])
        missing = [
            leaf
            for leaf in leaves
            if not (tls / f"{leaf}.crt").is_file() or not (tls / f"{leaf}.key").is_file()
        ]
        if not missing and self.ca_file.is_file():
            return
        openssl = shutil.which("openssl")
        if openssl is None:
            raise InfraError(
                f"openssl not found, and TLS needs certificates in {tls} (ca.crt, server.crt, "
                "server.key): install openssl (apt-get install openssl), or put your own there"
            )
        ca_key = tls / "ca.key"
        if not self.ca_file.is_file():
            if not missing:
                raise InfraError(
                    f"{tls} has server.crt but no ca.crt: put the CA that signed it there "
                    "(clients verify the server with it), or remove the server's files to "
                    "generate all anew"
                )
            log.info("generating a CA for the local Redis's TLS in %s", tls)
            self._openssl(
                openssl,
                ["req", "-x509", "-extensions", "ca", "-days", "3650", "-keyout", str(ca_key)],
                ["-out", str(self.ca_file), "-subj", "/CN=Loopwise local Redis CA"],
            )
        if missing and not ca_key.is_file():
            raise InfraError(
                f"{tls} has ca.crt but not its key ca.key, needed to sign "
                f"{' and '.join(f'{leaf}.crt' for leaf in missing)}: put those files there "
                "too, or remove ca.crt to generate all anew"
            )
        for leaf in missing:
            csr = tls / f"{leaf}.csr"
            log.info("generating the local Redis's TLS %s certificate in %s", leaf, tls)
            self._openssl(
                openssl,
                ["req", "-new", "-keyout", str(tls / f"{leaf}.key"), "-out", str(csr)],
                ["-subj", f"/CN=loopwise-redis-{leaf}"],
            )
            self._openssl(
                openssl,
                ["x509", "-req", "-in", str(csr), "-CA", str(self.ca_file), "-CAkey", str(ca_key)],
                ["-set_serial", "0x" + secrets.token_hex(16), "-days", "825"],
                ["-extfile", str(tls / "openssl.cnf"), "-extensions", leaf],
                ["-out", str(tls / f"{leaf}.crt")],
            )
            csr.unlink()
        for certificate in tls.glob("*.crt"):  # public; the keys stay owner-only
            certificate.chmod(0o644)

    def _openssl(self, openssl: str, *parts: list[str]) -> None:
        """``openssl`` with the arguments ``parts`` and our config (``req``: EC P-256 keys,
        unencrypted, readable by their owner only)."""
        command, *args = [arg for part in parts for arg in part]
        config = self.tls_dir / "openssl.cnf"
        host = self.host.strip("[]")
        try:
            ipaddress.ip_address(host)
            extra = f", IP:{host}"
        except ValueError:
            extra = f", DNS:{host}"
        config.write_text(_OPENSSL_CONFIG.format(alt_names=_ALT_NAMES + extra))
        keygen = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        argv = [openssl, command, *(["-config", str(config), *keygen] if command == "req" else [])]
        old_umask = os.umask(0o077)  # keys readable by their owner only
        try:
            done = subprocess.run([*argv, *args], capture_output=True, text=True, check=False)
        finally:
            os.umask(old_umask)
        if done.returncode != 0:
            raise InfraError(
                f"openssl {command} failed (exit code {done.returncode}) making the local "
                f"Redis's TLS files in {self.tls_dir}: {done.stderr.strip()[-2000:]}"
            )

    def _wait_ready(self, pid: int, deadline: float, timeout: float) -> None:
        import redis  # imported late: only startup needs it

        client = self.client(socket_connect_timeout=0.5, socket_timeout=1.0, retry=None)
        last_error = "no answer yet"
        try:
            while True:
                if not process_alive(pid):
                    raise InfraError(
                        f"redis-server exited during startup.{self._tls_hint()} {self._log_tails()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.RedisError as exc:  # refused or still loading: not ready yet
                    last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise InfraError(
                        f"Redis on {self.url} did not answer PING within {timeout:.0f} s "
                        f"(last: {last_error}); it was killed. {self._log_tails()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _tls_hint(self) -> str:
        """What to do when a TLS server did not start for want of TLS in the binary."""
        if not self.tls:
            return ""
        log_text = tail(self.log_file, 50) + tail(self.logs_dir / "stdout.log", 20)
        if "tls" not in log_text.lower() and "ssl" not in log_text.lower():
            return ""
        return (
            " If its log says TLS is not supported or not available, this redis-server was "
            "built without TLS (Debian's is built with it): install one that has it, or use "
            "a redis:// redis_url."
        )

    def _log_tails(self) -> str:
        return (
            f"Last lines of {self.log_file}:\n{tail(self.log_file, 20)}\n"
            f"Last lines of {self.logs_dir / 'stdout.log'}:\n"
            f"{tail(self.logs_dir / 'stdout.log', 10)}"
        )


def _quoted(value: str) -> str:
    """``value`` as one double-quoted argument of redis.conf (quotes, backslashes and
    unprintable characters escaped), so that no password can break the file."""
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable() and ord(char) < 128:
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return '"' + "".join(out) + '"'


_ALT_NAMES = "DNS:localhost, IP:127.0.0.1, IP:::1"

_OPENSSL_CONFIG = """\
# Written by loopwise.infra to make the local Redis's TLS files.
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = {alt_names}
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
