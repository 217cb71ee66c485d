"""Pseudonymous user ids: what Loopwise stores, logs and learns instead of a user's id.

With ``pseudonym_key`` set (``LOOPWISE_PSEUDONYM_KEY``), two ids stand for a user:

- **the pseudonym** ``p-`` + the first 32 hex digits of HMAC-SHA256(key, UTF-8 user id):
  the id in every Redis key and value (``user:{pseudonym}``, ``nba:{pseudonym}``, stored and
  open decisions, the ``forgotten`` tombstone's hash). Deterministic, so that a serving layer
  holding the key finds ``nba:{pseudonym}`` (:func:`pseudonym`; ``loopwise pseudonym USER``),
  and one-way: Redis alone does not give the id back.
- **the token** ``t-`` + 32 random hex digits, drawn when the user first gets a state and
  kept in the ``token`` field of ``user:{pseudonym}``: the ``user_id`` of the user's
  propensity-log records (and their Kafka key) and the ``user_id`` the policies learn. A
  ``forget`` (or an event without consent) deletes the user's hash, token included: nothing
  then ties the token, on the append-only log and in the models, to the user, whoever holds
  the key. A user who comes back gets a new token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from typing import Final

from loopwise.streams.decoding import Event

PSEUDONYM_PREFIX: Final = "p-"
TOKEN_PREFIX: Final = "t-"


def pseudonym(key: bytes, user_id: str) -> str:
    """The stored id of ``user_id``: ``p-`` + 32 hex digits of HMAC-SHA256(key, id)."""
    digest = hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:32]


def new_token() -> str:
    """A user's log-and-learning id: 128 random bits, unrelated to the id or the key."""
    return TOKEN_PREFIX + secrets.token_hex(16)


def pseudonymize(event: Event, key: bytes) -> Event:
    """The event with its ``user_id`` (field and raw document) replaced by the pseudonym."""
    if event.user_id is None:
        return event
    alias = pseudonym(key, event.user_id)
    return dataclasses.replace(event, user_id=alias, raw={**event.raw, "user_id": alias})
