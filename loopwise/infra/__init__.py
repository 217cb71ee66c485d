"""Local infrastructure: a real Kafka broker and Redis server on this machine, no Docker.

``LocalInfra`` brings both up and down together; ``KafkaBroker`` and ``RedisServer`` can be
used on their own. Every failure is an ``InfraError`` whose message says what to do.
"""

from loopwise.infra.kafka_broker import InfraError, KafkaBroker
from loopwise.infra.local import LocalInfra, free_port
from loopwise.infra.redis_server import RedisServer

__all__ = ["InfraError", "KafkaBroker", "LocalInfra", "RedisServer", "free_port"]
