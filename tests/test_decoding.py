"""The schema of docs/contracts.md, rule by rule: every refusal names its reason and field."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopwise.streams.deadletter import Source, deadletter_record, original_bytes
from loopwise.streams.decoding import REASONS, Event, Rejection, decode

GOOD = {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1", "timestamp": 1}


def with_(**changes: object) -> bytes:
    doc = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in doc.items() if v is not DROP})


DROP = object()


def test_a_valid_view_decodes_to_an_event() -> None:
    event = decode(orjson.dumps(GOOD))
    assert isinstance(event, Event)
    assert (event.event_id, event.type, event.user_id, event.item_id, event.timestamp) == (
        "e1",
        "view",
        "u1",
        "i1",
        1,
    )
    assert event.consent


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (b"{not json", "invalid_json", None),
        (b"\xff\xfe", "invalid_json", None),
        (b'{"price": NaN}', "invalid_json", None),
        (b"[1, 2]", "wrong_type", None),
        (with_(event_id=DROP), "missing_field", "event_id"),
        (with_(user_id=DROP), "missing_field", "user_id"),
        (with_(item_id=None), "missing_field", "item_id"),
        (with_(timestamp=DROP), "missing_field", "timestamp"),
        (with_(type=DROP), "missing_field", "type"),
        (with_(event_id=12), "wrong_type", "event_id"),
        (with_(timestamp="1"), "wrong_type", "timestamp"),
        (with_(timestamp=1.5), "wrong_type", "timestamp"),
        (with_(timestamp=True), "wrong_type", "timestamp"),
        (with_(timestamp=-5), "out_of_range", "timestamp"),
        (with_(type="like"), "unknown_type", "type"),
        (with_(type=3), "wrong_type", "type"),
        (with_(event_id=""), "out_of_range", "event_id"),
        (with_(type="purchase"), "missing_field", "price"),
        (with_(type="purchase", price=-1), "out_of_range", "price"),
        (with_(type="purchase", price="9.99"), "wrong_type", "price"),
        (with_(type="purchase", price=1, quantity=0), "out_of_range", "quantity"),
        (with_(type="purchase", price=1, quantity=1.5), "wrong_type", "quantity"),
        (with_(decision_id="d1"), "missing_field", "propensity"),
        (with_(decision_id="d1", propensity=0), "out_of_range", "propensity"),
        (with_(decision_id="d1", propensity=1.01), "out_of_range", "propensity"),
        (with_(context=[1]), "wrong_type", "context"),
        (with_(context={"device": {"a": 1}}), "wrong_type", "context.device"),
        (with_(consent="no"), "wrong_type", "consent"),
        (with_(type="item", user_id=DROP), "missing_field", "features"),
        (with_(type="item", features=[1]), "wrong_type", "features"),
        (with_(type="item", features={"category": {"a": 1}}), "wrong_type", "features.category"),
        (with_(type="item", features={"category": ["a"]}), "wrong_type", "features.category"),
        (with_(type="item", features={"brand": None}), "wrong_type", "features.brand"),
    ],
)
def test_each_broken_rule_is_named(raw: bytes, reason: str, field: str | None) -> None:
    result = decode(raw)
    assert isinstance(result, Rejection), result
    assert (result.reason, result.field) == (reason, field)
    assert result.reason in REASONS


def test_the_size_limit_is_checked_before_parsing() -> None:
    result = decode(b"{" + b" " * 70_000, max_bytes=65_536)
    assert isinstance(result, Rejection)
    assert result.reason == "too_large"


def test_item_events_need_no_user() -> None:
    event = decode(with_(type="item", user_id=DROP, features={"category": "c1"}))
    assert isinstance(event, Event)
    assert event.user_id is None


def test_unknown_fields_are_kept_for_forward_compatibility() -> None:
    event = decode(with_(segment="gold"))
    assert isinstance(event, Event)
    assert event.raw["segment"] == "gold"


@given(st.binary(max_size=300))
def test_decode_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    assert isinstance(decode(raw), Event | Rejection)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children)
    ),
    max_leaves=10,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*GOOD, "price", "decision_id", "context"]), json_values))
def test_decode_never_raises_on_arbitrary_json_objects(doc: dict[str, object]) -> None:
    result = decode(orjson.dumps({**GOOD, **doc}))
    assert isinstance(result, Event | Rejection)


def test_deadletter_record_keeps_the_original_bytes_and_source() -> None:
    raw = b"\x00not json"
    rejection = decode(raw)
    assert isinstance(rejection, Rejection)
    record = orjson.loads(deadletter_record(rejection, Source("loopwise.events", 3, 42), raw))
    assert record["reason"] == "invalid_json"
    assert record["field"] is None
    assert record["source"] == {"topic": "loopwise.events", "partition": 3, "offset": 42}
    assert original_bytes(record) == raw
    assert base64.b64decode(record["original_b64"]) == raw
    assert record["original_size"] == len(raw) and record["original_truncated"] is False


def test_a_deadletter_record_of_a_huge_message_fits_the_broker() -> None:
    raw = b"x" * 1_000_000  # near Kafka's default 1 MiB limit: base64 alone would exceed it
    rejection = decode(raw, max_bytes=2_000_000)
    assert isinstance(rejection, Rejection)
    blob = deadletter_record(rejection, Source("loopwise.events", 0, 7), raw)
    assert len(blob) < 512 * 1024
    record = orjson.loads(blob)
    assert record["original_truncated"] is True and record["original_size"] == 1_000_000
    assert original_bytes(record) == raw[: len(original_bytes(record))]


def test_events_dated_past_the_latest_accepted_time_are_out_of_range() -> None:
    raw = orjson.dumps({**GOOD, "timestamp": 10_000})
    assert isinstance(decode(raw, max_timestamp_ms=10_000), Event)
    result = decode(raw, max_timestamp_ms=9_999)
    assert isinstance(result, Rejection)
    assert (result.reason, result.field) == ("out_of_range", "timestamp")
    assert "max_future_skew_ms" in result.detail
