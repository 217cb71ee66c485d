"""The learner: policies learn from the propensity log, in order, and snapshot with offsets.

The log is the source of truth for learning: the learner consumes
``loopwise.propensity-log`` and every policy learns from every record (each is
a logged bandit example with its propensity, whichever arm made it), except
the holdout, which learns only from its own arm's records. Models are
snapshotted to Redis (``{p}model``: one field per arm, and ``offsets``, the next
log offset to learn per partition) every ``snapshot_interval_s``; log offsets
are acked to Kafka only once a snapshot containing them is saved. After a
restart the policies are restored from the snapshot and records below its
offsets are skipped: nothing is learned twice, nothing is skipped.

With ``learn_sample_rate`` below 1 the policies learn a sample of the log: the records whose
decision id hashes below the rate (:func:`sampled`), so a standby that takes over from a
snapshot's offsets learns exactly the records its predecessor would have. The sample ignores
the reward, so what the policies learn stays unbiased (each record keeps its propensity); the
pre-filter's popularity and the reward monitors still count every record.

The learner also watches each arm's reward rate with an ADWIN drift monitor
(:class:`loopwise.learners.river_models.RewardMonitor`): a change is logged at INFO
and every snapshot writes ``reward_monitor`` (JSON, per arm: records seen since
the worker started, mean, the mean over ADWIN's current window, its width, the
drifts detected) beside the models, for ``loopwise stats``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter as PromCounter

from loopwise.config import Settings
from loopwise.learners.log_record import LogRecord, LogRecordError
from loopwise.learners.policy import Policy, restore
from loopwise.learners.popularity import ItemPopularity
from loopwise.learners.river_models import RewardMonitor
from loopwise.learners.snapshot import SnapshotError, sign_snapshot
from loopwise.streams.decisions import POPULARITY_HALF_LIFE

if TYPE_CHECKING:
    from loopwise.streams.learning import Lease

log = logging.getLogger("loopwise.learner")

LOG_INVALID = PromCounter(
    "loopwise_log_invalid_total", "propensity-log records skipped as invalid", ["reason"]
)
LOG_NOT_SAMPLED = PromCounter(
    "loopwise_log_not_sampled_total", "propensity-log records outside learn_sample_rate"
)


def sampled(decision_id: str, rate: float) -> bool:
    """Whether the policies learn the record of ``decision_id`` at ``learn_sample_rate``
    ``rate``: the first 8 bytes of its BLAKE2b digest, as a fraction of 2^64, below it."""
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(decision_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2.0**64


def build_policies(settings: Settings) -> dict[str, Policy]:
    """One policy per arm (and the holdout), with the settings' arguments."""
    policies: dict[str, Policy] = {}
    for arm in {*settings.arms, settings.holdout_arm}:
        if arm == "vw":
            from loopwise.learners.vw_policy import VWPolicy

            policies[arm] = VWPolicy(args=settings.vw_args) if settings.vw_args else VWPolicy()
        elif arm == "linucb":
            from loopwise.learners.linucb import LinUCBPolicy

            policies[arm] = LinUCBPolicy()
        elif arm == "popularity":
            from loopwise.learners.popularity import PopularityPolicy

            policies[arm] = PopularityPolicy()
        else:  # pragma: no cover - the settings validate arm names
            raise ValueError(f"unknown arm {arm!r}")
    return policies


class Learner:
    """Feeds log records to the policies; snapshots them with the offsets they include."""

    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        policies: MutableMapping[str, Policy],
        popularity: ItemPopularity | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.policies = policies
        # The pre-filter's popularity (shared with DecisionMaker.popularity): decayed rewards.
        self.popularity = (
            popularity if popularity is not None else ItemPopularity(POPULARITY_HALF_LIFE)
        )
        self.offsets: dict[int, int] = {}
        self.learned = 0
        self.skipped = 0
        self.invalid = 0  # records that are not valid log records: never learned
        self.not_sampled = 0  # valid records outside learn_sample_rate: counted, not learned
        self.invalid_reasons: Counter[str] = Counter()
        self._snapshot_at = time.monotonic()
        self._saved_offsets: dict[int, int] = {}
        self.monitors: dict[str, RewardMonitor] = {}
        # The snapshot's version: +1 at each snapshot; deciders load a newer one.
        self.version = 0

    @property
    def key(self) -> str:
        return self.settings.key("model")

    async def restore(self) -> bool:
        """Load the last snapshot, if any; True if one was found."""
        return self.load_snapshot(await self.client.hgetall(self.key))

    def load_snapshot(self, raw: Mapping[Any, Any], level: int = logging.INFO) -> bool:
        """Restore the policies and offsets of a snapshot hash (as read from ``{p}model``);
        ``level``: of the line saying so (the periodic reloads say it at DEBUG)."""
        if not raw:
            return False
        fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        for arm in list(self.policies):
            if arm in fields:
                try:  # the class is the configured arm's; the file only brings data
                    self.policies[arm] = restore(
                        bytes(fields[arm]), kind=arm, key=self.settings.snapshot_key_bytes
                    )
                except SnapshotError as exc:
                    raise SnapshotError(
                        f"the model snapshot of arm {arm!r} in Redis ({self.key}) is refused: "
                        f"{exc}. Nothing was loaded. Delete that key to retrain from the log "
                        f"(redis-cli DEL {self.key}), or fix LOOPWISE_SNAPSHOT_KEY"
                    ) from None
        self.offsets = {int(p): int(o) for p, o in orjson.loads(fields["offsets"]).items()}
        self._saved_offsets = dict(self.offsets)
        self.version = int(fields.get("version") or 0)
        if fields.get("prefilter_popularity"):
            saved = orjson.loads(fields["prefilter_popularity"])
            self.popularity = ItemPopularity.from_scores(
                saved["scores"], self.popularity.half_life, saved["total"]
            )
        invalid = orjson.loads(fields.get("invalid_records") or b"{}")
        self.invalid_reasons = Counter({str(k): int(v) for k, v in invalid.items()})
        self.invalid = sum(self.invalid_reasons.values())
        versions = {arm: policy.version for arm, policy in self.policies.items()}
        log.log(
            level,
            "loaded model snapshot %d: policies %s at log offsets %s",
            self.version,
            versions,
            self.offsets,
        )
        return True

    def learn(self, records: Sequence[tuple[int, int, bytes | None]]) -> int:
        """Learn from (partition, offset, value) records in log order; the number learned.

        A value that is not a valid log record (:func:`loopwise.learners.log_record.check_record`:
        the replay's rules) is skipped with a warning naming the reason and counted in
        :attr:`invalid` and :attr:`invalid_reasons`; its offset counts as consumed.
        """
        learned = 0
        holdout = self.settings.holdout_arm
        rate = self.settings.learn_sample_rate
        for partition, offset, value in records:
            if offset < self.offsets.get(partition, 0):
                self.skipped += 1
                continue
            self.offsets[partition] = offset + 1
            try:
                record = LogRecord.from_json(value)
            except LogRecordError as exc:
                self.invalid += 1
                self.invalid_reasons[exc.reason] += 1
                LOG_INVALID.labels(exc.reason).inc()
                log.warning(
                    "log record at partition %d offset %d not learned: %s (%s)",
                    partition,
                    offset,
                    exc.reason,
                    exc.detail,
                )
                continue
            reward = float(record.reward)
            self._watch(str(record.arm or "unknown"), reward)
            if not sampled(str(record.decision_id), rate):
                self.not_sampled += 1
                LOG_NOT_SAMPLED.inc()
                self._count_popularity(str(record.actions[record.chosen]["id"]), reward)
                continue
            shared, actions = record.shared(), record.action_list()
            chosen, propensity = record.chosen, float(record.propensity)
            for arm, policy in self.policies.items():
                # The holdout learns only from its own traffic: a holdout that learned from
                # the personalized arms' choices would no longer measure "without them".
                if arm != holdout or record.arm == holdout:
                    policy.learn(shared, actions, chosen, propensity, reward)
            self._count_popularity(actions[chosen].id, reward)
            learned += 1
        self.learned += learned
        return learned

    def _count_popularity(self, item_id: str, reward: float) -> None:
        # Every learned example ages the counts by one step, rewarded or not; a negative
        # reward (a configurable penalty) counts as none: items are ranked by their wins.
        self.popularity.update(item_id, max(reward, 0.0))

    def _watch(self, arm: str, reward: float) -> None:
        monitor = self.monitors.get(arm)
        if monitor is None:
            monitor = self.monitors[arm] = RewardMonitor()
        if monitor.update(reward):
            summary = monitor.summary()
            log.info(  # news, not trouble: a learning arm's rate is meant to change
                "reward rate of arm %r changed (ADWIN, record %d of this worker): "
                "now %.4f over the last %d records, %.4f overall",
                arm,
                summary["n"],
                summary["recent_mean"],
                summary["window"],
                summary["mean"],
            )

    def monitor_summary(self) -> dict[str, dict[str, Any]]:
        """Per arm: :meth:`loopwise.learners.river_models.RewardMonitor.summary`."""
        return {arm: monitor.summary() for arm, monitor in sorted(self.monitors.items())}

    def snapshot_due(self) -> bool:
        return time.monotonic() - self._snapshot_at >= self.settings.snapshot_interval_s

    @property
    def unsaved(self) -> bool:
        """Records consumed since the last snapshot (learned, or invalid and skipped)."""
        return self.offsets != self._saved_offsets

    async def snapshot(self, lease: Lease | None = None) -> None:
        """Save every policy and the offsets they include, in one transaction; with a
        ``lease`` (:class:`loopwise.streams.learning.Lease`) only while it is held."""
        key = self.settings.snapshot_key_bytes
        mapping: dict[str, Any] = {
            arm: sign_snapshot(p.snapshot(), key) for arm, p in self.policies.items()
        }
        mapping["offsets"] = orjson.dumps({str(p): o for p, o in self.offsets.items()})
        mapping["saved_at_ms"] = int(time.time() * 1000)
        mapping["reward_monitor"] = orjson.dumps(self.monitor_summary())
        # With the offsets, so that a record re-read after a crash is not counted twice.
        mapping["invalid_records"] = orjson.dumps(dict(self.invalid_reasons))
        mapping["prefilter_popularity"] = orjson.dumps(
            {"scores": self.popularity.to_dict(), "total": self.popularity.total}
        )
        mapping["version"] = version = self.version + 1
        saved = dict(self.offsets)
        if lease is None:
            await self.client.hset(self.key, mapping=mapping)  # type: ignore[arg-type]
        else:
            await lease.hset_if_held(self.key, mapping)
        self.version = version
        self._saved_offsets = saved
        self._snapshot_at = time.monotonic()

    def versions(self) -> Mapping[str, int]:
        return {arm: policy.version for arm, policy in self.policies.items()}
