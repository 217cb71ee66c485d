"""Decode and validate one event (docs/contracts.md "Event schema"), once, at the boundary.

``decode(raw)`` never raises on input: it returns either an :class:`Event` or a
:class:`Rejection` whose ``reason`` is one of :data:`REASONS` and whose
``field`` names the offending field. The size limit is checked before any
parsing, so an oversized message costs nothing but its length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

EVENT_TYPES: Final = frozenset({"view", "click", "purchase", "item", "forget"})

REASONS: Final = {
    "too_large": "the message is larger than max_event_bytes; it was not parsed",
    "invalid_json": "the bytes are not UTF-8 JSON (NaN and Infinity are not JSON)",
    "wrong_type": "a field (or the whole message) has the wrong JSON type",
    "missing_field": "a required field is absent or null",
    "unknown_type": "`type` is not one of view, click, purchase, item, forget",
    "out_of_range": "a value is outside its allowed range (empty id, negative price, …)",
    "processing_error": "valid, but processing it failed again and again (the error is in "
    "`detail`); isolated from its batch so that the stream goes on",
}

MAX_ID_CHARS: Final = 256
# Largest integer JSON number that survives every consumer (JavaScript's 2^53).
MAX_TIMESTAMP_MS: Final = 2**53


@dataclass(frozen=True, slots=True)
class Event:
    """A valid event. ``raw`` keeps every field, known or not, as decoded."""

    event_id: str
    type: str
    user_id: str | None
    item_id: str
    timestamp: int
    raw: dict[str, Any]

    @property
    def consent(self) -> bool:
        """False for an event without consent, and for a ``forget`` (it erases the user)."""
        return self.type != "forget" and self.raw.get("consent", True) is not False


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was refused; becomes a dead-letter record."""

    reason: str
    field: str | None
    detail: str


class _Invalid(Exception):
    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        self.rejection = Rejection(reason, field, detail)


def decode(
    raw: bytes | None, max_bytes: int = 65_536, max_timestamp_ms: int = MAX_TIMESTAMP_MS
) -> Event | Rejection:
    """Decode and validate one message value.

    ``max_timestamp_ms`` is the latest event time accepted: the worker passes its wall
    clock plus ``max_future_skew_ms``, so that an event dated in the future cannot move
    a partition's watermark (and close its decisions) ahead of time.
    """
    if raw is None:
        return Rejection("invalid_json", None, "empty message (null value)")
    if len(raw) > max_bytes:
        return Rejection("too_large", None, f"{len(raw)} bytes > max_event_bytes={max_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection("invalid_json", None, str(exc)[:200])
    if not isinstance(doc, dict):
        return Rejection("wrong_type", None, f"an event is a JSON object, got {_json_type(doc)}")
    try:
        return validate(doc, max_timestamp_ms)
    except _Invalid as exc:
        return exc.rejection


def validate(doc: dict[str, Any], max_timestamp_ms: int = MAX_TIMESTAMP_MS) -> Event:
    """Check ``doc`` against the schema; raise ``_Invalid`` naming the first broken rule."""
    event_id = _id(doc, "event_id")
    kind = doc.get("type")
    if kind is None:
        raise _Invalid("missing_field", "type", "required")
    if not isinstance(kind, str):
        raise _Invalid("wrong_type", "type", f"must be a string, got {_json_type(kind)}")
    if kind not in EVENT_TYPES:
        raise _Invalid("unknown_type", "type", f"{kind[:40]!r} is not one of {sorted(EVENT_TYPES)}")
    user_id = None if kind == "item" and doc.get("user_id") is None else _id(doc, "user_id")
    # A forget names a user, not an item.
    item_id = "" if kind == "forget" and doc.get("item_id") is None else _id(doc, "item_id")
    timestamp = doc.get("timestamp")
    if timestamp is None:
        raise _Invalid("missing_field", "timestamp", "required (integer ms since epoch)")
    if type(timestamp) is not int:
        raise _Invalid(
            "wrong_type", "timestamp", f"must be an integer, got {_json_type(timestamp)}"
        )
    if not 0 <= timestamp <= MAX_TIMESTAMP_MS:
        raise _Invalid("out_of_range", "timestamp", f"{timestamp} is not in [0, 2^53]")
    if timestamp > max_timestamp_ms:
        raise _Invalid(
            "out_of_range",
            "timestamp",
            f"{timestamp} is {timestamp - max_timestamp_ms} ms past the latest accepted event "
            f"time {max_timestamp_ms} (the wall clock + max_future_skew_ms)",
        )

    if "decision_id" in doc and doc["decision_id"] is not None:
        _id(doc, "decision_id")
        if kind == "view":
            propensity = _number(doc, "propensity", required=True)
            if not 0.0 < propensity <= 1.0:
                raise _Invalid("out_of_range", "propensity", f"{propensity} is not in (0, 1]")
    if doc.get("propensity") is not None:
        propensity = _number(doc, "propensity", required=True)
        if not 0.0 < propensity <= 1.0:
            raise _Invalid("out_of_range", "propensity", f"{propensity} is not in (0, 1]")
    if kind == "purchase" or doc.get("price") is not None:
        price = _number(doc, "price", required=kind == "purchase")
        if price < 0:
            raise _Invalid("out_of_range", "price", f"{price} < 0")
    quantity = doc.get("quantity")
    if quantity is not None:
        if type(quantity) is not int:
            raise _Invalid(
                "wrong_type", "quantity", f"must be an integer, got {_json_type(quantity)}"
            )
        if quantity < 1:
            raise _Invalid("out_of_range", "quantity", f"{quantity} < 1")
    for flag in ("consent", "active"):
        value = doc.get(flag)
        if value is not None and type(value) is not bool:
            raise _Invalid("wrong_type", flag, f"must be true or false, got {_json_type(value)}")
    context = doc.get("context")
    if context is not None:
        _flat_object(context, "context")
    features = doc.get("features")
    if kind == "item" and features is None:
        raise _Invalid("missing_field", "features", "required on an item event")
    if features is not None:
        # Catalog features feed categories, VW namespaces and hashing: scalars only, as context.
        _flat_object(features, "features")
    return Event(event_id, kind, user_id, item_id, timestamp, doc)


def _id(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if value is None:
        raise _Invalid("missing_field", name, "required")
    if not isinstance(value, str):
        raise _Invalid("wrong_type", name, f"must be a string, got {_json_type(value)}")
    if not 0 < len(value) <= MAX_ID_CHARS:
        raise _Invalid("out_of_range", name, f"must have 1 to {MAX_ID_CHARS} characters")
    return value


def _number(doc: dict[str, Any], name: str, *, required: bool) -> float:
    value = doc.get(name)
    if value is None:
        if required:
            raise _Invalid("missing_field", name, "required")
        return 0.0
    if type(value) not in (int, float):  # bool is an int subclass: refused on purpose
        raise _Invalid("wrong_type", name, f"must be a number, got {_json_type(value)}")
    return float(value)


def _flat_object(value: Any, name: str) -> None:
    if not isinstance(value, dict):
        raise _Invalid("wrong_type", name, f"must be an object, got {_json_type(value)}")
    for key, item in value.items():
        if not isinstance(item, (str, int, float, bool)):
            raise _Invalid(
                "wrong_type",
                f"{name}.{key}",
                f"must be a string, number or bool, got {_json_type(item)}",
            )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
