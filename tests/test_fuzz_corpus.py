"""The fuzz bench's generator (bench/bench_fuzz.py): seeded, every family, a sound oracle.

The bench trusts the generator's expected outcomes to judge the worker, so they are
checked here without any infrastructure: the same seed gives the same stream; each
family's intended outcome (what docs/contracts.md promises) agrees with ``decode``'s;
duplicates repeat an id accepted before, and nothing else does; every message can be
published (a null value has a key, nothing exceeds the broker's limit).
"""

from __future__ import annotations

from collections import Counter

import pytest

from bench.bench_fuzz import (
    ACCEPTED,
    BROKER_VALUE_LIMIT,
    DUPLICATE,
    FAMILIES,
    MARGIN_MS,
    Corpus,
    Fuzz,
)
from loopwise.streams.decoding import REASONS, Event, decode

NOW_MS = 1_767_225_600_000
N = 20_000


@pytest.fixture(scope="module")
def stream() -> list[Fuzz]:
    return list(Corpus(11, now_ms=NOW_MS).take(N))


def test_the_same_seed_gives_the_same_stream(stream: list[Fuzz]) -> None:
    again = list(Corpus(11, now_ms=NOW_MS).take(2000))
    assert again == stream[:2000]
    other = list(Corpus(12, now_ms=NOW_MS).take(2000))
    assert [m.value for m in other] != [m.value for m in again]


def test_every_family_appears_in_about_its_share(stream: list[Fuzz]) -> None:
    counts = Counter(m.family for m in stream)
    for family, share in FAMILIES.items():
        assert counts[family] > 0, family
        assert abs(counts[family] / N - share) < max(0.2 * share, 0.003), family


def test_every_outcome_is_accepted_duplicate_or_a_reason(stream: list[Fuzz]) -> None:
    outcomes = Counter(m.outcome for m in stream)
    assert set(outcomes) <= {"accepted", "duplicate", *REASONS}
    assert outcomes.keys() >= {"accepted", "duplicate", *REASONS} - {"processing_error"}
    assert 0.25 < outcomes["accepted"] / N < 0.45  # the worker does real work


def test_intended_outcomes_agree_with_decode(stream: list[Fuzz]) -> None:
    """Where a family knows what the contract promises, decode (the oracle) says the same."""
    disagree = Counter(
        (m.family, m.variant, m.intended, (m.outcome, m.field))
        for m in stream
        if m.intended is not None
        and m.intended != (m.outcome, m.field)
        and not (m.intended == ACCEPTED and m.outcome == "duplicate")
    )
    assert not disagree, disagree.most_common(10)
    known = sum(m.intended is not None for m in stream)
    assert known > 0.85 * N


def test_duplicates_repeat_an_accepted_id_and_nothing_else_does(stream: list[Fuzz]) -> None:
    accepted: set[str] = set()
    for m in stream:
        result = decode(m.value, 65_536, NOW_MS + 300_000)
        if m.outcome in ("accepted", "duplicate"):
            assert isinstance(result, Event), (m.family, m.variant)
            if m.outcome == "accepted":
                assert result.event_id not in accepted
                accepted.add(result.event_id)
            else:
                assert result.event_id in accepted, (m.family, m.variant)
        else:
            assert not isinstance(result, Event)
            assert result.reason == m.outcome and result.field == m.field
    assert all(m.outcome == "duplicate" for m in stream if m.family == "duplicate")
    assert sum(m.outcome == "duplicate" for m in stream) == sum(
        m.family == "duplicate" for m in stream
    )


def test_no_verdict_depends_on_when_the_worker_reads_it(stream: list[Fuzz]) -> None:
    """A message refused for its future timestamp stays refused for MARGIN_MS more."""
    for m in stream:
        if (m.outcome, m.field) == ("out_of_range", "timestamp"):
            later = decode(m.value, 65_536, NOW_MS + 300_000 + MARGIN_MS)
            assert not isinstance(later, Event), m.variant
            assert (later.reason, later.field) == ("out_of_range", "timestamp")


def test_every_message_can_be_published(stream: list[Fuzz]) -> None:
    for m in stream:
        assert m.value is not None or m.key is not None  # Kafka needs a key or a value
        assert m.value is None or len(m.value) <= BROKER_VALUE_LIMIT
    assert any(m.value is None for m in stream)
    assert any(m.value is not None and len(m.value) > 900_000 for m in stream)
    assert {m.key is None for m in stream} == {True, False}


def test_the_oracle_counts_a_repeated_id_as_a_duplicate() -> None:
    corpus = Corpus(1, now_ms=NOW_MS)
    raw = b'{"event_id":"e","type":"view","user_id":"u","item_id":"i","timestamp":1}'
    assert corpus.oracle(raw) == ACCEPTED
    assert corpus.oracle(raw) == DUPLICATE
    assert corpus.oracle(raw.replace(b'"timestamp":1', b'"timestamp":-1')) == (
        "out_of_range",
        "timestamp",
    )
