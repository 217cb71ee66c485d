"""Pseudonymization: keyed pseudonyms for storage, random tokens for the log and the models."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from loopwise.config import ConfigError, load_settings
from loopwise.learners.policy import Action
from loopwise.learners.popularity import PopularityPolicy
from loopwise.pseudonyms import new_token, pseudonym, pseudonymize
from loopwise.streams.catalog import Catalog
from loopwise.streams.decisions import DecisionMaker
from loopwise.streams.decoding import decode
from loopwise.streams.pipeline import fold_users
from loopwise.streams.plan import BatchPlan
from loopwise.streams.reward_join import Decision, OpenDecision, RewardJoin, RewardRule
from loopwise.streams.user_state import StateRules, UserState

KEY = b"0123456789abcdef-test-key"


def test_a_pseudonym_is_the_documented_hmac_and_depends_on_the_key() -> None:
    expected = "p-" + hmac.new(KEY, b"u-42", hashlib.sha256).hexdigest()[:32]
    assert pseudonym(KEY, "u-42") == expected
    assert pseudonym(KEY, "u-42") != pseudonym(KEY + b"x", "u-42")
    assert pseudonym(KEY, "u-42") != pseudonym(KEY, "u-43")
    assert len({new_token() for _ in range(1000)}) == 1000


def test_settings_pseudonym_is_the_id_itself_without_a_key() -> None:
    assert load_settings().pseudonym("u-42") == "u-42"
    s = load_settings(pseudonym_key=KEY.decode())
    assert s.pseudonym("u-42") == pseudonym(KEY, "u-42")
    assert "0123456789abcdef" not in repr(s)


def test_a_short_pseudonym_key_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(pseudonym_key="short")
    assert "pseudonym_key" in str(refused.value) and "16 characters" in str(refused.value)
    assert "short" not in str(refused.value).replace("16 characters", "")


def test_an_event_is_pseudonymized_in_its_field_and_its_document() -> None:
    event = decode(b'{"event_id":"e1","type":"view","user_id":"u-42","item_id":"i","timestamp":1}')
    assert not isinstance(event, type(None))
    alias = pseudonymize(event, KEY)  # type: ignore[arg-type]
    assert alias.user_id == alias.raw["user_id"] == pseudonym(KEY, "u-42")
    assert "u-42" not in str(alias)
    item = decode(b'{"event_id":"e2","type":"item","item_id":"i","timestamp":1,"features":{}}')
    assert pseudonymize(item, KEY) is item  # type: ignore[arg-type]


def test_the_fold_gives_each_live_user_one_token_and_keeps_it() -> None:
    events = [
        decode(f'{{"event_id":"e{i}","type":"view","user_id":"u{i % 2}","item_id":"i",'
               f'"timestamp":{i}}}'.encode())
        for i in range(4)
    ]  # fmt: skip
    plan = BatchPlan()
    fold_users(events, {}, Catalog(), StateRules(), plan, tokens=True)  # type: ignore[arg-type]
    tokens = {u: s.token for u, s in plan.users.items() if s is not None}
    assert set(tokens) == {"u0", "u1"} and len(set(tokens.values())) == 2
    assert UserState.from_hash(plan.users["u0"].to_hash()).token == tokens["u0"]  # type: ignore[union-attr]

    again = BatchPlan()
    states = {u: UserState.from_hash(s.to_hash()) for u, s in plan.users.items() if s}
    fold_users(events[:1], states, Catalog(), StateRules(), again, tokens=True)  # type: ignore[arg-type]
    assert again.users["u0"].token == tokens["u0"]  # type: ignore[union-attr]

    without = BatchPlan()
    fold_users(events[:1], {}, Catalog(), StateRules(), without)  # type: ignore[arg-type]
    assert without.users["u0"].token is None  # type: ignore[union-attr]
    assert "token" not in without.users["u0"].to_hash()  # type: ignore[union-attr]


def test_policies_and_the_log_see_the_token_never_the_stored_id() -> None:
    maker = DecisionMaker(
        {"popularity": PopularityPolicy()},
        lambda _: "popularity",
        pmf_floor=0.001,
        max_candidates=10,
        default_arm="popularity",
    )
    actions = [Action("a", {"category": "x"}), Action("b", {"category": "y"})]
    alias, token = pseudonym(KEY, "u-42"), new_token()
    decision = maker.decide(alias, UserState(views=1), {}, actions, 0, subject=token)
    assert decision.user_id == alias and decision.user_features["user_id"] == token
    stored = Decision.from_stored(__import__("orjson").loads(decision.to_json()), lambda i, v: {
        "id": i, "features": next(a.features for a in actions if a.id == i)})  # fmt: skip
    assert stored is not None and stored.subject == token
    join = RewardJoin(1000, RewardRule(1.0, 0.0, 0.0, 0.0))
    record = join.record(
        OpenDecision(stored, shown_at=5, partition=0, opened_wall_ms=0, context={})
    )
    assert record.user_id == token
    assert alias not in record.to_json().decode() and "u-42" not in record.to_json().decode()
