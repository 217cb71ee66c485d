"""The dead-letter record (docs/contracts.md): what was refused, why, and where it came from.

Errors are data: a refused message is not an exception but a record on
``loopwise.deadletter``, keyed by the original key, carrying the original
bytes so that nothing is lost and the message can be repaired and replayed.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import orjson

from loopwise.streams.decoding import Rejection


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message was read: topic, partition, offset."""

    topic: str
    partition: int
    offset: int


def deadletter_record(rejection: Rejection, source: Source, original: bytes | None) -> bytes:
    """Serialize the dead-letter record of docs/contracts.md for one refused message."""
    return orjson.dumps(
        {
            "reason": rejection.reason,
            "field": rejection.field,
            "detail": rejection.detail,
            "source": {
                "topic": source.topic,
                "partition": source.partition,
                "offset": source.offset,
            },
            "original_b64": base64.b64encode(original or b"").decode("ascii"),
        }
    )


def original_bytes(record: dict[str, object]) -> bytes:
    """The refused message's original value, from a decoded dead-letter record."""
    return base64.b64decode(str(record["original_b64"]))
