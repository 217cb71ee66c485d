"""A local Redis Cluster of N masters (Debian's redis-server in cluster mode), for the tests.

Each node is a :class:`loopwise.infra.redis_server.RedisServer` with ``cluster-enabled``
in a folder of its own. On the first start the hash slots are split evenly between the
nodes (``CLUSTER ADDSLOTSRANGE``), the nodes are introduced to each other (``CLUSTER
MEET``), and :meth:`LocalRedisCluster.start` returns once every node reports
``cluster_state:ok`` and knows all the others. No replicas: a test bed, not a deployment.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loopwise.infra.kafka_broker import InfraError
from loopwise.infra.redis_server import RedisServer

if TYPE_CHECKING:
    import redis

log = logging.getLogger("loopwise.infra")

SLOTS = 16384
BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def cluster_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` free ports whose cluster-bus ports (+10000) are free too (all below 55536)."""
    from loopwise.infra.kafka_broker import port_open

    chosen: list[int] = []
    while len(chosen) < n:
        port = random.randrange(20000, 45000)
        taken = {p for c in chosen for p in (c, c + BUS_OFFSET)}
        if {port, port + BUS_OFFSET} & taken:
            continue
        if not port_open(host, port) and not port_open(host, port + BUS_OFFSET):
            chosen.append(port)
    return chosen


class LocalRedisCluster:
    """``masters`` Redis nodes on ``ports`` of ``host``, state under ``state_dir/node-{i}``."""

    def __init__(self, state_dir: Path, ports: list[int], host: str = "127.0.0.1") -> None:
        if len(ports) < 3:
            raise InfraError("a Redis Cluster needs at least 3 masters")
        self.host = host
        self.nodes = [
            RedisServer(host, port=port, state_dir=Path(state_dir) / f"node-{i}", cluster=True)
            for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        """A node's URL: cluster clients discover the others from it."""
        return self.nodes[0].url

    def start(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start(timeout)
        except BaseException:
            self.stop()
            raise
        clients = [node.client(decode_responses=True) for node in self.nodes]
        try:
            if int(_cluster_info(clients[0]).get("cluster_slots_assigned", 0)) == 0:
                n = len(self.nodes)
                for i, client in enumerate(clients):
                    first, last = i * SLOTS // n, (i + 1) * SLOTS // n - 1
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                for node in self.nodes[1:]:
                    clients[0].execute_command("CLUSTER", "MEET", node.host, node.port)
            while not all(self._ready(c) for c in clients):
                if time.monotonic() > deadline:
                    raise InfraError(
                        f"the Redis Cluster on ports {[n.port for n in self.nodes]} did not "
                        f"reach cluster_state:ok within {timeout:.0f} s"
                    )
                time.sleep(0.2)
        finally:
            for client in clients:
                client.close()
        log.info("Redis Cluster up: %d masters on %s", len(self.nodes), self.url)

    def _ready(self, client: redis.Redis) -> bool:
        info = _cluster_info(client)
        return (
            info.get("cluster_state") == "ok"
            and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
            and int(info.get("cluster_slots_ok", 0)) == SLOTS
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict of its ``name:value`` lines."""
    text = client.execute_command("CLUSTER", "INFO")
    if isinstance(text, bytes):
        text = text.decode()
    return dict(line.split(":", 1) for line in text.split() if ":" in line)
