"""Snapshots are data, and signed: crafted files run nothing and write nothing.

Each crafted snapshot carries a payload that would leave a marker file behind if
it ran or if VW obeyed it; every test checks the refusal *and* that the marker
does not exist.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from loopwise.config import ConfigError, load_settings
from loopwise.learners.linucb import LinUCBPolicy
from loopwise.learners.policy import Action
from loopwise.learners.popularity import PopularityPolicy
from loopwise.learners.snapshot import (
    MAGIC_V1,
    SnapshotError,
    pack_snapshot,
    restore,
    sign_snapshot,
    unpack_snapshot,
)
from loopwise.learners.targets import TargetError, make_target
from loopwise.learners.vw_policy import VWPolicy, check_vw_args, model_options
from loopwise.streams.learner import Learner

ACTIONS = [Action(f"i{i}", {"category": f"c{i % 2}"}) for i in range(4)]
SHARED = {"user": {"user_id": "u1", "views": 2}, "context": {"device": "web", "hour": 9}}
KEY = b"a-key-only-the-operator-knows"


class WritesAFile:
    """A pickle payload: unpickling it would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.path, "pwned"))


def trained(policy: Any, n: int = 50) -> Any:
    rng = np.random.default_rng(1)
    for _ in range(n):
        pmf = policy.pmf(SHARED, ACTIONS)
        chosen = int(rng.integers(len(ACTIONS)))
        policy.learn(SHARED, ACTIONS, chosen, float(pmf[chosen]), float(rng.random() < 0.4))
    return policy


@pytest.mark.parametrize("policy", [PopularityPolicy(), LinUCBPolicy(), VWPolicy()])
def test_every_policy_round_trips_through_a_signed_snapshot(policy: Any) -> None:
    policy = trained(policy)
    blob = sign_snapshot(policy.snapshot(), KEY)
    assert b"pickle" not in blob and not blob.startswith(MAGIC_V1)
    again = restore(blob, kind=policy.name, key=KEY)
    assert again.version == policy.version
    assert again.pmf(SHARED, ACTIONS).tolist() == policy.pmf(SHARED, ACTIONS).tolist()


def test_a_pickle_payload_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(WritesAFile(marker))
    old_header = orjson.dumps({"policy": "linucb", "params": {}, "version": 1})
    with pytest.raises(SnapshotError, match="holds serialized Python objects"):
        restore(MAGIC_V1 + old_header + b"\n" + payload)  # the format that used to unpickle
    with pytest.raises(SnapshotError):
        restore(pack_snapshot("linucb", {}, 1, payload), kind="linucb")  # not JSON + arrays
    with pytest.raises(SnapshotError):
        restore(pack_snapshot("popularity", {}, 1, payload), kind="popularity")
    assert not marker.exists()


@pytest.mark.parametrize(
    "params",
    [
        {"exploration": "custom", "args": "--cb_explore_adf -f {path}"},
        {"exploration": "custom", "args": "--cb_explore_adf --readable_model={path}"},
        {"exploration": "squarecb", "extra": "--invert_hash {path}"},
        {"exploration": "squarecb", "extra": "-p {path}"},
        {"exploration": "squarecb", "interactions": ["UA -f {path}"]},
        {"exploration": "squarecb", "cb_type": "mtr --cache_file {path}"},
    ],
)
def test_dangerous_vw_arguments_in_a_snapshot_are_refused_and_write_nothing(
    tmp_path: Path, params: dict[str, Any]
) -> None:
    marker = tmp_path / "written-by-vw"
    crafted = orjson.loads(orjson.dumps(params).replace(b"{path}", str(marker).encode()))
    model = trained(VWPolicy(), 5).snapshot()
    header, payload = unpack_snapshot(model)
    blob = pack_snapshot("vw", {**header["params"], **crafted}, 5, payload)
    with pytest.raises(SnapshotError):
        policy = restore(blob, kind="vw")
        policy.close()  # VW writes -f / --readable_model files when it finishes
    assert not marker.exists()


def test_a_vw_model_whose_own_options_write_a_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "readable.txt"
    header, payload = unpack_snapshot(trained(VWPolicy(), 5).snapshot())
    options = model_options(payload)
    assert "--cb_explore_adf" in options
    crafted = f"{options} --readable_model {marker}".encode()
    start = payload.find(options.encode())
    patched = (
        payload[: start - 4]
        + (len(crafted) + 1).to_bytes(4, "little")
        + crafted
        + payload[start + len(options) :]
    )
    with pytest.raises(SnapshotError, match="--readable_model"):
        restore(pack_snapshot("vw", header["params"], 5, patched), kind="vw")
    assert not marker.exists()


def test_vw_arguments_are_learning_options_only_wherever_they_come_from(tmp_path: Path) -> None:
    marker = tmp_path / "model.vw"
    for args in (f"--cb_explore_adf -f {marker}", f"--cb_explore_adf -d {marker}"):
        with pytest.raises(ValueError, match="is not allowed"):
            VWPolicy(args=args)
        with pytest.raises(ConfigError, match="LOOPWISE_VW_ARGS"):
            load_settings(vw_args=args)
        with pytest.raises(TargetError, match="is not allowed"):
            make_target(f"vw:{args}")
    check_vw_args("--cb_explore_adf --squarecb --gamma_scale 50 -b 18 --min_cb_cost -1 -l0.5")
    assert not marker.exists()


def test_signature_rules() -> None:
    blob = trained(PopularityPolicy()).snapshot()
    signed = sign_snapshot(blob, KEY)
    assert restore(signed, kind="popularity", key=KEY).version == 50
    assert restore(blob, kind="popularity").version == 50  # no key: unsigned is fine

    tampered = bytearray(signed)
    tampered[-70] ^= 1  # a byte of the payload
    with pytest.raises(SnapshotError, match="does not verify"):
        restore(bytes(tampered), key=KEY)
    with pytest.raises(SnapshotError, match="does not verify"):
        restore(signed, key=b"another key")
    with pytest.raises(SnapshotError, match="unsigned snapshot refused"):
        restore(blob, key=KEY)
    with pytest.raises(SnapshotError, match="cannot verify"):
        restore(signed)
    stripped = signed[:-64].replace(b'"signature":"hmac-sha256"', b'"signature":null')
    with pytest.raises(SnapshotError, match="unsigned snapshot refused"):
        restore(stripped, key=KEY)  # removing the signature does not help
    old = MAGIC_V1 + orjson.dumps({"policy": "popularity", "params": {}, "version": 0}) + b"\n{}"
    with pytest.raises(SnapshotError, match="unsigned snapshot refused"):
        restore(old, key=KEY)


def test_the_class_comes_from_the_configured_arm_and_params_from_its_schema() -> None:
    blob = PopularityPolicy().snapshot()
    with pytest.raises(SnapshotError, match="'popularity' policy where 'vw' is configured"):
        restore(blob, kind="vw")
    header, payload = unpack_snapshot(blob)
    for params in ({"epsilon": 2.0}, {"surprise": 1}, {"top_k": "all"}):
        crafted = pack_snapshot("popularity", {**header["params"], **params}, 0, payload)
        with pytest.raises(SnapshotError, match="parameters refused"):
            restore(crafted, kind="popularity")
    extra = blob + b"trailing"
    with pytest.raises(SnapshotError, match="after its payload"):
        restore(extra)
    with pytest.raises(SnapshotError, match="truncated"):
        restore(blob[:-3])


def test_linucb_snapshot_sizes_are_checked() -> None:
    blob = trained(LinUCBPolicy()).snapshot()
    header, payload = unpack_snapshot(blob)
    with pytest.raises(SnapshotError, match="array bytes"):
        restore(pack_snapshot("linucb", header["params"], 50, payload[:-8]), kind="linucb")


def test_the_worker_refuses_a_tampered_model_in_redis_and_says_what_to_do() -> None:
    settings = load_settings(arms={"popularity": 1.0}, snapshot_key="k1")
    learner = Learner(settings, None, {"popularity": PopularityPolicy()})  # type: ignore[arg-type]
    good = sign_snapshot(trained(PopularityPolicy()).snapshot(), b"k1")
    raw = {b"popularity": good, b"offsets": b'{"0": 5}'}
    assert learner.load_snapshot(raw)
    assert learner.policies["popularity"].version == 50
    tampered = good.replace(b'"version":50', b'"version":51')
    with pytest.raises(SnapshotError, match="Delete that key") as refused:
        learner.load_snapshot({**raw, b"popularity": tampered})
    assert "k1" not in str(refused.value)  # the key is never printed


def test_the_snapshot_key_is_environment_only_and_never_printed(tmp_path: Path) -> None:
    config = tmp_path / "loopwise.toml"
    config.write_text('snapshot_key = "in-a-file"\n')
    with pytest.raises(ConfigError, match="LOOPWISE_SNAPSHOT_KEY"):
        load_settings(config)
    os.environ.pop("LOOPWISE_CONFIG", None)
    settings = load_settings(snapshot_key="s3cret")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    assert settings.as_env()["LOOPWISE_SNAPSHOT_KEY"] == "s3cret"  # for child processes
