"""The app-side SDK: build events, validate them exactly as the worker will, publish them.

Example::

    from loopwise.producers.sdk import EventPublisher

    with EventPublisher.from_settings(load_settings()) as events:
        events.view("u-42", "item-7", context={"device": "mobile"})
        events.click("u-42", "item-7")

An invalid event raises :class:`InvalidEvent` at the call site, naming the
field and the rule, instead of landing on the dead-letter topic later.
"""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import Any

import orjson
from kafka import KafkaProducer

from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.streams.decoding import Event, Rejection, decode


class InvalidEvent(ValueError):
    """The event breaks the schema; ``rejection`` holds the reason code and field."""

    def __init__(self, rejection: Rejection) -> None:
        field = f" field '{rejection.field}'" if rejection.field else ""
        super().__init__(f"{rejection.reason}{field}: {rejection.detail}")
        self.rejection = rejection


def encode_event(event: dict[str, Any], max_bytes: int = 65_536) -> tuple[bytes, Event]:
    """Serialize and validate one event; raise InvalidEvent where the worker would refuse."""
    try:
        value = orjson.dumps(event)
    except TypeError as exc:
        raise InvalidEvent(Rejection("wrong_type", None, f"not JSON-serializable: {exc}")) from None
    result = decode(value, max_bytes)
    if isinstance(result, Rejection):
        raise InvalidEvent(result)
    return value, result


def partition_key(event: Event) -> bytes:
    """Kafka key: the user for user events (one writer per user), the item for catalog events."""
    return (event.user_id or event.item_id).encode()


class EventPublisher:
    """A validating kafka-python producer for ``loopwise.events``."""

    def __init__(
        self, bootstrap_servers: str, topic: str = "loopwise.events", **producer_config: Any
    ):
        config = {"linger_ms": 5, "acks": "all", "compression_type": None, **producer_config}
        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers, **config)
        self.sent = 0

    @classmethod
    def from_settings(cls, settings: Settings, **producer_config: Any) -> EventPublisher:
        """A publisher on the settings' broker, events topic and Kafka security settings."""
        kafka_clients.refuse_owned(producer_config, "EventPublisher.from_settings")
        kafka_clients.check_access(settings)
        config = kafka_clients.kafka_python_config(settings)
        return cls(
            config.pop("bootstrap_servers"), settings.events_topic, **config, **producer_config
        )

    def send(self, event: dict[str, Any]) -> None:
        """Validate and enqueue one event (sent in the background; ``flush`` waits)."""
        value, decoded = encode_event(event)
        self._producer.send(self.topic, key=partition_key(decoded), value=value)
        self.sent += 1

    def view(self, user_id: str, item_id: str, **fields: Any) -> None:
        self.send(self._event("view", user_id, item_id, fields))

    def click(self, user_id: str, item_id: str, **fields: Any) -> None:
        self.send(self._event("click", user_id, item_id, fields))

    def purchase(self, user_id: str, item_id: str, price: float, **fields: Any) -> None:
        self.send(self._event("purchase", user_id, item_id, {"price": price, **fields}))

    def item(self, item_id: str, features: dict[str, Any], active: bool = True) -> None:
        event = self._event("item", None, item_id, {"features": features, "active": active})
        self.send(event)

    def forget(self, user_id: str, **fields: Any) -> str:
        """Ask the worker to erase everything it holds about ``user_id`` (docs/contracts.md):
        keyed like the user's events, so it is applied after everything sent before it. The
        event's id."""
        event: dict[str, Any] = {
            "event_id": fields.pop("event_id", None) or uuid.uuid4().hex,
            "type": "forget",
            "user_id": user_id,
            "timestamp": fields.pop("timestamp", None) or int(time.time() * 1000),
            **fields,
        }
        self.send(event)
        return str(event["event_id"])

    @staticmethod
    def _event(
        kind: str, user_id: str | None, item_id: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_id": fields.pop("event_id", None) or uuid.uuid4().hex,
            "type": kind,
            "item_id": item_id,
            "timestamp": fields.pop("timestamp", None) or int(time.time() * 1000),
        }
        if user_id is not None:
            event["user_id"] = user_id
        event.update(fields)
        return event

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
