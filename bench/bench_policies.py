"""Policies side by side: closed-loop learning curves on the simulator, and pmf latency.

Not a test. The loop is the one the worker runs, without Kafka or Redis: sample
a user and a context, ``pmf = apply_floor(policy.pmf(shared, actions), floor)``,
sample the shown item, draw the click from the simulator's hidden truth, learn
from ``(chosen, propensity, reward = click)``. Each window reports the expected
reward of the shown items (from the ground truth, which removes the click noise)
as a fraction of the oracle's (always the best item for the user and context).

    .venv/bin/python -m bench.bench_policies --rounds 50000 --users 500
    .venv/bin/python -m bench.bench_policies --latency-only
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from loopwise.learners.linucb import LinUCBPolicy
from loopwise.learners.policy import Action, Policy, apply_floor, sample
from loopwise.learners.popularity import PopularityPolicy
from loopwise.learners.vw_policy import VWPolicy, vw_args
from loopwise.producers.simulator import MarketConfig, Marketplace

CANDIDATES: dict[str, Callable[[], Policy]] = {
    "vw squarecb (default)": VWPolicy,
    "vw squarecb gamma_scale=10": lambda: VWPolicy(gamma_scale=10.0),
    "vw epsilon 0.05": lambda: VWPolicy("epsilon", epsilon=0.05),
    "vw softmax lambda=10": lambda: VWPolicy("softmax"),
    "vw bag 5": lambda: VWPolicy("bag", bag=5, epsilon=0.0),
    "linucb": LinUCBPolicy,
    "popularity": PopularityPolicy,
}


def closed_loop(
    policy: Policy,
    *,
    rounds: int,
    n_users: int,
    n_items: int,
    seed: int,
    market_seed: int = 0,
    floor_mass: float = 0.01,
    window: int = 5000,
) -> dict[str, Any]:
    """Run the loop; per window, value / oracle and value / uniform (expected rewards)."""
    market = Marketplace(MarketConfig(n_users=n_users, n_items=n_items, seed=market_seed))
    start = time.perf_counter()
    got, oracle, uniform = run_loop(policy, market, rounds, seed, floor_mass)
    seconds = time.perf_counter() - start
    edges = range(0, rounds, window)
    return {
        "curve": [float(got[s : s + window].sum() / oracle[s : s + window].sum()) for s in edges],
        "vs_uniform": [
            float(got[s : s + window].sum() / uniform[s : s + window].sum()) for s in edges
        ],
        "seconds": seconds,
    }


def run_loop(
    policy: Policy, market: Marketplace, rounds: int, seed: int, floor_mass: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The worker's loop against the simulator for ``rounds`` rounds: per round, the expected
    reward (ground truth) of the shown item, of the oracle's and of a uniform pick."""
    actions = [Action(item, market.item_features(item)) for item in market.items]
    floor = floor_mass / len(actions)
    rng = np.random.default_rng(seed)
    got, oracle, uniform = np.zeros(rounds), np.zeros(rounds), np.zeros(rounds)
    for t in range(rounds):
        user = market.sample_user(rng)
        context = market.sample_context(rng, user)
        shared = {"user": {"user_id": user}, "context": context}
        pmf = apply_floor(policy.pmf(shared, actions), floor)
        chosen = sample(pmf, rng)
        truth = market.expected_rewards(user, context)
        clicked, _ = market.draw_outcome(user, actions[chosen].id, context, rng)
        policy.learn(shared, actions, chosen, float(pmf[chosen]), 1.0 if clicked else 0.0)
        got[t], oracle[t], uniform[t] = truth[chosen], truth.max(), truth.mean()
    return got, oracle, uniform


def pmf_latency(policy: Policy, n_actions: int, calls: int = 1000) -> float:
    """Mean microseconds of one ``pmf`` call over ``n_actions`` after 200 learned examples."""
    actions = [
        Action(
            f"item-{j:03d}",
            {"category": f"cat-{j % 6}", "price": 5.0 + 3.1 * j, "brand": f"brand-{j % 8}"},
        )
        for j in range(n_actions)
    ]
    shared = {
        "user": {"user_id": "user-0042", "aff:cat-1": 3.2, "aff:cat-4": 0.5, "views": 12},
        "context": {"device": "mobile", "hour": 13},
    }
    for j in range(200):
        pmf = apply_floor(policy.pmf(shared, actions), 0.01 / n_actions)
        chosen = j % n_actions
        policy.learn(shared, actions, chosen, float(pmf[chosen]), float(j % 3 == 0))
    start = time.perf_counter()
    for _ in range(calls):
        policy.pmf(shared, actions)
    return (time.perf_counter() - start) / calls * 1e6


def vw_input_latency(n_actions: int = 40, calls: int = 500) -> tuple[float, float]:
    """Microseconds to feed one decision to VW: (text lines parsed by VW, dict-built Examples)."""
    from vowpalwabbit import Workspace

    from loopwise.learners.features import action_features, shared_features, vw_adf_lines

    vw = Workspace(vw_args())
    actions = [Action(f"item-{j}", {"category": f"cat-{j % 6}"}) for j in range(n_actions)]
    shared = {"user": {"user_id": "user-0042"}, "context": {"device": "mobile", "hour": 13}}
    start = time.perf_counter()
    for _ in range(calls):
        examples = vw.parse(vw_adf_lines(shared, actions))
        vw.predict(examples)
        vw.finish_example(examples)
    text = (time.perf_counter() - start) / calls * 1e6
    start = time.perf_counter()
    for _ in range(calls):
        user, context = shared_features(shared)
        built = [vw.example({"U": list(user.items()), "C": list(context.items())})]
        for action in actions:
            feats = action_features(action.id, action.features)
            built.append(vw.example({"A": list(feats.items())}))
        for example in built:
            example.setup_example()
    builder = (time.perf_counter() - start) / calls * 1e6  # building alone, before predicting
    return text, builder


def _run_one(job: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    name, kwargs = job
    return name, closed_loop(CANDIDATES[name](), **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--window", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="candidate names (default: all)")
    parser.add_argument("--latency-only", action="store_true")
    args = parser.parse_args(argv)

    print("pmf latency (us per call)")
    for name in ("vw squarecb (default)", "vw epsilon 0.05", "vw bag 5", "linucb", "popularity"):
        cells = [f"{pmf_latency(CANDIDATES[name](), k):8.0f}" for k in (40, 200)]
        print(f"  {name:28s} K=40 {cells[0]}   K=200 {cells[1]}")
    text, builder = vw_input_latency()
    print(
        f"  VW input, 40 actions: text parse+predict {text:.0f} us; dict Examples (build only) "
        f"{builder:.0f} us"
    )
    if args.latency_only:
        return 0

    names = args.only or list(CANDIDATES)
    kwargs = {
        "rounds": args.rounds,
        "n_users": args.users,
        "n_items": args.items,
        "seed": args.seed,
        "window": args.window,
    }
    print(
        f"\nvalue / oracle per window of {args.window} rounds "
        f"({args.users} users x {args.items} items, seed {args.seed})"
    )
    with multiprocessing.Pool(args.jobs) as pool:
        for name, result in pool.imap(_run_one, [(n, kwargs) for n in names]):
            curve = " ".join(f"{v:.2f}" for v in result["curve"])
            print(
                f"  {name:28s} {curve}   x uniform (last) {result['vs_uniform'][-1]:.1f}"
                f"   {result['seconds']:.0f}s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
