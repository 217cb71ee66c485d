"""Policy snapshots: a documented data container, optionally signed. No code, ever.

A snapshot (format 2) is::

    b"LOOPWISE-POLICY/2\\n" + header + b"\\n" + payload [+ signature]

- ``header``: one line of JSON, validated against :class:`Header` (unknown keys
  refused): ``policy`` (``vw``, ``linucb`` or ``popularity``), ``params`` (the
  policy's constructor arguments, validated against that policy's own schema),
  ``version`` (examples learned), ``payload_bytes`` and ``signature``
  (``"hmac-sha256"`` or null);
- ``payload``: exactly ``payload_bytes`` bytes of the policy's own model data:
  JSON (popularity), Vowpal Wabbit's binary model (vw), or a JSON line plus
  little-endian float64 arrays (linucb); never serialized Python objects;
- ``signature`` (when the header says ``hmac-sha256``): 64 hex digits, the
  HMAC-SHA256 of everything before it, keyed with ``LOOPWISE_SNAPSHOT_KEY``.

Loading (:func:`unpack_snapshot`, :func:`restore`) refuses, with a
:class:`SnapshotError` saying why: a blob that is not this format; an unsigned
snapshot when a key is set; a signed one without the key or with a signature
that does not verify; a policy other than the one the caller expects (the class
comes from the configured arm, never from the file); parameters outside their
schema (VW arguments, in the header or inside VW's model, outside
:data:`loopwise.learners.vw_policy.ALLOWED_OPTIONS`). Format 1
(``LOOPWISE-POLICY/1``, written before) still loads for ``vw`` and ``popularity``
(data only, unsigned); format 1 ``linucb`` snapshots held serialized Python objects
and are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from loopwise.learners.policy import Policy

__all__ = [
    "Header",
    "SnapshotError",
    "pack_snapshot",
    "restore",
    "sign_snapshot",
    "snapshot_kind",
    "unpack_snapshot",
]

MAGIC: Final = b"LOOPWISE-POLICY/2\n"
MAGIC_V1: Final = b"LOOPWISE-POLICY/1\n"
SIGNATURE: Final = "hmac-sha256"
SIGNATURE_BYTES: Final = 64  # hex digits of an HMAC-SHA256
MAX_HEADER_BYTES: Final = 1 << 20

# kind -> (module, class); the class defines `_from_snapshot(header, payload)` and `Params`.
REGISTRY: Final[dict[str, tuple[str, str]]] = {
    "vw": ("loopwise.learners.vw_policy", "VWPolicy"),
    "linucb": ("loopwise.learners.linucb", "LinUCBPolicy"),
    "popularity": ("loopwise.learners.popularity", "PopularityPolicy"),
}


class SnapshotError(ValueError):
    """A blob is not a snapshot this worker may load; the message says why."""


class Header(BaseModel):
    """The header line of a format 2 snapshot."""

    model_config = ConfigDict(extra="forbid", strict=True)

    policy: Literal["vw", "linucb", "popularity"]
    params: dict[str, Any]
    version: int = Field(ge=0)
    payload_bytes: int = Field(ge=0)
    signature: Literal["hmac-sha256"] | None = None


def pack_snapshot(kind: str, params: Mapping[str, Any], version: int, payload: bytes) -> bytes:
    """An unsigned format 2 snapshot (sign it with :func:`sign_snapshot`)."""
    header = Header(
        policy=kind,  # type: ignore[arg-type]
        params=dict(params),
        version=int(version),
        payload_bytes=len(payload),
    )
    return MAGIC + orjson.dumps(header.model_dump()) + b"\n" + payload


def sign_snapshot(blob: bytes, key: bytes | None) -> bytes:
    """``blob`` signed with ``key`` (HMAC-SHA256); unchanged when ``key`` is None."""
    if key is None:
        return blob
    header, payload = unpack_snapshot(blob)
    header["signature"] = SIGNATURE
    body = MAGIC + orjson.dumps(header) + b"\n" + payload
    return body + _mac(key, body).encode("ascii")


def snapshot_kind(blob: bytes) -> str | None:
    """The policy a blob claims to hold (unverified), for messages; None if unreadable."""
    try:
        magic = MAGIC if blob.startswith(MAGIC) else MAGIC_V1
        end = blob.find(b"\n", len(magic), len(magic) + MAX_HEADER_BYTES)
        kind = orjson.loads(blob[len(magic) : end]).get("policy")
    except (orjson.JSONDecodeError, AttributeError, ValueError):
        return None
    return kind if isinstance(kind, str) else None


def unpack_snapshot(
    blob: bytes, key: bytes | None = None, *, verify: bool = False
) -> tuple[dict[str, Any], bytes]:
    """The header (as a dict) and payload of a snapshot, checked.

    With ``verify``, the signature rules apply: with a ``key`` the snapshot must be
    signed with it; without one it must be unsigned.
    """
    if blob.startswith(MAGIC_V1):
        return _unpack_v1(blob, key, verify)
    if not blob.startswith(MAGIC):
        raise SnapshotError("not a Loopwise policy snapshot (bad magic header)")
    end = blob.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES)
    if end < 0:
        raise SnapshotError("truncated or oversized snapshot header")
    try:
        header = Header.model_validate(orjson.loads(blob[len(MAGIC) : end]))
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"snapshot header is not JSON: {exc}") from None
    except ValidationError as exc:
        raise SnapshotError(f"snapshot header refused: {_first_error(exc)}") from None
    start = end + 1
    payload = blob[start : start + header.payload_bytes]
    trailer = blob[start + header.payload_bytes :]
    if len(payload) != header.payload_bytes:
        raise SnapshotError(
            f"truncated snapshot: {len(payload)} payload bytes, header says {header.payload_bytes}"
        )
    expected_trailer = SIGNATURE_BYTES if header.signature else 0
    if len(trailer) != expected_trailer:
        raise SnapshotError(
            f"snapshot has {len(trailer)} bytes after its payload, expected {expected_trailer}"
        )
    if verify:
        if header.signature is None and key is not None:
            raise SnapshotError(
                "unsigned snapshot refused: LOOPWISE_SNAPSHOT_KEY is set, so every snapshot "
                "must be signed with it"
            )
        if header.signature is not None:
            if key is None:
                raise SnapshotError(
                    "signed snapshot, but LOOPWISE_SNAPSHOT_KEY is not set: cannot verify it"
                )
            body = blob[: start + header.payload_bytes]
            if not hmac.compare_digest(_mac(key, body).encode("ascii"), trailer):
                raise SnapshotError(
                    "snapshot signature does not verify (tampered, or signed with another key)"
                )
    return header.model_dump(), payload


def restore(blob: bytes, *, kind: str | None = None, key: bytes | None = None) -> Policy:
    """The policy of a verified snapshot. ``kind``: the policy the caller configured; a
    snapshot of another policy is refused (the class never comes from the file alone)."""
    header, payload = unpack_snapshot(blob, key, verify=True)
    found = header["policy"]
    if kind is not None and found != kind:
        raise SnapshotError(f"snapshot holds a {found!r} policy where {kind!r} is configured")
    module, cls_name = REGISTRY[found]
    cls = getattr(importlib.import_module(module), cls_name)
    try:
        params = cls.Params.model_validate(header["params"]).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise SnapshotError(f"{found} snapshot parameters refused: {_first_error(exc)}") from None
    header["params"] = params
    try:
        policy: Policy = cls._from_snapshot(header, payload)
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"{found} snapshot refused: {exc}") from None
    return policy


def _unpack_v1(blob: bytes, key: bytes | None, verify: bool) -> tuple[dict[str, Any], bytes]:
    end = blob.find(b"\n", len(MAGIC_V1), len(MAGIC_V1) + MAX_HEADER_BYTES)
    if end < 0:
        raise SnapshotError("truncated policy snapshot: no header line")
    try:
        raw = orjson.loads(blob[len(MAGIC_V1) : end])
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"policy snapshot header is not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("policy") not in ("vw", "popularity", "linucb"):
        raise SnapshotError("policy snapshot header lacks a known 'policy' name")
    if raw["policy"] == "linucb":
        raise SnapshotError(
            "format 1 linucb snapshot refused: it holds serialized Python objects, which "
            "Loopwise no longer loads; retrain (delete the model) or save it again"
        )
    if verify and key is not None:
        raise SnapshotError(
            "unsigned snapshot refused (format 1): LOOPWISE_SNAPSHOT_KEY is set, so every "
            "snapshot must be signed with it"
        )
    payload = blob[end + 1 :]
    try:
        header = Header(
            policy=raw["policy"],
            params=raw.get("params") or {},
            version=raw.get("version", 0),
            payload_bytes=len(payload),
        )
    except ValidationError as exc:
        raise SnapshotError(f"snapshot header refused: {_first_error(exc)}") from None
    return header.model_dump(), payload


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "header"
    return f"{where}: {err['msg']}"
