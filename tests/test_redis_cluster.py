"""The Redis Cluster key layout, its settings and the per-partition routing of batches
(pure: no Redis; the worker on a real cluster is tests/test_redis_cluster_integration.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from loopwise.config import ConfigError, load_settings
from loopwise.streams.pipeline import Message
from loopwise.streams.routing import Pipelines


def slot_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first {...} if non-empty, else the key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


def test_one_redis_keeps_the_documented_key_names() -> None:
    s = load_settings()
    assert s.key("user", "u-42") == s.partition_key(3, "user", "u-42") == "loopwise:user:u-42"
    assert s.key("model", "lease") == "loopwise:model:lease"
    assert s.partition_pattern("user", "*") == "loopwise:user:*"


def test_on_a_cluster_a_partitions_keys_share_its_slot_and_the_models_share_one() -> None:
    s = load_settings(redis_cluster=True)
    keys = [
        s.partition_key(3, "user", "u-{42}"),  # a user id with braces does not move the tag
        s.partition_key(3, "seen", "123"),
        s.partition_key(3, "positions"),
        s.partition_key(3, "stats"),
        s.partition_key(3, "join", "3"),
        s.partition_key(3, "outbox", "3"),
        s.partition_key(3, "decision", "abc"),
        s.partition_key(3, "forgotten"),
    ]
    assert {slot_tag(k) for k in keys} == {"p3"}
    assert keys[0] == "loopwise:{p3}:user:u-{42}"
    assert slot_tag(s.partition_key(4, "seen", "123")) == "p4"  # idempotency keys spread
    assert {slot_tag(s.key("model")), slot_tag(s.key("model", "lease"))} == {"model"}
    # What serving layers read hashes by user, as on one Redis.
    assert s.key("nba", "u-42") == "loopwise:nba:u-42" == slot_tag(s.key("nba", "u-42"))
    assert s.partition_pattern("stats") == "loopwise:{p*}:stats"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"key_prefix": "{app}:"}, "key_prefix"),
        ({"redis_url": "unix:///tmp/redis.sock"}, "redis_cluster"),
    ],
)
def test_a_cluster_setting_that_cannot_work_is_refused_by_name(
    overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(redis_cluster=True, **overrides)


class FakePipeline:
    """Stands in for a Pipeline only where the router touches it (no I/O here)."""

    def __init__(self, partition: int | None) -> None:
        self.partition = partition
        self.loop = None
        self.disowned: list[set[int]] = []
        self.checkpoint = self

    def disown(self, partitions: set[int]) -> None:
        self.disowned.append(set(partitions))


def messages(partitions: list[int]) -> list[Message]:
    return [Message(None, b"{}", "t", p, o) for o, p in enumerate(partitions)]


def test_one_redis_runs_a_batch_as_one_part() -> None:
    router = Pipelines(FakePipeline, per_partition=False)  # type: ignore[arg-type]
    batch = messages([0, 1, 0, 2])
    [(pipeline, part)] = router.split(batch)
    assert part == batch and pipeline is router.get(5)


def test_a_cluster_splits_a_batch_by_partition_in_order_and_forgets_revoked_ones() -> None:
    router = Pipelines(FakePipeline, per_partition=True)  # type: ignore[arg-type]
    batch = messages([2, 0, 2, 1, 0])
    parts = router.split(batch)
    assert [p.partition for p, _ in parts] == [2, 0, 1]  # type: ignore[attr-defined]
    assert [[m.offset for m in part] for _, part in parts] == [[0, 2], [1, 4], [3]]
    assert Counter(m.partition for _, part in parts for m in part) == Counter([2, 0, 2, 1, 0])
    kept = router.get(0)
    gone = router.get(2)
    router.disown({2, 7})
    assert gone.disowned == [{2, 7}, {2, 7}]  # type: ignore[attr-defined]  # checkpoint, self
    assert kept.disowned == []  # type: ignore[attr-defined]
    assert router.get(2) is not gone  # a partition that comes back starts afresh
    assert [p.partition for p in router.all()] == [0, 1, 2]  # type: ignore[attr-defined]
