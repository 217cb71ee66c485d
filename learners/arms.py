"""Experiment arms: which policy serves a user, by a stable hash of the user id.

A user's position ``h(user) in [0, 1)`` is the first 8 bytes of
``blake2b(salt + user_id)`` divided by ``2**64`` (the same in every process and
run, unlike Python's ``hash``). Arms are laid out on ``[0, 1)`` in name order,
each over an interval as long as its share, so a user stays in an arm as long as
the shares do not change, and changing one share moves only the users near the
boundaries it shifts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from hashlib import blake2b
from typing import Final

__all__ = ["DEFAULT_SHARES", "ArmAssigner", "ArmConfigError", "unit_hash", "validate_shares"]

DEFAULT_SHARES: Final[Mapping[str, float]] = {"vw": 0.9, "popularity": 0.1}
_NAME: Final = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class ArmConfigError(ValueError):
    """The arm shares setting is invalid (the message names the setting and the rule)."""


def unit_hash(user_id: str, salt: str = "") -> float:
    """``int(blake2b(salt + user_id)[:8]) / 2**64``: a stable position in ``[0, 1)``."""
    digest = blake2b(f"{salt}{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def validate_shares(
    shares: Mapping[str, float],
    *,
    setting: str = "arm_shares",
    known: frozenset[str] | set[str] | None = None,
) -> dict[str, float]:
    """Check arm shares; return them as a plain dict. Raises :class:`ArmConfigError`.

    Rules: at least one arm; names match ``[a-z][a-z0-9_-]{0,31}`` (and are in
    ``known`` when given); every share is a finite number in ``[0, 1]``; the
    shares sum to 1 (within 1e-6).
    """
    if not isinstance(shares, Mapping) or not shares:
        raise ArmConfigError(f"setting {setting!r}: needs at least one arm, e.g. {{'vw': 1.0}}")
    out: dict[str, float] = {}
    for name, share in shares.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ArmConfigError(
                f"setting {setting!r}: arm name {name!r} must match [a-z][a-z0-9_-]{{0,31}}"
            )
        if known is not None and name not in known:
            raise ArmConfigError(
                f"setting {setting!r}: unknown arm {name!r}; allowed: {', '.join(sorted(known))}"
            )
        if isinstance(share, bool) or not isinstance(share, int | float):
            raise ArmConfigError(f"setting {setting!r}: share of {name!r} must be a number")
        value = float(share)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ArmConfigError(
                f"setting {setting!r}: share of {name!r} = {share!r} must be in [0, 1]"
            )
        out[name] = value
    total = math.fsum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ArmConfigError(f"setting {setting!r}: shares must sum to 1, got {total:g} ({out})")
    return out


class ArmAssigner:
    """Maps a user id to an arm name with the configured shares.

    Example::

        >>> arms = ArmAssigner({"vw": 0.9, "popularity": 0.1})
        >>> arms.assign("user-0042") in {"vw", "popularity"}
        True
        >>> arms.assign("user-0042") == arms.assign("user-0042")
        True
    """

    def __init__(
        self,
        shares: Mapping[str, float] = DEFAULT_SHARES,
        *,
        salt: str = "",
        setting: str = "arm_shares",
        known: frozenset[str] | set[str] | None = None,
    ) -> None:
        self.shares = validate_shares(shares, setting=setting, known=known)
        self.salt = salt
        self._bounds: list[tuple[float, str]] = []
        edge = 0.0
        for name in sorted(self.shares):
            if self.shares[name] > 0.0:
                edge += self.shares[name]
                self._bounds.append((edge, name))

    def assign(self, user_id: str) -> str:
        """The arm of ``user_id``: the interval of ``[0, 1)`` its hash falls into."""
        h = unit_hash(user_id, self.salt)
        for edge, name in self._bounds:
            if h < edge:
                return name
        return self._bounds[-1][1]  # h within rounding of 1.0
