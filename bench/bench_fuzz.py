"""Fuzz run at scale: hostile messages through the real worker, every count reconciled.

A seeded generator (:class:`Corpus`) writes messages in families (random bytes,
truncated/deep/huge JSON, NaN/Infinity, unicode edge cases, wrong types,
missing fields, out-of-range values, poison shapes, non-objects, tombstones,
duplicates) beside a share of valid events. Each message is tagged with its
family and variant and, where the family knows it, the outcome the contract
(docs/contracts.md §3-§4) promises. The expected outcome of every message comes
from an oracle: :func:`loopwise.streams.decoding.decode` with the worker's
limits (``max_event_bytes``; ``max_timestamp_ms`` = generation time +
``max_future_skew_ms``, and a message whose verdict would depend on when the
worker reads it is never produced), plus duplicates counted here (an accepted
``event_id`` seen before).

Everything is published to a fresh events topic (real Kafka broker and Redis,
started here on free ports), then ONE real worker process (``loopwise
worker``) consumes it. Once ``stats.consumed`` equals the number published:

- the worker is still alive (0 crashes), exits 0 on SIGTERM, and its output
  holds no traceback and no ERROR line;
- ``accepted + duplicates + deadlettered == consumed == published``, and
  ``accepted``, ``duplicates`` and every ``deadletter:{reason}`` equal the oracle's;
- the whole dead-letter topic is read back: each rejected message is there
  exactly once (matched by source partition/offset) with the oracle's reason
  and field, its original key, ``original_size``, the original bytes (CRC of
  the first 256 KiB) and ``original_truncated``; no record for an accepted
  message; every record < 1 MB.

Exit status 1 if anything does not reconcile; figures in ``bench/results/fuzz.json``.

Run: ``.venv/bin/python -m bench.bench_fuzz --messages 1000000`` (10-20 min on 2 cores).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import random
import re
import shutil
import string
import sys
import tempfile
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from kafka import TopicPartition
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.common import bench_settings, write_json
from loopwise import kafka_clients
from loopwise.config import Settings
from loopwise.infra import LocalInfra
from loopwise.redis_clients import redis_client
from loopwise.streams.deadletter import MAX_ORIGINAL_BYTES
from loopwise.streams.decoding import MAX_ID_CHARS, MAX_TIMESTAMP_MS, REASONS, Rejection, decode
from loopwise.streams.worker import spawn_worker, stop_worker

console = Console(width=None if sys.stdout.isatty() else 120)
RESULTS = Path(__file__).parent / "results"

HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
YEAR_MS: Final = 365 * DAY_MS
MARGIN_MS: Final = 2 * DAY_MS
"""A message rejected for its future timestamp must stay rejected this long after generation
(the worker reads it later, with a later clock); the generator never produces one that would not."""
BROKER_VALUE_LIMIT: Final = 1_048_000
"""Largest value published: under the broker's message.max.bytes (1 MiB + 12) with the batch's
header, and under the producer's max_request_size (1 MiB)."""
FLUSH_BYTES: Final = 64 * 1024 * 1024
"""The publisher waits for the broker after this many bytes (bounded memory)."""
RECORD_LIMIT: Final = 1_000_000
"""Every dead-letter record must be smaller than this (it must fit the broker's 1 MB default)."""

FAMILIES: Final[dict[str, float]] = {
    "valid": 0.20,
    "duplicate": 0.06,
    "random_bytes": 0.07,
    "truncated_json": 0.08,
    "deep_json": 0.04,
    "huge_json": 0.005,
    "nan_infinity": 0.04,
    "unicode": 0.10,
    "wrong_type": 0.14,
    "missing_field": 0.05,
    "out_of_range": 0.10,
    "poison_shape": 0.09,
    "not_an_object": 0.02,
    "tombstone": 0.005,
}
"""Share of each family in the stream."""
OUTCOMES: Final = ("accepted", "duplicate", *REASONS)
"""What can become of a message: applied, dropped as a duplicate, or dead-lettered (a reason)."""
ACCEPTED: Final = ("accepted", None)
DUPLICATE: Final = ("duplicate", None)

N_USERS: Final = 5000
N_ITEMS: Final = 300
KINDS: Final = ("view", "click", "purchase", "item")
KIND_WEIGHTS: Final = (0.55, 0.2, 0.12, 0.13)
CATEGORIES: Final = ("shoes", "books", "games", "garden", "music", "toys", "food", "tools")
BRANDS: Final = ("acme", "zeta", "nova", "orbit", "umbra")
DEVICES: Final = ("mobile", "desktop", "tablet", "tv")
PAGES: Final = ("home", "search", "item", "cart")
HOLE: Final = "@@HOLE@@"
"""Placeholder string in a serialized event, replaced by raw JSON text (tokens orjson would not
write: NaN, lone surrogate escapes, invalid UTF-8...)."""
HOLE_JSON: Final = b'"' + HOLE.encode() + b'"'

WRONG_VALUES: Final[dict[str, tuple[Any, ...]]] = {
    "string": (0, 12, -3.5, 1e308, True, False, [], ["a"], {}, {"id": "x"}),
    "timestamp": ("1767225600000", 1.0, 1767225600000.0, 1.5, True, False, [1], {}, 2**64, 1e308),
    "number": ("0.5", "1", True, False, [0.5], {"v": 1}, ""),
    "quantity": (1.0, 2.5, "2", True, [1], {}, 2**64, 1e20),
    "object": ([], [1, 2], "mobile", 3, 0.5, True, False),
    "flag": ("false", "true", 0, 1, 0.0, [], {}, "no"),
}
"""Values of a wrong JSON type, per kind of field (2**64 and beyond parse as floats)."""
INVALID_UTF8: Final = (
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",  # overlong NUL
    b"\xc1\xbf",  # overlong
    b"\xed\xa0\x80",  # a surrogate, UTF-8-encoded (CESU-8)
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xf8\x88\x80\x80\x80",  # 5-byte form
    b"\xe2\x82",  # truncated sequence
    b"\x80",  # lone continuation byte
    b"\xc3",  # lead byte then the closing quote
)
ODD_TEXT: Final = (
    "\u202eevil\u202c",  # right-to-left override
    "\u200f\u2067rtl\u2069",
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew
    "\u0645\u0631\u062d\u0628\u0627",  # Arabic
    "\U0001f600\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466\U0001f1eb\U0001f1f7",
    "e" + "\u0301" * 40,  # a long chain of combining marks
    "\ufeffbom-inside",
    "\ufffe\uffff\U0010ffff\U000e0001",  # noncharacters, the last code point, a tag
    "\u200b\u200c\u200d\u2060",  # zero-width characters
    "a\u0000b",  # NUL inside the string (escaped by the serializer)
    "\u0000",
    "line\nbreak\ttab\r",
    "\\\"'`${}%s%n<script>",
    "\U0001d573\U0001d58a\U0001d587",  # mathematical letters
    "\u1100\u1161\u11a8",  # Hangul jamo
)


@dataclass(frozen=True, slots=True)
class Draft:
    """One message as a family wrote it, before the oracle's verdict."""

    value: bytes | None
    variant: str
    intended: tuple[str, str | None] | None = None
    """The outcome the contract promises (reason or "accepted"/"duplicate", field), if known."""
    key: bytes | object | None = ...
    """The Kafka key; ``...``: the corpus picks one."""


@dataclass(frozen=True, slots=True)
class Fuzz:
    """A generated message with its family, variant and expected outcome."""

    index: int
    family: str
    variant: str
    key: bytes | None
    value: bytes | None
    outcome: str
    """The oracle's: "accepted", "duplicate" or a reason code."""
    field: str | None
    """The oracle's offending field (a rejection's), else None."""
    intended: tuple[str, str | None] | None


class Ambiguous(Exception):
    """The message's verdict would depend on when the worker reads it."""


class Corpus:
    """A seeded stream of hostile and valid messages with the oracle's expected outcomes.

    Deterministic for a given ``seed``, ``now_ms`` and limits. Event ids are unique across the
    corpus except where a message repeats one on purpose (family ``duplicate``).
    """

    def __init__(
        self,
        seed: int,
        *,
        max_event_bytes: int = 65_536,
        max_future_skew_ms: int = 300_000,
        now_ms: int | None = None,
        families: dict[str, float] | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_bytes = max_event_bytes
        self.now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        self.latest = self.now_ms + max_future_skew_ms
        self.families = dict(FAMILIES if families is None else families)
        self._names = list(self.families)
        self._cum: list[float] = []
        total = 0.0
        for share in self.families.values():
            total += share
            self._cum.append(total)
        self._makers: dict[str, Callable[[], Draft]] = {
            name: getattr(self, "_" + name) for name in self._names
        }
        self.seen: set[str] = set()
        self._ids = 0
        self._recent: list[tuple[bytes | None, bytes, dict[str, Any]]] = []
        self._reservoir: list[tuple[bytes | None, bytes, dict[str, Any]]] = []
        self._valid_seen = 0
        self.regenerated = 0

    # The stream.

    def __iter__(self) -> Iterator[Fuzz]:
        index = 0
        while True:
            yield self.next(index)
            index += 1

    def take(self, n: int) -> Iterator[Fuzz]:
        for index in range(n):
            yield self.next(index)

    def next(self, index: int) -> Fuzz:
        family = self._names[self._pick()]
        while True:
            draft = self._makers[family]()
            try:
                outcome, field_ = self.oracle(draft.value)
            except Ambiguous:
                self.regenerated += 1
                continue
            break
        key = self._key(None) if draft.key is ... else draft.key
        assert key is None or isinstance(key, bytes)
        if outcome == "accepted":
            self._remember(key, draft.value)
        return Fuzz(index, family, draft.variant, key, draft.value, outcome, field_, draft.intended)

    def _pick(self) -> int:
        x = self.rng.random() * self._cum[-1]
        for i, bound in enumerate(self._cum):
            if x < bound:
                return i
        return len(self._cum) - 1

    def oracle(self, value: bytes | None) -> tuple[str, str | None]:
        """The expected outcome: decode's verdict with the worker's limits, then duplicates."""
        result = decode(value, self.max_bytes, self.latest)
        if isinstance(result, Rejection):
            if result.reason == "out_of_range" and result.field == "timestamp":
                later = decode(value, self.max_bytes, self.latest + MARGIN_MS)
                if not isinstance(later, Rejection) or later.field != "timestamp":
                    raise Ambiguous
            return result.reason, result.field
        if result.event_id in self.seen:
            return DUPLICATE
        self.seen.add(result.event_id)
        return ACCEPTED

    def _remember(self, key: bytes | None, value: bytes | None) -> None:
        assert value is not None
        entry = (key, value, orjson.loads(value))
        self._recent.append(entry)
        if len(self._recent) > 64:
            del self._recent[:32]
        self._valid_seen += 1
        if len(self._reservoir) < 5000:
            self._reservoir.append(entry)
        else:
            j = self.rng.randrange(self._valid_seen)
            if j < len(self._reservoir):
                self._reservoir[j] = entry

    # Building blocks.

    def new_id(self) -> str:
        self._ids += 1
        return f"fz{self.seed}-{self._ids}"

    def event(self, kind: str | None = None) -> dict[str, Any]:
        """A valid event, dated in the last few hours, with a fresh event_id."""
        rng = self.rng
        kind = kind or rng.choices(KINDS, KIND_WEIGHTS)[0]
        doc: dict[str, Any] = {"event_id": self.new_id(), "type": kind}
        if kind != "item":
            doc["user_id"] = f"u-{rng.randrange(N_USERS)}"
        doc["item_id"] = f"item-{rng.randrange(N_ITEMS)}"
        doc["timestamp"] = self.now_ms - rng.randrange(60_000, 6 * HOUR_MS)
        if kind == "item":
            doc["features"] = {
                "category": rng.choice(CATEGORIES),
                "price": round(rng.uniform(1, 300), 2),
                "brand": rng.choice(BRANDS),
            }
            if rng.random() < 0.1:
                doc["active"] = False
            return doc
        if rng.random() < 0.6:
            doc["context"] = {
                "device": rng.choice(DEVICES),
                "hour": rng.randrange(24),
                "page": rng.choice(PAGES),
            }
        if kind == "view" and rng.random() < 0.3:
            doc["decision_id"] = rng.randbytes(16).hex()
            doc["propensity"] = round(rng.uniform(0.001, 1.0), 6)
        if kind == "purchase":
            doc["price"] = round(rng.uniform(0, 500), 2)
            if rng.random() < 0.5:
                doc["quantity"] = rng.randrange(1, 5)
        return doc

    def _key(self, doc: dict[str, Any] | None) -> bytes | None:
        rng = self.rng
        r = rng.random()
        if doc is not None and r < 0.8:
            owner = doc.get("user_id") if doc.get("type") != "item" else doc.get("item_id")
            if isinstance(owner, str) and owner:
                return owner.encode("utf-8", "surrogatepass")
        if r < 0.7:
            return f"u-{rng.randrange(N_USERS)}".encode()
        if r < 0.85:
            return None
        return rng.randbytes(rng.randrange(1, 17))

    def _with_hole(self, doc: dict[str, Any], raw: bytes, *path: str) -> bytes:
        """``doc`` serialized, with the value at ``path`` replaced by the raw JSON text ``raw``."""
        target = doc
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = HOLE
        blob = _dumps(doc)
        assert blob.count(HOLE_JSON) == 1
        return blob.replace(HOLE_JSON, raw)

    def _pad_to(self, doc: dict[str, Any], size: int, name: str = "pad") -> bytes:
        """``doc`` with an ASCII field ``name`` making it exactly ``size`` bytes."""
        doc[name] = ""
        base = len(_dumps(doc))
        doc[name] = "x" * (size - base)
        blob = _dumps(doc)
        assert len(blob) == size, (len(blob), size)
        return blob

    def _unique_text(self, filler: str, length: int) -> str:
        """A fresh id of exactly ``length`` characters, padded with ``filler``."""
        head = self.new_id() + "-"
        count = max(0, (length - len(head)) // len(filler) + 1)
        text = (head + filler * count)[:length]
        assert len(text) == length
        return text

    # The families. Each returns a Draft; the oracle decides the outcome.

    def _valid(self) -> Draft:
        rng = self.rng
        doc = self.event()
        variant = doc["type"]
        r = rng.random()
        if r < 0.05:
            doc.update({"segment": "gold", "schema_version": 2, "meta": {"a": [1, {"b": None}]}})
            variant = "unknown_fields"
        elif r < 0.07:
            return Draft(_dumps(doc, option=orjson.OPT_INDENT_2), "pretty", ACCEPTED)
        elif r < 0.09 and doc["type"] != "item":
            doc["consent"] = False
            variant = "no_consent"
        elif r < 0.11:
            doc["timestamp"] = self.now_ms + rng.randrange(0, 60_000)  # within the allowed skew
            variant = "slightly_future"
        return Draft(_dumps(doc), variant, ACCEPTED, self._key(doc))

    def _duplicate(self) -> Draft:
        rng = self.rng
        if not self._recent:
            return self._valid()
        r = rng.random()
        if r < 0.35:  # the message just before, or nearly: likely in the same batch
            key, value, _ = self._recent[-1 - rng.randrange(min(4, len(self._recent)))]
            return Draft(value, "resend_adjacent", DUPLICATE, key)
        if r < 0.55:  # same bytes, another key: maybe another partition
            _, value, doc = rng.choice(self._recent)
            return Draft(value, "resend_other_key", DUPLICATE, self._key(None))
        if r < 0.75:  # the same event_id with other (valid) content: the first one wins
            _, _, old = rng.choice(self._recent)
            doc = self.event()
            doc["event_id"] = old["event_id"]
            return Draft(_dumps(doc), "same_id_other_content", DUPLICATE, self._key(doc))
        key, value, _ = rng.choice(self._reservoir)  # long after: another batch, maybe bucket
        return Draft(value, "resend_late", DUPLICATE, key)

    def _random_bytes(self) -> Draft:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            return Draft(b"", "empty", ("invalid_json", None))
        if r < 0.55:
            n = int(2 ** rng.uniform(0, 12))
            return Draft(rng.randbytes(n), "binary")
        if r < 0.7:
            n = int(2 ** rng.uniform(0, 10))
            return Draft("".join(rng.choices(string.printable, k=n)).encode(), "printable")
        if r < 0.85:
            tokens = ("{", "}", "[", "]", ":", ",", '"a"', '"event_id"', "1", "-2.5e3", "null")
            tokens += ("true", "false", " ", '"\\u00e9"', '"view"')
            n = rng.randrange(1, 40)
            return Draft("".join(rng.choices(tokens, k=n)).encode(), "json_tokens")
        head = orjson.dumps(self.event())[: rng.randrange(1, 40)]
        return Draft(head + rng.randbytes(rng.randrange(1, 200)), "json_head_then_noise")

    def _truncated_json(self) -> Draft:
        rng = self.rng
        doc = self.event()
        r = rng.random()
        if r < 0.6:
            blob = _dumps(doc)
            return Draft(blob[: rng.randrange(len(blob))], "cut", ("invalid_json", None))
        if r < 0.7:
            blob = _dumps(doc, option=orjson.OPT_INDENT_2)
            return Draft(blob[: rng.randrange(len(blob))], "cut_pretty", ("invalid_json", None))
        if r < 0.8:  # cut inside a multi-byte character
            doc["user_id"] = doc.get("user_id", "u") + "\u00e9\u20ac\U0001f600"
            blob = _dumps(doc)
            cut = blob.index("\U0001f600".encode()) + rng.randrange(1, 4)
            return Draft(blob[:cut], "cut_mid_utf8", ("invalid_json", None))
        if r < 0.9:  # trailing garbage after a complete object
            blob = _dumps(doc) + rng.choice([b"x", b"}", b",", b"\x00", b"{}", b"[1]"])
            return Draft(blob, "trailing_garbage", ("invalid_json", None))
        if r < 0.95:  # two objects back to back
            return Draft(
                _dumps(doc) + orjson.dumps(self.event()),
                "two_objects",
                ("invalid_json", None),
            )
        blob = b"  \n\t" + _dumps(doc) + b" \r\n "  # whitespace around: valid
        return Draft(blob, "whitespace_around", ACCEPTED, self._key(doc))

    def _deep_json(self) -> Draft:
        rng = self.rng
        depth = rng.choice((64, 254, 255, 256, 500, 1022, 1023, 1024, 1025, 2000, 5000, 20000))
        arrays = b"[" * depth + b"]" * depth
        r = rng.random()
        limit = 1024  # orjson's nesting limit: deeper is not parsed (invalid_json)
        if r < 0.15:
            intended = ("wrong_type", None) if depth <= limit else ("invalid_json", None)
            return Draft(arrays, f"whole_array_{depth}", intended)
        if r < 0.25:
            blob = b'{"a":' * depth + b"1" + b"}" * depth
            intended = ("missing_field", "event_id") if depth <= limit else ("invalid_json", None)
            if len(blob) > self.max_bytes:
                intended = ("too_large", None)
            return Draft(blob, f"whole_object_{depth}", intended)
        if r < 0.3:
            return Draft(b"[" * depth, f"unclosed_{depth}", ("invalid_json", None))
        doc = self.event("item" if r < 0.45 else None)
        if r < 0.45:
            path: tuple[str, ...] = ("features", "category")
            field_ = "features.category"
        elif r < 0.6:
            path, field_ = ("context", "k"), "context.k"
        elif r < 0.7:
            path, field_ = ("event_id",), "event_id"
        else:
            path, field_ = ("extra",), None
        blob = self._with_hole(doc, arrays, *path)
        total = depth + len(path)
        if total > limit:
            intended: tuple[str, str | None] | None = ("invalid_json", None)
        elif len(blob) > self.max_bytes:
            intended = ("too_large", None)
        else:
            intended = ACCEPTED if field_ is None else ("wrong_type", field_)
        name = "unknown_field" if field_ is None else field_
        return Draft(blob, f"{name}_{depth}", intended, self._key(doc))

    def _huge_json(self) -> Draft:
        rng = self.rng
        limit = self.max_bytes
        doc = self.event()
        r = rng.random()
        too_large = ("too_large", None)
        if r < 0.45:
            size = limit + 1 + int(2 ** rng.uniform(0, 15))
            return Draft(self._pad_to(doc, size), "padded_over_limit", too_large, self._key(doc))
        if r < 0.5:
            return Draft(self._pad_to(doc, limit), "exactly_the_limit", ACCEPTED, self._key(doc))
        if r < 0.55:
            return Draft(self._pad_to(doc, limit + 1), "limit_plus_one", too_large, self._key(doc))
        if r < 0.59:
            size = rng.randrange(900_000, BROKER_VALUE_LIMIT + 1)
            return Draft(self._pad_to(doc, size), "near_broker_limit", too_large, self._key(doc))
        if r < 0.69:
            blob = rng.randbytes(rng.randrange(limit + 1, 300_000))
            return Draft(blob, "random_bytes_over_limit", too_large)
        if r < 0.75:
            n = rng.randrange(limit // 2, 150_000)
            blob = b"[" + b"1," * n + b"1]"
            return Draft(blob, "big_array", too_large if len(blob) > limit else None)
        if r < 0.85:  # many context keys, under the limit: valid
            n = rng.randrange(1000, 4000)
            doc = self.event("view")
            doc["context"] = {f"k{i}": i for i in range(n)}
            blob = _dumps(doc)
            intended = ACCEPTED if len(blob) <= limit else too_large
            return Draft(blob, "many_context_keys", intended, self._key(doc))
        size = rng.randrange(limit // 2, limit + 1)
        doc = self.event("item")
        return Draft(self._pad_to(doc, size, "notes"), "big_under_limit", ACCEPTED, self._key(doc))

    def _nan_infinity(self) -> Draft:
        rng = self.rng
        bad = (b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"-inf", b"1e400")
        bad += (b"-1e400", b"+1", b".5", b"1.", b"01", b"0x10", b"1e", b"--1", b"Inf", b"NAN")
        odd = (b"-0", b"0.0", b"1E2", b"1e-7", b"-0.0", b"1.0e+2", b"1e308", b"5e-324", b"0")
        doc = self.event(rng.choice(("view", "purchase", "item")))
        if doc["type"] == "view":
            doc.setdefault("decision_id", rng.randbytes(16).hex())
            doc.setdefault("propensity", 0.5)
        spots: list[tuple[str, ...]] = [("timestamp",), ("score",)]
        spots += {
            "view": [("propensity",), ("context", "hour")],
            "purchase": [("price",), ("quantity",), ("context", "hour")],
            "item": [("features", "price")],
        }[doc["type"]]
        path = rng.choice(spots)
        where = ".".join(path)
        if rng.random() < 0.75:
            token = rng.choice(bad)
            return Draft(
                self._with_hole(doc, token, *path),
                f"{token.decode()}@{where}",
                ("invalid_json", None),
                self._key(doc),
            )
        token = rng.choice(odd)
        return Draft(
            self._with_hole(doc, token, *path), f"odd_number@{where}", None, self._key(doc)
        )

    def _unicode(self) -> Draft:
        rng = self.rng
        doc = self.event()
        r = rng.random()
        invalid = ("invalid_json", None)
        spots: list[tuple[str, ...]] = [("event_id",), ("item_id",), ("note",)]
        if doc["type"] == "item":
            spots.append(("features", "category"))
        else:
            spots += [("user_id",), ("context", "device")]
        path = rng.choice(spots)
        where = ".".join(path)
        key = self._key(doc)
        if r < 0.3:  # text that is not Unicode: refused by the parser
            kind = rng.randrange(5)
            if kind == 0:
                raw = rng.choice((b"\\ud800", b"\\udbff", b"x\\ud83dy", b"\\ud83d\\u0041"))
                name = "lone_high_surrogate"
            elif kind == 1:
                raw, name = rng.choice((b"\\udc00", b"\\udfff", b"a\\ude00")), "lone_low_surrogate"
            elif kind == 2:
                raw, name = b"\\ude00\\ud83d", "reversed_pair"
            elif kind == 3:
                raw, name = rng.choice(INVALID_UTF8), "invalid_utf8"
            else:
                raw = rng.choice((b"\x00", b"\x01", b"\x1f", b"\n", b"\t", b"\x7f\x00"))
                name = "raw_control_char"
            value = self._with_hole(doc, b'"id' + raw + b'"', *path)
            return Draft(value, f"{name}@{where}", invalid, key)
        if r < 0.6:  # odd but valid text
            text = rng.choice(ODD_TEXT)
            if path == ("event_id",):
                text = self.new_id() + text
            doc_value = text
            target = doc
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = doc_value
            if rng.random() < 0.3:  # every non-ASCII character as a \u escape (pairs for astral)
                blob = _ascii_json(doc)
                return Draft(blob, f"escaped_text@{where}", ACCEPTED, key)
            return Draft(_dumps(doc), f"odd_text@{where}", ACCEPTED, key)
        if r < 0.7:  # escaped surrogate pairs are fine
            raw = b"\\ud83d\\ude00\\udbff\\udfff"
            if path == ("event_id",):
                raw = self.new_id().encode() + raw
            return Draft(self._with_hole(doc, b'"' + raw + b'"', *path), f"pair@{where}", ACCEPTED)
        if r < 0.8:  # ids measured in characters, not bytes
            name = rng.choice(("event_id", "user_id", "item_id"))
            if name == "user_id" and doc["type"] == "item":
                name = "item_id"
            filler = rng.choice(("\U0001f600", "\u00e9", "\u05d0", "\u0000", "e\u0301"))
            over = rng.random() < 0.5
            length = MAX_ID_CHARS + 1 if over else MAX_ID_CHARS
            doc[name] = self._unique_text(filler, length)
            intended = ("out_of_range", name) if over else ACCEPTED
            tag = "over" if over else "at"
            return Draft(_dumps(doc), f"{tag}_{length}_chars@{name}", intended, key)
        if r < 0.85:
            kind = rng.choice(("v\u0456ew", "view\u200b", "VIEW", "\u202eweiv", "vie\u0301w", ""))
            doc["type"] = kind
            intended = ("unknown_type", "type")
            return Draft(_dumps(doc), "lookalike_type", intended, key)
        if r < 0.9:
            doc["event_\u0456d"] = doc.pop("event_id")  # Cyrillic i: event_id is missing
            return Draft(_dumps(doc), "lookalike_field_name", ("missing_field", "event_id"))
        if r < 0.95:
            value = b"\xef\xbb\xbf" + _dumps(doc)
            return Draft(value, "utf8_bom", invalid, key)
        codec = rng.choice(("utf-16", "utf-16-le", "utf-32", "latin-1"))
        doc["user_id" if doc["type"] != "item" else "item_id"] = "caf\u00e9-" + self.new_id()
        text = _dumps(doc).decode()
        return Draft(text.encode(codec), f"encoded_{codec}", invalid, key)

    def _wrong_type(self) -> Draft:
        rng = self.rng
        doc = self.event()
        kind = doc["type"]
        names = ["event_id", "type", "item_id", "timestamp", "context", "consent", "features"]
        if kind != "item":
            names.append("user_id")
        if kind == "view":
            names += ["decision_id", "propensity"]
        if kind == "purchase":
            names += ["price", "quantity"]
        if kind == "item":
            names.append("active")
        name = rng.choice(names)
        category = {
            "timestamp": "timestamp",
            "propensity": "number",
            "price": "number",
            "quantity": "quantity",
            "context": "object",
            "features": "object",
            "consent": "flag",
            "active": "flag",
        }.get(name, "string")
        if name == "decision_id":
            doc.setdefault("propensity", 0.5)
        value = rng.choice(WRONG_VALUES[category])
        if name == "context" and rng.random() < 0.5:  # a context value of the wrong type
            inner = rng.choice(([1], {"a": 1}, None, [], {}))
            doc["context"] = {"device": "mobile", "bad": inner}
            return Draft(_dumps(doc), "context_value", ("wrong_type", "context.bad"))
        if name == "features" and kind == "item" and rng.random() < 0.5:
            inner = rng.choice(([1], {"a": 1}, None, [], {}))
            doc["features"]["brand"] = inner
            return Draft(_dumps(doc), "features_value", ("wrong_type", "features.brand"))
        doc[name] = value
        label = f"{name}={_json_kind(value)}"
        return Draft(_dumps(doc), label, ("wrong_type", name), self._key(doc))

    def _missing_field(self) -> Draft:
        rng = self.rng
        doc = self.event()
        kind = doc["type"]
        required = ["event_id", "type", "item_id", "timestamp"]
        if kind != "item":
            required.append("user_id")
        if kind == "purchase":
            required.append("price")
        if kind == "item":
            required.append("features")
        if kind == "view" and "decision_id" in doc:
            required.append("propensity")
        if rng.random() < 0.2:  # null or absent optional fields are ignored
            name = rng.choice(("context", "consent", "quantity", "decision_id", "active", "x"))
            if name == "decision_id" and kind == "view":
                doc.pop("propensity", None)
            doc[name] = None
            if kind == "item" and rng.random() < 0.5:
                doc["user_id"] = None
                name = "user_id_on_item"
            return Draft(_dumps(doc), f"null_optional_{name}", ACCEPTED, self._key(doc))
        name = rng.choice(required)
        how = rng.choice(("absent", "null"))
        if how == "absent":
            doc.pop(name, None)
        else:
            doc[name] = None
        return Draft(_dumps(doc), f"{name}_{how}", ("missing_field", name), self._key(doc))

    def _out_of_range(self) -> Draft:
        rng = self.rng
        r = rng.random()
        oor = "out_of_range"
        if r < 0.35:
            doc = self.event()
            ts = "timestamp"
            choices: list[tuple[str, int, tuple[str, str | None]]] = [
                ("negative", -rng.randrange(1, 10**12), (oor, "timestamp")),
                ("minus_one", -1, (oor, "timestamp")),
                ("int64_min", -(2**63), (oor, "timestamp")),
                ("2^53", MAX_TIMESTAMP_MS, (oor, "timestamp")),
                ("2^53+1", MAX_TIMESTAMP_MS + 1, (oor, "timestamp")),
                ("int64_max", 2**63 - 1, (oor, "timestamp")),
                ("uint64_max", 2**64 - 1, (oor, "timestamp")),
                ("far_future", self.now_ms + rng.randrange(MARGIN_MS, 99 * YEAR_MS), (oor, ts)),
                ("year_9999", 253_402_300_799_000, (oor, "timestamp")),
                ("zero", 0, ACCEPTED),
                ("within_skew", self.now_ms + rng.randrange(0, 120_000), ACCEPTED),
            ]
            name, value, intended = rng.choice(choices)
            doc["timestamp"] = value
            return Draft(_dumps(doc), f"timestamp_{name}", intended, self._key(doc))
        if r < 0.55:
            doc = self.event("view")
            doc.setdefault("decision_id", rng.randbytes(16).hex())
            choices_f: list[tuple[str, float, tuple[str, str | None]]] = [
                ("zero", 0, (oor, "propensity")),
                ("zero_float", 0.0, (oor, "propensity")),
                ("minus_zero", -0.0, (oor, "propensity")),
                ("negative", -0.5, (oor, "propensity")),
                ("above_one", 1.0000001, (oor, "propensity")),
                ("two", 2, (oor, "propensity")),
                ("1e308", 1e308, (oor, "propensity")),
                ("huge_int", 10**20, (oor, "propensity")),
                ("one", 1, ACCEPTED),
                ("denormal", 5e-324, ACCEPTED),
            ]
            name, number, intended = rng.choice(choices_f)
            doc["propensity"] = number
            return Draft(_dumps(doc), f"propensity_{name}", intended, self._key(doc))
        if r < 0.75:
            doc = self.event("purchase")
            choices_p: list[tuple[str, str, Any, tuple[str, str | None]]] = [
                ("price_minus_one", "price", -1, (oor, "price")),
                ("price_minus_cent", "price", -0.01, (oor, "price")),
                ("price_-1e308", "price", -1e308, (oor, "price")),
                ("price_-denormal", "price", -5e-324, (oor, "price")),
                ("price_minus_zero", "price", -0.0, ACCEPTED),
                ("price_zero", "price", 0, ACCEPTED),
                ("quantity_zero", "quantity", 0, (oor, "quantity")),
                ("quantity_minus_one", "quantity", -1, (oor, "quantity")),
                ("quantity_int64_min", "quantity", -(2**63), (oor, "quantity")),
                ("quantity_uint64_max", "quantity", 2**64 - 1, ACCEPTED),
            ]
            name, field_, value, intended = rng.choice(choices_p)
            doc[field_] = value
            return Draft(_dumps(doc), name, intended, self._key(doc))
        name = rng.choice(("event_id", "item_id", "decision_id", "user_id"))
        doc = self.event(None if name in ("event_id", "item_id") else "click")
        length = rng.choice((0, MAX_ID_CHARS + 1, MAX_ID_CHARS + 1000, MAX_ID_CHARS))
        doc[name] = self._unique_text("x", length) if length else ""
        intended = ACCEPTED if length == MAX_ID_CHARS else (oor, name)
        return Draft(_dumps(doc), f"{name}_{length}_chars", intended, self._key(doc))

    def _poison_shape(self) -> Draft:
        rng = self.rng
        r = rng.random()
        if r < 0.2:  # catalog features that are not scalars
            doc = self.event("item")
            name = rng.choice(("category", "brand", "price", "tags"))
            doc["features"][name] = rng.choice(
                ({"nested": 1}, ["a", "b"], [], {}, None, [[["deep"]]], {"a": {"b": {"c": 1}}})
            )
            return Draft(
                _dumps(doc), f"features_{name}_not_scalar", ("wrong_type", f"features.{name}")
            )
        if r < 0.3:  # context values that are not scalars
            doc = self.event("view")
            doc["context"] = {"device": "tv", "geo": rng.choice(({"lat": 1}, [1, 2], None, []))}
            return Draft(_dumps(doc), "context_value_not_scalar", ("wrong_type", "context.geo"))
        if r < 0.4:  # huge integers beyond 64 bits (orjson reads them as floats)
            doc = self.event("purchase")
            big = rng.choice((2**64, 2**64 + 1, 10**30, -(2**64) - 5, 10**300))
            name = rng.choice(
                ("timestamp", "quantity", "price", "unknown", "context", "propensity")
            )
            if name == "context":
                doc["context"] = {"big": big}
                intended: tuple[str, str | None] | None = ACCEPTED
            elif name == "unknown":
                doc["big"] = big
                intended = ACCEPTED
            else:
                doc[name] = big
                intended = None
            return Draft(_dumps(doc), f"int_beyond_64_bits@{name}", intended, self._key(doc))
        if r < 0.55:  # extreme floats in numeric fields
            doc = self.event("purchase")
            variant = rng.randrange(6)
            if variant == 0:
                doc["price"], doc["quantity"] = 1e308, 2**64 - 1  # revenue 1.8e327
                name, intended = "price_1e308_x_uint64", ACCEPTED
            elif variant == 1:
                doc["price"], name, intended = 5e-324, "price_denormal", ACCEPTED
            elif variant == 2:
                doc["timestamp"], name = 1e308, "timestamp_1e308"
                intended = ("wrong_type", "timestamp")
            elif variant == 3:
                doc["quantity"], name = 1e308, "quantity_1e308"
                intended = ("wrong_type", "quantity")
            elif variant == 4:
                doc["context"] = {"x": 1e308, "y": -1e308, "z": 5e-324, "w": -0.0}
                name, intended = "context_extreme_floats", ACCEPTED
            else:
                doc = self.event("item")
                doc["features"]["price"] = rng.choice((1e308, -1e308, 5e-324, 10**30))
                name, intended = "features_price_extreme", ACCEPTED
            return Draft(_dumps(doc), name, intended, self._key(doc))
        if r < 0.65:  # ids of 257 characters, ids of odd shapes
            doc = self.event()
            name = rng.choice(
                ("event_id", "item_id", "user_id" if doc["type"] != "item" else "item_id")
            )
            doc[name] = self._unique_text(rng.choice(("a", "\U0001f4a9")), MAX_ID_CHARS + 1)
            return Draft(_dumps(doc), f"{name}_257_chars", ("out_of_range", name))
        if r < 0.75:  # ids that look like keys, patterns or the default
            doc = self.event(rng.choice(("view", "click")))
            doc["user_id"] = rng.choice(
                ("__default__", "*", "u:1:2", "user:u-1", "{u-1}", " ", "\n", "u-1 ", "-1", "null")
            )
            doc["item_id"] = rng.choice(("*", "item-1\r\n", "a|b c:1", "\t", "__proto__", "0"))
            return Draft(_dumps(doc), "odd_ids", ACCEPTED, self._key(doc))
        if r < 0.85:  # an object with repeated keys: the parser keeps the last one
            doc = self.event()
            first, last = self.new_id(), self.new_id()
            doc["event_id"] = HOLE
            blob = _dumps(doc).replace(
                HOLE_JSON, orjson.dumps(first) + b',"event_id":' + orjson.dumps(last)
            )
            return Draft(blob, "repeated_key", ACCEPTED, self._key(doc))
        if r < 0.92:  # wide objects, under the limit
            doc = self.event("item")
            doc["features"] = {f"f{i}": rng.choice((i, "v", True, 0.5)) for i in range(2000)}
            doc["features"]["category"] = rng.choice(CATEGORIES)
            return Draft(_dumps(doc), "wide_features", ACCEPTED, self._key(doc))
        doc = self.event("item")
        variant = rng.randrange(4)
        if variant == 0:
            doc["features"] = {}
            name = "empty_features"
        elif variant == 1:
            doc["features"] = {"category": rng.choice((7, 0.5, True, False, ""))}
            name = "scalar_non_string_category"
        elif variant == 2:
            doc["features"]["active"], doc["active"] = "yes", True
            name = "active_inside_features"
        else:
            doc["user_id"] = f"u-{rng.randrange(N_USERS)}"
            name = "item_with_user"
        return Draft(_dumps(doc), name, ACCEPTED, self._key(doc))

    def _not_an_object(self) -> Draft:
        rng = self.rng
        doc = self.event()
        values = (
            b"[]",
            b"[" + _dumps(doc) + b"]",
            orjson.dumps(_dumps(doc).decode()),  # an event as a JSON string
            b"123",
            b"-1.5e3",
            b"null",
            b"true",
            b"false",
            b'""',
            b" 0 ",
        )
        i = rng.randrange(len(values) + 1)
        if i == len(values):
            return Draft(b" {} ", "empty_object", ("missing_field", "event_id"))
        return Draft(values[i], f"json_{_json_kind(orjson.loads(values[i]))}", ("wrong_type", None))

    def _tombstone(self) -> Draft:
        key = f"u-{self.rng.randrange(N_USERS)}".encode()  # a null value needs a key
        return Draft(None, "null_value", ("invalid_json", None), key)


def _dumps(doc: Any, option: int | None = None) -> bytes:
    """orjson's bytes, or the standard library's (same compact form) for integers over 64 bits."""
    try:
        return orjson.dumps(doc, option=option)
    except TypeError:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _ascii_json(doc: dict[str, Any]) -> bytes:
    """``doc`` as JSON with every non-ASCII character \\u-escaped (the standard library's)."""
    return json.dumps(doc, ensure_ascii=True).encode()


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


# Bookkeeping: one row per message, compact (1M messages).


@dataclass
class Ledger:
    """What was published and what to expect of each message, by index."""

    families: list[str]
    fields: list[str | None] = field(default_factory=lambda: [None])
    family: array[int] = field(default_factory=lambda: array("B"))
    outcome: array[int] = field(default_factory=lambda: array("B"))
    field_: array[int] = field(default_factory=lambda: array("H"))
    size: array[int] = field(default_factory=lambda: array("q"))
    crc: array[int] = field(default_factory=lambda: array("q"))
    key_crc: array[int] = field(default_factory=lambda: array("q"))
    partition: array[int] = field(default_factory=lambda: array("h"))
    offset: array[int] = field(default_factory=lambda: array("q"))
    variants: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_family: Counter[tuple[str, str]] = field(default_factory=Counter)
    intended_mismatch: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    send_errors: list[str] = field(default_factory=list)
    bytes: int = 0
    largest: int = 0

    def add(self, m: Fuzz) -> None:
        fields = self.fields
        try:
            fi = fields.index(m.field)
        except ValueError:
            fields.append(m.field)
            fi = len(fields) - 1
        self.family.append(self.families.index(m.family))
        self.outcome.append(OUTCOMES.index(m.outcome))
        self.field_.append(fi)
        size = -1 if m.value is None else len(m.value)
        self.size.append(size)
        self.crc.append(0 if m.value is None else zlib.crc32(m.value[:MAX_ORIGINAL_BYTES]))
        self.key_crc.append(-1 if m.key is None else zlib.crc32(m.key))
        self.partition.append(-1)
        self.offset.append(-1)
        self.variants[m.family, m.variant] += 1
        self.by_family[m.family, m.outcome] += 1
        self.bytes += max(size, 0)
        self.largest = max(self.largest, size)
        if m.intended is not None:
            oracle = (m.outcome, m.field)
            if m.intended != oracle and not (m.intended == ACCEPTED and m.outcome == "duplicate"):
                self.intended_mismatch[m.family, m.variant, repr(m.intended), repr(oracle)] += 1

    def sent(self, index: int, metadata: Any) -> None:
        self.partition[index] = metadata.partition
        self.offset[index] = metadata.offset

    def failed(self, index: int, exc: BaseException) -> None:
        self.send_errors.append(f"message {index}: {type(exc).__name__}: {exc}")

    def expected(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for code in self.outcome:
            counts[OUTCOMES[code]] += 1
        return counts


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def publish(settings: Settings, corpus: Corpus, n: int) -> tuple[Ledger, dict[str, float]]:
    """Generate ``n`` messages and publish them; the ledger knows each one's partition/offset."""
    ledger = Ledger(list(FAMILIES))
    producer = kafka_clients.producer(
        settings,
        linger_ms=20,
        batch_size=512 * 1024,
        max_request_size=1_048_576,  # the broker's limit: messages near 1 MB go through
    )
    unflushed = 0
    started = time.perf_counter()
    try:
        with _progress() as progress:
            task = progress.add_task("publishing", total=n, rate="")
            for m in corpus.take(n):
                ledger.add(m)
                future = producer.send(settings.events_topic, key=m.key, value=m.value)
                future.add_callback(ledger.sent, m.index)
                future.add_errback(ledger.failed, m.index)
                unflushed += 0 if m.value is None else len(m.value)
                if unflushed > FLUSH_BYTES:  # the producer's buffer is unbounded: bound it here
                    producer.flush()
                    unflushed = 0
                if m.index % 2000 == 1999:
                    elapsed = time.perf_counter() - started
                    rate = f"{(m.index + 1) / elapsed:,.0f}/s"
                    progress.update(task, completed=m.index + 1, rate=rate)
            producer.flush()
            elapsed = time.perf_counter() - started
            progress.update(task, completed=n, rate=f"{n / elapsed:,.0f}/s")
    finally:
        producer.close(timeout=10)
    unsent = sum(1 for p in ledger.partition if p < 0)
    if ledger.send_errors or unsent:
        raise RuntimeError(f"{unsent} messages not acknowledged: {ledger.send_errors[:5]}")
    return ledger, {
        "seconds": elapsed,
        "messages_per_s": n / elapsed,
        "mb_per_s": ledger.bytes / elapsed / 1e6,
        "bytes": ledger.bytes,
        "largest_value_bytes": ledger.largest,
    }


@dataclass
class WorkerRun:
    stats: Counter[str]
    seconds: float
    messages_per_s: float
    wall_s: float
    alive_at_end: bool
    exit_code: int | None
    tracebacks: int
    error_lines: int
    warning_lines: int
    excerpts: list[str]
    warnings: list[str]
    stalled: str | None


def run_worker(settings: Settings, published: int, log_path: Path, stall_s: float) -> WorkerRun:
    """ONE real worker process until ``stats.consumed`` reaches ``published`` (or it stalls)."""
    client = redis_client(settings)
    stats_key = settings.key("stats")
    stalled: str | None = None
    wall_start = time.perf_counter()
    with log_path.open("wb") as output:
        worker = spawn_worker(settings, "warning", output=output)
        first_at = first_count = last_at = 0.0
        consumed = 0
        last_change = time.monotonic()
        try:
            with _progress() as progress:
                task = progress.add_task("worker consuming", total=published, rate="")
                while consumed < published:
                    now_count = int(client.hget(stats_key, "consumed") or 0)
                    now = time.perf_counter()
                    if now_count != consumed:
                        last_change = time.monotonic()
                        if not first_at:
                            first_at, first_count = now, now_count
                        last_at = now
                        consumed = now_count
                        rate = (
                            (consumed - first_count) / (now - first_at) if now > first_at else 0.0
                        )
                        progress.update(task, completed=consumed, rate=f"{rate:,.0f}/s")
                    if consumed > published:
                        stalled = f"consumed {consumed} > published {published}"
                        break
                    if worker.poll() is not None:
                        stalled = f"worker exited with {worker.returncode} at consumed={consumed}"
                        break
                    if time.monotonic() - last_change > stall_s:
                        stalled = f"no progress for {stall_s:.0f} s at consumed={consumed}"
                        break
                    time.sleep(0.2)
            time.sleep(2.0)  # anything more would be a bug: nothing is left to consume
            stats = Counter({k.decode(): int(v) for k, v in client.hgetall(stats_key).items()})
            alive = worker.poll() is None
        finally:
            exit_code = stop_worker(worker)
            client.close()
    wall = time.perf_counter() - wall_start
    text = log_path.read_text(errors="replace")
    lines = text.splitlines()
    tracebacks = text.count("Traceback (most recent call last)")
    errors = [ln for ln in lines if re.search(r"\b(ERROR|CRITICAL)\b", ln)]
    warnings = [ln for ln in lines if re.search(r"\bWARNING\b", ln)]
    excerpts: list[str] = []
    for i, line in enumerate(lines):
        if "Traceback" in line or re.search(r"\b(ERROR|CRITICAL)\b", line):
            excerpts.append("\n".join(lines[max(0, i - 1) : i + 25]))
            if len(excerpts) >= 3:
                break
    seconds = last_at - first_at
    rate = (stats["consumed"] - first_count) / seconds if seconds > 0 else 0.0
    return WorkerRun(
        stats,
        seconds,
        rate,
        wall,
        alive,
        exit_code,
        tracebacks,
        len(errors),
        len(warnings),
        excerpts,
        list(dict.fromkeys(re.sub(r"^\S+ ", "", w)[:300] for w in warnings))[:10],
        stalled,
    )


@dataclass
class DeadLetterCheck:
    records: int = 0
    bytes: int = 0
    largest: int = 0
    per_reason: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    missing: int = 0
    wrongly_dead: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def check_deadletters(settings: Settings, ledger: Ledger) -> DeadLetterCheck:
    """Read the whole dead-letter topic; each rejected message once, as the oracle said."""
    check = DeadLetterCheck()
    tops = [-1] * (max(ledger.partition) + 1)
    for p, o in zip(ledger.partition, ledger.offset, strict=True):
        tops[p] = max(tops[p], o)
    index_of = [array("q", [-1]) * (top + 1) for top in tops]
    for i, (p, o) in enumerate(zip(ledger.partition, ledger.offset, strict=True)):
        index_of[p][o] = i
    times_seen = array("B", bytes(len(ledger.outcome)))
    reason_codes = {name: OUTCOMES.index(name) for name in REASONS}

    def problem(kind: str, i: int | None, record: dict[str, Any] | None) -> None:
        check.problems[kind] += 1
        if sum(1 for e in check.examples if e["problem"] == kind) < 3:
            example: dict[str, Any] = {"problem": kind}
            if i is not None:
                example.update(_describe(ledger, i))
            if record is not None:
                example["record"] = {k: v for k, v in record.items() if k != "original_b64"}
                example["original_b64_head"] = str(record.get("original_b64", ""))[:400]
            check.examples.append(example)

    consumer = kafka_clients.consumer(
        settings,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        max_poll_records=5000,
    )
    started = time.perf_counter()
    try:
        parts = [
            TopicPartition(settings.deadletter_topic, p)
            for p in sorted(consumer.partitions_for_topic(settings.deadletter_topic) or ())
        ]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        total = sum(ends.values())
        done = {tp for tp in parts if ends[tp] == 0}
        with _progress() as progress:
            task = progress.add_task("reading dead letters", total=total, rate="")
            while len(done) < len(parts):
                batches = consumer.poll(timeout_ms=1000)
                for tp, records in batches.items():
                    for rec in records:
                        _check_record(
                            rec,
                            settings,
                            ledger,
                            index_of,
                            times_seen,
                            reason_codes,
                            check,
                            problem,
                        )
                        if rec.offset + 1 >= ends[tp]:
                            done.add(tp)
                elapsed = time.perf_counter() - started
                progress.update(
                    task, completed=check.records, rate=f"{check.records / elapsed:,.0f}/s"
                )
    finally:
        consumer.close()
    check.seconds = time.perf_counter() - started
    for i, code in enumerate(ledger.outcome):
        is_rejected = code >= 2
        if is_rejected and times_seen[i] == 0:
            check.missing += 1
            problem("rejected message not on the dead-letter topic", i, None)
    return check


def _check_record(
    rec: Any,
    settings: Settings,
    ledger: Ledger,
    index_of: list[array[int]],
    times_seen: array[int],
    reason_codes: dict[str, int],
    check: DeadLetterCheck,
    problem: Callable[[str, int | None, dict[str, Any] | None], None],
) -> None:
    check.records += 1
    size = len(rec.value or b"")
    check.bytes += size
    check.largest = max(check.largest, size)
    try:
        record = orjson.loads(rec.value)
        source = record["source"]
        p, o = int(source["partition"]), int(source["offset"])
    except Exception:
        problem("unreadable dead-letter record", None, None)
        return
    check.per_reason[str(record.get("reason"))] += 1
    if size >= RECORD_LIMIT:
        problem("dead-letter record >= 1 MB", None, record)
    if source.get("topic") != settings.events_topic:
        problem("source.topic is not the events topic", None, record)
        return
    i = index_of[p][o] if 0 <= p < len(index_of) and 0 <= o < len(index_of[p]) else -1
    if i < 0:
        problem("source is no published message", None, record)
        return
    times_seen[i] = min(times_seen[i] + 1, 255)
    if times_seen[i] > 1:
        problem("message on the dead-letter topic more than once", i, record)
    code = ledger.outcome[i]
    if code < 2:
        check.wrongly_dead[OUTCOMES[code]] += 1
        problem(f"{OUTCOMES[code]} message dead-lettered ({record.get('reason')})", i, record)
        return
    if reason_codes.get(str(record.get("reason"))) != code:
        problem("reason differs from the oracle's", i, record)
    elif record.get("field") != ledger.fields[ledger.field_[i]]:
        problem("field differs from the oracle's", i, record)
    original = base64.b64decode(record.get("original_b64", ""))
    expected_size = max(ledger.size[i], 0)
    if record.get("original_size") != expected_size:
        problem("original_size differs", i, record)
    if zlib.crc32(original) != ledger.crc[i] or len(original) != min(
        expected_size, MAX_ORIGINAL_BYTES
    ):
        problem("original bytes differ", i, record)
    if record.get("original_truncated") != (expected_size > MAX_ORIGINAL_BYTES):
        problem("original_truncated wrong", i, record)
    key_crc = -1 if rec.key is None else zlib.crc32(rec.key)
    if key_crc != ledger.key_crc[i]:
        problem("key differs from the original key", i, record)


def _describe(ledger: Ledger, i: int) -> dict[str, Any]:
    return {
        "index": i,
        "family": ledger.families[ledger.family[i]],
        "expected": OUTCOMES[ledger.outcome[i]],
        "expected_field": ledger.fields[ledger.field_[i]],
        "partition": ledger.partition[i],
        "offset": ledger.offset[i],
        "size": ledger.size[i],
    }


def fetch_originals(settings: Settings, examples: list[dict[str, Any]]) -> None:
    """Attach the first 400 bytes (base64) of each example's message, read from the events topic."""
    wanted = [e for e in examples if "partition" in e and "record" not in e]
    if not wanted:
        return
    consumer = kafka_clients.consumer(settings, enable_auto_commit=False)
    try:
        for example in wanted:
            tp = TopicPartition(settings.events_topic, example["partition"])
            consumer.assign([tp])
            consumer.seek(tp, example["offset"])
            for _ in range(10):
                records = consumer.poll(timeout_ms=1000).get(tp, [])
                if records:
                    value = records[0].value or b""
                    example["original_b64_head"] = base64.b64encode(value[:400]).decode()
                    break
    finally:
        consumer.close()


def reconcile(
    ledger: Ledger, published: int, run: WorkerRun, dead: DeadLetterCheck
) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """Every failed check as a sentence, and the (outcome, expected, worker, on topic) rows."""
    failures: list[str] = []
    s = run.stats
    expected = ledger.expected()
    if run.stalled:
        failures.append(run.stalled)
    if not run.alive_at_end:
        failures.append("the worker was not alive at the end (crash)")
    if run.exit_code != 0:
        failures.append(f"the worker exited with {run.exit_code} on SIGTERM")
    if run.tracebacks:
        failures.append(f"{run.tracebacks} traceback(s) in the worker's output")
    if run.error_lines:
        failures.append(f"{run.error_lines} ERROR line(s) in the worker's output")
    if s["consumed"] != published:
        failures.append(f"consumed {s['consumed']} != published {published}")
    total = s["accepted"] + s["duplicates"] + s["deadlettered"]
    if total != s["consumed"]:
        failures.append(f"accepted + duplicates + deadlettered = {total} != consumed")
    rejected = sum(expected[r] for r in REASONS)
    if s["deadlettered"] != rejected:
        failures.append(f"deadlettered {s['deadlettered']} != oracle's {rejected}")
    rows: list[tuple[str, int, int, int]] = [
        ("accepted", expected["accepted"], s["accepted"], dead.wrongly_dead["accepted"]),
        ("duplicates", expected["duplicate"], s["duplicates"], dead.wrongly_dead["duplicate"]),
    ]
    for name, worker_count in (("accepted", s["accepted"]), ("duplicate", s["duplicates"])):
        if worker_count != expected[name]:
            failures.append(f"{name}: worker {worker_count} != oracle {expected[name]}")
    for reason in REASONS:
        worker_count = s["deadletter:" + reason]
        on_topic = dead.per_reason.get(reason, 0)
        rows.append((reason, expected[reason], worker_count, on_topic))
        if worker_count != expected[reason]:
            failures.append(
                f"deadletter:{reason}: worker {worker_count} != oracle {expected[reason]}"
            )
    for reason in dead.per_reason:
        if reason not in REASONS:
            failures.append(f"unknown reason {reason!r} on the dead-letter topic")
    if dead.records != rejected:
        failures.append(f"{dead.records} dead-letter records != {rejected} rejected messages")
    if dead.missing:
        failures.append(f"{dead.missing} rejected messages not on the dead-letter topic")
    for kind, count in dead.problems.items():
        if kind != "rejected message not on the dead-letter topic":
            failures.append(f"dead letters: {kind}: {count}")
    return failures, rows


def report(
    args: argparse.Namespace,
    settings: Settings,
    corpus: Corpus,
    ledger: Ledger,
    pub: dict[str, float],
    run: WorkerRun,
    dead: DeadLetterCheck,
    failures: list[str],
    rows: list[tuple[str, int, int, int]],
    wall_s: float,
) -> dict[str, Any]:
    n = len(ledger.outcome)
    fam_table = Table(title=f"{n:,} messages by family (seed {args.seed})")
    fam_table.add_column("family")
    fam_table.add_column("messages", justify="right")
    fam_table.add_column("accepted", justify="right")
    fam_table.add_column("duplicate", justify="right")
    fam_table.add_column("dead-lettered", justify="right")
    fam_table.add_column("expected reasons (oracle)")
    families: dict[str, Any] = {}
    for name in FAMILIES:
        counts = {o: ledger.by_family[name, o] for o in OUTCOMES if ledger.by_family[name, o]}
        total = sum(counts.values())
        dead_count = sum(c for o, c in counts.items() if o in REASONS)
        reasons = ", ".join(f"{o} {c:,}" for o, c in counts.items() if o in REASONS)
        fam_table.add_row(
            name,
            f"{total:,}",
            f"{counts.get('accepted', 0):,}",
            f"{counts.get('duplicate', 0):,}",
            f"{dead_count:,}",
            reasons,
        )
        variants = {v: c for (f, v), c in sorted(ledger.variants.items()) if f == name}
        families[name] = {"messages": total, "outcomes": counts, "variants": variants}
    console.print(fam_table)

    reason_table = Table(title="outcomes: oracle vs worker (stats) vs dead-letter topic")
    reason_table.add_column("outcome")
    reason_table.add_column("expected", justify="right")
    reason_table.add_column("worker", justify="right")
    reason_table.add_column("on DL topic", justify="right")
    reason_table.add_column("ok")
    for outcome, expected, worker_count, on_topic in rows:
        accepted = outcome in ("accepted", "duplicates")  # "on DL topic": wrongly there
        ok = expected == worker_count and on_topic == (0 if accepted else expected)
        reason_table.add_row(
            outcome, f"{expected:,}", f"{worker_count:,}", f"{on_topic:,}", "✓" if ok else "✗"
        )
    console.print(reason_table)

    run_table = Table(title="run")
    run_table.add_column("measure")
    run_table.add_column("value", justify="right")
    run_table.add_row(
        "publish",
        f"{pub['messages_per_s']:,.0f} msg/s, {pub['mb_per_s']:,.1f} MB/s, "
        f"{pub['seconds']:,.1f} s ({pub['bytes'] / 1e6:,.0f} MB)",
    )
    run_table.add_row(
        f"worker ({'decisions on' if settings.decisions else 'decisions off: user state only'})",
        f"{run.messages_per_s:,.0f} msg/s, {run.seconds:,.1f} s (first to last batch)",
    )
    run_table.add_row(
        "dead-letter topic read",
        f"{dead.records:,} records, "
        f"{dead.bytes / 1e6:,.0f} MB, largest {dead.largest:,} B, {dead.seconds:,.1f} s",
    )
    run_table.add_row("crashes", "0" if run.alive_at_end and not run.stalled else "1")
    run_table.add_row(
        "tracebacks / ERROR / WARNING lines",
        f"{run.tracebacks} / {run.error_lines} / {run.warning_lines}",
    )
    run_table.add_row("worker exit code (SIGTERM)", str(run.exit_code))
    run_table.add_row("wall time", f"{wall_s:,.1f} s")
    console.print(run_table)
    if ledger.intended_mismatch:
        console.print(
            "[yellow]the family's intended outcome differs from decode's (contract vs "
            "implementation, or the generator):[/yellow]"
        )
        for (fam, variant, intended, oracle), count in ledger.intended_mismatch.most_common(20):
            console.print(f"  {fam}/{variant}: intended {intended}, decode {oracle}: {count}")
    for warning in run.warnings:
        console.print("[yellow]worker warning:[/yellow] " + warning, highlight=False)
    for excerpt in run.excerpts:
        console.print("[red]worker output:[/red]\n" + excerpt, markup=False, highlight=False)
    for example in dead.examples[:10]:
        console.print(example, markup=False, highlight=False)
    if failures:
        console.print("[bold red]DID NOT RECONCILE:[/bold red]")
        for failure in failures:
            console.print(f"  - {failure}", markup=False)
    else:
        console.print(
            "[bold green]all reconciled:[/bold green] 0 crashes, counts equal, every "
            "rejected message on the dead-letter topic once with its reason"
        )

    return {
        "messages": n,
        "seed": args.seed,
        "batch_size": settings.batch_size,
        "decisions": settings.decisions,
        "max_event_bytes": settings.max_event_bytes,
        "max_future_skew_ms": settings.max_future_skew_ms,
        "topic_partitions": settings.topic_partitions,
        "ok": not failures,
        "failures": failures,
        "families": families,
        "outcomes": {
            outcome: {"expected": e, "worker": w, "deadletter_topic": t}
            for outcome, e, w, t in rows
        },
        "worker_stats": dict(run.stats),
        "publish": pub,
        "worker": {
            "messages_per_s": run.messages_per_s,
            "seconds_first_to_last_batch": run.seconds,
            "wall_s": run.wall_s,
            "crashes": 0 if run.alive_at_end and not run.stalled else 1,
            "alive_at_end": run.alive_at_end,
            "exit_code": run.exit_code,
            "tracebacks": run.tracebacks,
            "error_lines": run.error_lines,
            "warning_lines": run.warning_lines,
            "distinct_warnings": run.warnings,
            "output_excerpts": run.excerpts,
        },
        "deadletter_topic": {
            "records": dead.records,
            "bytes": dead.bytes,
            "largest_record_bytes": dead.largest,
            "per_reason": dict(dead.per_reason),
            "missing": dead.missing,
            "problems": dict(dead.problems),
            "examples": dead.examples[:20],
        },
        "generator": {
            "regenerated_ambiguous": corpus.regenerated,
            "intended_vs_decode_mismatches": [
                {"family": f, "variant": v, "intended": i, "decode": o, "count": c}
                for (f, v, i, o), c in ledger.intended_mismatch.most_common()
            ],
        },
        "wall_s": wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1_000_000, help="default 1000000")
    parser.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")
    parser.add_argument("--batch-size", type=int, default=2000, help="worker batch size")
    parser.add_argument(
        "--decisions",
        action="store_true",
        help="run the worker's learning loop too (default: user state only, faster)",
    )
    parser.add_argument(
        "--stall-s", type=float, default=300, help="give up when the worker makes no progress"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    if args.messages < 1000:
        parser.error("--messages must be at least 1000")

    wall_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="loopwise-fuzz-"))
    try:
        failures = fuzz(args, tmp, wall_start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failures else 0)


def fuzz(args: argparse.Namespace, tmp: Path, wall_start: float) -> list[str]:
    """Infra up, publish, run the worker, check; the failures (empty: all reconciled)."""
    infra = LocalInfra.for_tests(tmp)
    infra.up()
    try:
        settings = bench_settings(
            infra,
            "fuzz",
            app_id="fuzz-worker",
            key_prefix="fuzz:",
            batch_size=args.batch_size,
            decisions=args.decisions,
            state_dir=tmp / "state",
        )
        corpus = Corpus(
            args.seed,
            max_event_bytes=settings.max_event_bytes,
            max_future_skew_ms=settings.max_future_skew_ms,
        )
        mode = "decisions on" if settings.decisions else "decisions off (user state only)"
        console.print(
            f"fuzz: {args.messages:,} messages, seed {args.seed}, worker {mode}, "
            f"batch {settings.batch_size}, Kafka {infra.bootstrap_servers}"
        )
        ledger, pub = publish(settings, corpus, args.messages)
        run = run_worker(settings, args.messages, tmp / "worker.log", args.stall_s)
        dead = check_deadletters(settings, ledger)
        failures, rows = reconcile(ledger, args.messages, run, dead)
        fetch_originals(settings, dead.examples)
    finally:
        infra.down()
    wall_s = time.perf_counter() - wall_start
    result = report(args, settings, corpus, ledger, pub, run, dead, failures, rows, wall_s)
    write_json(args.out, result, console)
    if failures:
        kept = Path(tempfile.gettempdir()) / f"loopwise-fuzz-worker-{args.seed}.log"
        shutil.copy(tmp / "worker.log", kept)
        console.print(f"worker output kept in {kept}")
    return failures


if __name__ == "__main__":
    main()
