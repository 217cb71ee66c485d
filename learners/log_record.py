"""The propensity-log record: one closed decision, as written to ``loopwise.propensity-log``.

One JSON object per closed decision, fields in this order (:data:`FIELDS`)::

    {"decision_id", "timestamp", "user_id", "arm", "policy_version", "context": {…},
     "user_features": {…}, "actions": [{"id", "features": {…}}…], "chosen", "propensity",
     "pmf": [float…], "reward", "reward_components": {…}}

:class:`LogRecord` is the one type for it: the reward join builds it and serializes it with
:meth:`LogRecord.to_json`; the learner, the replay's targets and reward model read it with
:meth:`LogRecord.from_json` / :meth:`LogRecord.from_dict`, which validate it with
:func:`check_record`, and see a decision's features through :meth:`LogRecord.shared` and
:meth:`LogRecord.action_list`. The replay's bulk validation (``loopwise.replay``) starts from
:func:`plain_numbers` and must accept exactly what :func:`check_record` accepts.

**The rules** (:func:`check_record`; the first rule broken, in this order, gives the reason):

* ``invalid_actions``: ``actions`` is not a non-empty list of objects with an ``id``;
* ``invalid_context``: ``context`` is present and not an object (absent: ``{}``);
* ``missing_chosen``, ``chosen_out_of_range``: no ``chosen``, or not an int index into
  ``actions``;
* ``missing_propensity``, ``invalid_propensity``: no ``propensity``, or not a number in
  ``(0, 1]`` (NaN included);
* ``invalid_pmf``: ``pmf``, when present, is not one finite number >= 0 per action summing to 1
  (within :data:`PMF_SUM_TOLERANCE`);
* ``propensity_pmf_mismatch``: ``pmf[chosen]`` is further than :data:`PROPENSITY_TOLERANCE`
  from ``propensity``;
* ``missing_reward``, ``invalid_reward``: no ``reward``, or not a finite number.

Reading bytes adds ``invalid_json`` (not JSON), ``not_an_object`` (a JSON value that is not an
object) and ``tombstone`` (a null Kafka value). Other fields are not checked: a record from
another producer without ``decision_id`` or ``user_id`` is still a usable bandit example.

**The features a policy sees** (:meth:`LogRecord.shared`)::

    {"user": user_features, "context": context}

where a missing, null or empty ``user_features`` counts as ``{"user_id": user_id}`` (``{}``
without a ``user_id`` either): that is exactly what the decision maker gives a user with no
state (``loopwise.streams.decisions.user_features``), so such a record is replayed and learned
as the decision of a user the worker knew nothing about. The actions are
:meth:`LogRecord.action_list`: ``Action(str(id), features)``, a missing, null or empty
``features`` being ``{}``. The learner, the replay's targets and its reward model all use
these rules. They are total: a ``user_features`` or an action's ``features`` that is not an
object (which the worker never writes) counts as missing rather than failing a policy, so the
rules of :func:`check_record` stay the replay's rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from loopwise.learners.policy import Action

__all__ = [
    "FIELDS",
    "FIELD_KINDS",
    "PMF_SUM_TOLERANCE",
    "PROPENSITY_TOLERANCE",
    "REASONS",
    "LogRecord",
    "LogRecordError",
    "Numbers",
    "check_record",
    "plain_numbers",
    "record_numbers",
]

FIELDS: Final = (
    "decision_id",
    "timestamp",
    "user_id",
    "arm",
    "policy_version",
    "context",
    "user_features",
    "actions",
    "chosen",
    "propensity",
    "pmf",
    "reward",
    "reward_components",
)
"""The record's fields, in the order they are written."""

FIELD_KINDS: Final[Mapping[str, str]] = {
    "decision_id": "string",
    "timestamp": "integer",
    "user_id": "string",
    "arm": "string",
    "policy_version": "string",
    "context": "object",
    "user_features": "object",
    "actions": "actions",
    "chosen": "integer",
    "propensity": "number",
    "pmf": "numbers",
    "reward": "number",
    "reward_components": "object",
}
"""The JSON type each field holds when the writer wrote it (``actions``: ``[{"id", "features"}]``,
``numbers``: a list of numbers); the Parquet export maps each kind to a column type."""

REASONS: Final = (
    "invalid_json",
    "not_an_object",
    "tombstone",
    "invalid_actions",
    "invalid_context",
    "missing_chosen",
    "chosen_out_of_range",
    "missing_propensity",
    "invalid_propensity",
    "invalid_pmf",
    "propensity_pmf_mismatch",
    "missing_reward",
    "invalid_reward",
)
"""Every reason a record (or the bytes of one) can be refused for."""

PROPENSITY_TOLERANCE: Final = 1e-9
"""How far ``propensity`` may be from ``pmf[chosen]``."""
PMF_SUM_TOLERANCE: Final = 1e-6
"""How far a logged pmf's sum may be from 1."""


class LogRecordError(ValueError):
    """A record that breaks a rule: ``reason`` is one of :data:`REASONS`, ``detail`` says how."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------ validation


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def check_record(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """None when the record is usable, else ``(reason, detail)`` (see the module docstring)."""
    actions = record.get("actions")
    if not isinstance(actions, list) or not actions:
        return "invalid_actions", "actions must be a non-empty list"
    if not all(isinstance(a, dict) and "id" in a for a in actions):
        return "invalid_actions", 'every action must be an object with an "id"'
    if not isinstance(record.get("context", {}), dict):
        return "invalid_context", "context must be an object"
    chosen = record.get("chosen")
    if chosen is None:
        return "missing_chosen", "no chosen"
    if not isinstance(chosen, int) or isinstance(chosen, bool) or not 0 <= chosen < len(actions):
        return "chosen_out_of_range", f"chosen={chosen!r} with {len(actions)} actions"
    propensity = record.get("propensity")
    if propensity is None:
        return "missing_propensity", "no propensity"
    if not _number(propensity) or not 0.0 < propensity <= 1.0:  # NaN fails the comparison
        return "invalid_propensity", f"propensity={propensity!r} is not in (0, 1]"
    pmf = record.get("pmf")
    if pmf is not None:
        if (
            not isinstance(pmf, list)
            or len(pmf) != len(actions)
            or not all(_number(p) and _finite(p) and p >= 0 for p in pmf)
            or abs(math.fsum(pmf) - 1.0) > PMF_SUM_TOLERANCE
        ):
            return "invalid_pmf", "pmf must hold one probability per action, summing to 1"
        if abs(pmf[chosen] - propensity) > PROPENSITY_TOLERANCE:
            return (
                "propensity_pmf_mismatch",
                f"propensity={propensity!r} but pmf[{chosen}]={pmf[chosen]!r}",
            )
    reward = record.get("reward")
    if reward is None:
        return "missing_reward", "no reward"
    if not _number(reward) or not _finite(reward):
        return "invalid_reward", f"reward={reward!r} is not a finite number"
    return None


Numbers = tuple[int, int, Any, Any, Any]
"""``(number of actions, chosen, propensity, reward, pmf or None)`` of one record."""

_NUMBER_TYPES: Final = (float, int)
_EMPTY: Final[dict[str, Any]] = {}


def plain_numbers(record: Mapping[str, Any]) -> Numbers | None:
    """The record's numbers when its structure passes a cheap check with exact types, else None.

    For bulk validation: a record cleared here still has to pass the numeric rules (propensity,
    reward, pmf), which the caller checks for a whole chunk at once; a record not cleared goes
    to :func:`check_record`, which decides and gives the reason. Never clears a record that
    :func:`check_record` refuses for a structural reason.
    """
    actions = record.get("actions")
    if type(actions) is not list or not actions:
        return None
    k = len(actions)
    chosen = record.get("chosen")
    if type(chosen) is not int or not 0 <= chosen < k:
        return None
    propensity = record.get("propensity")
    reward = record.get("reward")
    if type(propensity) not in _NUMBER_TYPES or type(reward) not in _NUMBER_TYPES:
        return None
    pmf = record.get("pmf")
    if pmf is not None and (type(pmf) is not list or len(pmf) != k):
        return None
    if type(record.get("context", _EMPTY)) is not dict:
        return None
    for action in actions:
        if type(action) is not dict or "id" not in action:
            return None
    return k, chosen, propensity, reward, pmf


def record_numbers(record: Mapping[str, Any]) -> Numbers:
    """The numbers of a record that passed :func:`check_record`."""
    return (
        len(record["actions"]),
        record["chosen"],
        record["propensity"],
        record["reward"],
        record.get("pmf"),
    )


# ---------------------------------------------------------------------------------- record


@dataclass(slots=True, kw_only=True)
class LogRecord:
    """One propensity-log record (see the module docstring for the rules and the field order).

    Values are kept as they were read (an int reward stays an int), so a record with every
    field of :data:`FIELDS` serializes back to the bytes it was read from (an absent field is
    written as null, an absent ``context`` as ``{}``); other fields are not kept (``loopwise
    export`` copies messages, not :class:`LogRecord` objects, and keeps them).

    >>> r = LogRecord(decision_id="d1", user_id="u1", actions=[{"id": "a"}, {"id": "b"}],
    ...               chosen=1, propensity=0.5, reward=1.0)
    >>> r.shared()
    {'user': {'user_id': 'u1'}, 'context': {}}
    >>> LogRecord.from_json(r.to_json()) == r
    True
    """

    decision_id: str | None = None
    timestamp: int | None = None
    user_id: str | None = None
    arm: str | None = None
    policy_version: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    user_features: dict[str, Any] | None = None  # as read: shared() decides what it means
    actions: list[dict[str, Any]]  # [{"id", "features"}]
    chosen: int
    propensity: float
    pmf: list[float] | None = None
    reward: float
    reward_components: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        """The log message: one JSON object, fields in :data:`FIELDS` order."""
        # orjson serializes a dataclass natively, in field order, without asdict()'s deep copy.
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, raw: bytes | str | None, *, check: bool = True) -> LogRecord:
        """Parse a log message (:class:`LogRecordError` with its reason if it is not usable).

        ``check=False`` skips :func:`check_record`, for records this process wrote itself.
        """
        if raw is None:
            raise LogRecordError("tombstone", "null value")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise LogRecordError("invalid_json", str(exc)) from None
        return cls.from_dict(data, check=check)

    @classmethod
    def from_dict(cls, data: Any, *, check: bool = True) -> LogRecord:
        """A decoded record (:class:`LogRecordError` with its reason if it is not usable).

        ``check=False`` skips :func:`check_record`, for records that already passed it.
        """
        if type(data) is not dict:
            raise LogRecordError("not_an_object", f"a JSON {type(data).__name__}")
        if check:
            bad = check_record(data)
            if bad is not None:
                raise LogRecordError(*bad)
        get: Callable[[str], Any] = data.get  # check=False: missing fields are None
        return cls(
            decision_id=get("decision_id"),
            timestamp=get("timestamp"),
            user_id=get("user_id"),
            arm=get("arm"),
            policy_version=get("policy_version"),
            context=get("context") or {},
            user_features=get("user_features"),
            actions=get("actions"),
            chosen=get("chosen"),
            propensity=get("propensity"),
            pmf=get("pmf"),
            reward=get("reward"),
            reward_components=get("reward_components"),
        )

    def shared(self) -> dict[str, Any]:
        """``{"user": ..., "context": ...}``, a policy's ``shared`` argument for this decision.

        A missing, null, empty or non-object ``user_features`` is ``{"user_id": user_id}``
        (``{}`` with no ``user_id``): what the decision maker gives a user with no state.
        """
        user = self.user_features
        if not user or not isinstance(user, dict):
            user = {} if self.user_id is None else {"user_id": self.user_id}
        return {"user": user, "context": self.context}

    def action_list(self) -> list[Action]:
        """The candidate actions as :class:`~loopwise.learners.policy.Action` objects, in order.

        A missing, null, empty or non-object ``features`` is ``{}``.
        """
        return [Action(str(a["id"]), _features(a.get("features"))) for a in self.actions]


def _features(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
