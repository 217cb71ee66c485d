"""``loopwise simulate --closed-loop``: the simulator plays the serving layer.

For each request it picks a user (by activity), reads ``nba:{user_id}`` from
Redis exactly as any serving layer would (falling back to ``nba:__default__``),
shows ``item_id``, publishes the ``view`` with ``decision_id``, ``propensity``
and the request context, and draws the user's click/purchase from the hidden
ground truth (published with the ``decision_id``). It never looks inside the
worker: only the public contracts of docs/contracts.md.

Requests come in sessions that keep their context (see ``run_closed_loop``).
A decision is shown once: a user whose ``nba`` was already shown (the worker
has not yet recomputed it) is passed over for this request. Every shown
decision is written to ``--out`` (JSONL) with the ground truth beside it, for
``loopwise report``: ``{"t", "decision_id", "timestamp", "user_id", "arm", "item_id",
"propensity", "reward", "expected_reward", "oracle", "uniform"}``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from loopwise.config import Settings
from loopwise.producers.sdk import EventPublisher
from loopwise.producers.simulator import Marketplace, Payoff
from loopwise.producers.traffic import RateLimiter
from loopwise.progress import progress_bar
from loopwise.redis_clients import mget, redis_client

DEFAULT_USER = "__default__"


@dataclass(slots=True)
class ClosedLoopReport:
    decisions: int = 0
    default_views: int = 0
    stale_skips: int = 0
    events: int = 0  # views of decisions and their follow-ups
    published: int = 0  # every message sent, catalog and default views included
    rewards: dict[str, float] = field(default_factory=dict)


def run_closed_loop(
    settings: Settings,
    market: Marketplace,
    n_decisions: int,
    out: Path,
    *,
    rate: float | None = 2000.0,
    seed: int = 0,
    progress: bool = True,
    wait_for_worker_s: float = 120.0,
    session_stickiness: float = 0.9,
) -> ClosedLoopReport:
    """Publish the catalog, then ``n_decisions`` shown decisions and their outcomes.

    Requests come in sessions: a user's next request keeps the context (device,
    hour) of their previous one with probability ``session_stickiness``, else a
    new session starts with a fresh context (mean session: 1 / (1 - stickiness)
    requests). The worker decides before the request arrives, from the user's
    latest context, as any precomputed next-best-action must.
    """
    rng = np.random.default_rng(seed)
    client = redis_client(settings)
    report = ClosedLoopReport()
    nba_key = settings.key("nba", "{}")
    shown: set[str] = set()
    sessions: dict[str, dict[str, Any]] = {}  # user -> context of their current session
    clock = market.clock  # event time goes on from the marketplace's earlier traffic
    gap = market.config.mean_gap_ms
    bar = progress_bar(
        "[bold]closed loop", "reward/decision {task.fields[rate]:.4f}", enabled=progress
    )
    with (
        EventPublisher.from_settings(settings) as publisher,
        out.open("wb") as sink,
        bar,
    ):
        for event in market.catalog_events():
            publisher.send(event)
        publisher.flush()
        _wait_for_default(client, nba_key.format(DEFAULT_USER), wait_for_worker_s)
        task = bar.add_task("loop", total=n_decisions, rate=0.0)
        limiter = RateLimiter(rate)
        reward_sum = 0.0
        decided_before_round = -1
        while report.decisions < n_decisions:
            if report.decisions == decided_before_round:
                time.sleep(0.05)  # every nba was stale: let the worker catch up
            decided_before_round = report.decisions
            users = [market.sample_user(rng) for _ in range(64)]
            stored = [settings.pseudonym(u) for u in users]  # as a serving layer would
            raw = mget(client, [nba_key.format(u) for u in [*stored, DEFAULT_USER]])
            default = raw[-1]
            for user_id, value in zip(users, raw[:-1], strict=True):
                if report.decisions >= n_decisions:
                    break
                nba = orjson.loads(value) if value else None
                if nba is not None and nba["decision_id"] in shown:
                    report.stale_skips += 1
                    continue
                limiter.wait()
                clock += int(rng.exponential(gap)) + 1
                context = sessions.get(user_id)
                if context is None or rng.random() >= session_stickiness:
                    context = sessions[user_id] = market.sample_context(rng, user_id)
                if nba is None:  # no state yet: the non-personalized default, not logged
                    nba = orjson.loads(default or b"null")  # the default exists: waited for
                    report.default_views += 1
                    view = _view(user_id, nba, clock, context, with_decision=False)
                    publisher.send(view)
                    for follow_up in market.respond(view, rng):
                        publisher.send(follow_up)
                    continue
                shown.add(nba["decision_id"])
                view = _view(user_id, nba, clock, context, with_decision=True)
                publisher.send(view)
                follow_ups = market.respond(view, rng)
                for follow_up in follow_ups:
                    publisher.send(follow_up)
                report.events += 1 + len(follow_ups)
                reward = _reward(settings, follow_ups)
                reward_sum += reward
                payoff = Payoff(settings.reward_click, settings.reward_purchase)
                line = {
                    "t": report.decisions,
                    "decision_id": nba["decision_id"],
                    "timestamp": clock,
                    "user_id": user_id,
                    "arm": nba["arm"],
                    "item_id": nba["item_id"],
                    "propensity": nba["propensity"],
                    "reward": reward,
                    "expected_reward": market.expected_reward(
                        user_id, nba["item_id"], context, payoff
                    ),
                    "oracle": market.oracle_value(user_id, context, payoff),
                    "uniform": market.uniform_value(user_id, context, payoff),
                }
                sink.write(orjson.dumps(line) + b"\n")
                report.decisions += 1
                if report.decisions % 200 == 0 or report.decisions == n_decisions:
                    bar.update(task, completed=report.decisions, rate=reward_sum / report.decisions)
        report.published = publisher.sent
    market.advance_clock(clock)
    client.close()
    return report


def _view(
    user_id: str, nba: dict[str, Any], clock: int, context: dict[str, Any], *, with_decision: bool
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "event_id": uuid.uuid4().hex,
        "type": "view",
        "user_id": user_id,
        "item_id": nba["item_id"],
        "timestamp": clock,
        "context": context,
    }
    if with_decision:
        view["decision_id"] = nba["decision_id"]
        view["propensity"] = nba["propensity"]
    return view


def _reward(settings: Settings, follow_ups: list[dict[str, Any]]) -> float:
    """The worker's reward rule (click/purchase indicators) applied to the drawn outcome."""
    clicked = any(e["type"] == "click" for e in follow_ups)
    purchased = any(e["type"] == "purchase" for e in follow_ups)
    if not clicked and not purchased:
        return settings.default_reward
    revenue = sum(e["price"] * e.get("quantity", 1) for e in follow_ups if e["type"] == "purchase")
    return (
        settings.reward_click * clicked
        + settings.reward_purchase * purchased
        + settings.reward_revenue * revenue
    )


def _wait_for_default(client: redis.Redis, key: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.exists(key):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no {key} after {timeout_s:.0f}s: is a worker running on the same settings?"
            )
        time.sleep(0.2)
