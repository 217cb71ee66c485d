"""The dead-letter record (docs/contracts.md): what was refused, why, and where it came from.

Errors are data: a refused message is not an exception but a record on
``loopwise.deadletter``, keyed by the original key, carrying the original
bytes so that nothing is lost and the message can be repaired and replayed.

A dead-letter record always fits the broker: an original larger than
``MAX_ORIGINAL_BYTES`` (256 KiB, 341 KiB in base64, well under Kafka's default
1 MiB message limit) keeps its first ``MAX_ORIGINAL_BYTES`` bytes and says so
(``original_truncated``, ``original_size``); ``source`` names the topic,
partition and offset where the whole message still is, for as long as the
topic retains it. ``detail`` is cut to ``MAX_DETAIL_CHARS``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Final

import orjson

from loopwise.streams.decoding import Rejection

MAX_ORIGINAL_BYTES: Final = 256 * 1024
MAX_DETAIL_CHARS: Final = 2000


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message was read: topic, partition, offset."""

    topic: str
    partition: int
    offset: int


def deadletter_record(
    rejection: Rejection,
    source: Source,
    original: bytes | None,
    max_original_bytes: int = MAX_ORIGINAL_BYTES,
) -> bytes:
    """Serialize the dead-letter record of docs/contracts.md for one refused message."""
    original = original or b""
    kept = original[:max_original_bytes]
    return orjson.dumps(
        {
            "reason": rejection.reason,
            "field": rejection.field,
            "detail": rejection.detail[:MAX_DETAIL_CHARS],
            "source": {
                "topic": source.topic,
                "partition": source.partition,
                "offset": source.offset,
            },
            "original_b64": base64.b64encode(kept).decode("ascii"),
            "original_size": len(original),
            "original_truncated": len(kept) < len(original),
        }
    )


def original_bytes(record: dict[str, object]) -> bytes:
    """The refused message's original value, from a decoded dead-letter record."""
    return base64.b64decode(str(record["original_b64"]))
