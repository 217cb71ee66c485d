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
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

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

log = logging.getLogger("loopwise.infra")


class RedisServer:
    """One ``redis-server`` whose config, data, log and pid file live in ``state_dir``.

    Persisted in an append-only file fsynced every second (see the module's docstring for
    what a crash can lose). ``start`` is idempotent and ``stop`` harmless when nothing runs.
    """

    def __init__(self, host: str = "127.0.0.1", *, port: int, state_dir: Path) -> None:
        self.host = host
        self.port = port
        self.state_dir = Path(state_dir).absolute()

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, state_dir={str(self.state_dir)!r})"

    @property
    def url(self) -> str:
        """``redis://host:port/0``: the URL clients use for this server."""
        return f"redis://{self.host}:{self.port}/0"

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
            if stale is not None:  # ours, alive, but not listening
                log.warning("Redis pid %d does not accept connections; restarting it", stale)
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
        """Our server's process is alive and its port accepts connections."""
        return self.pid() is not None and port_open(self.host, self.port)

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.conf_file.write_text(
            "# Written by loopwise.infra on every start; edits are overwritten.\n"
            f"bind {self.host}\n"
            f"port {self.port}\n"
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

    def _wait_ready(self, pid: int, deadline: float, timeout: float) -> None:
        import redis  # imported late: only startup needs it

        client = redis.Redis(
            host=self.host, port=self.port, socket_connect_timeout=0.5, socket_timeout=1.0
        )
        last_error = "no answer yet"
        try:
            while True:
                if not process_alive(pid):
                    raise InfraError(f"redis-server exited during startup. {self._log_tails()}")
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

    def _log_tails(self) -> str:
        return (
            f"Last lines of {self.log_file}:\n{tail(self.log_file, 20)}\n"
            f"Last lines of {self.logs_dir / 'stdout.log'}:\n"
            f"{tail(self.logs_dir / 'stdout.log', 10)}"
        )
