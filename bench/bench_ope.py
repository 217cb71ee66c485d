"""Off-policy evaluation throughput: ``loopwise.replay`` against a per-record Python loop.

First the estimator math alone (IPS, SNIPS and DR point estimates over ``--records`` in-memory
rounds: numpy against a per-round Python loop), then three measurements on a synthetic
propensity log (10 actions per record, a floored softmax
logger, click rewards), generated into a temporary JSONL file:

* ``ips+snips``: load + validate + IPS/SNIPS (``uniform`` and ``logged`` targets, diagnostics
  and 1,000-replicate bootstrap intervals included) over ``--records`` records (default
  1,000,000), versus a loop that parses each line with orjson, checks it with
  :func:`~loopwise.learners.log_record.check_record` and sums ``w r`` and ``w`` (point
  estimates only);
* ``ips+snips, 1 replicate``: the same replay with a single bootstrap replicate, to show what
  the intervals cost;
* ``dr``: the same plus the cross-fitted VW reward model and DM/DR over ``--dr-records``
  (default 1,000,000; the reward model costs ~0.3 ms a record in VW's text parser, so this row
  takes minutes), versus a loop that trains the same
  :class:`~loopwise.learners.ope.CrossFitRewardModel` (same seed, same order) and sums DR terms;
* ``vw progressive``: a ``vw:--cb_explore_adf --squarecb`` candidate scored then trained record
  by record over ``--vw-records`` (default 20,000), versus a loop doing the same with
  :class:`~loopwise.learners.vw_policy.VWPolicy` directly.

Each pair must agree (relative 1e-9) or the bench fails. Writes ``bench/results/ope.json``.

Run: ``.venv/bin/python -m bench.bench_ope`` (``--records 200000`` for a quick run).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from loopwise.learners.log_record import LogRecord, check_record
from loopwise.learners.ope import CrossFitRewardModel
from loopwise.learners.vw_policy import VWPolicy
from loopwise.replay import replay

RESULTS = Path(__file__).parent / "results" / "ope.json"
VW_TARGET = "--cb_explore_adf --squarecb"
N_ACTIONS = 10


def generate_log(path: Path, n: int, seed: int = 0) -> None:
    """``n`` synthetic records: 1,000 users, 50 items (10 shown), floored softmax logger."""
    rng = np.random.default_rng(seed)
    n_items = 50
    item_score = rng.normal(size=n_items)
    categories = [f"cat-{j % 6}" for j in range(n_items)]
    prices = np.round(np.exp(rng.uniform(1.5, 6.0, n_items)), 2).tolist()
    devices = ("mobile", "desktop", "tablet")
    block = 10_000
    with path.open("wb", buffering=1 << 22) as out:
        for start in range(0, n, block):
            m = min(block, n - start)
            shown = np.argsort(rng.random((m, n_items)), axis=1)[:, :N_ACTIONS]
            logits = item_score[shown]
            pmf = np.exp(logits - logits.max(axis=1, keepdims=True))
            pmf /= pmf.sum(axis=1, keepdims=True)
            pmf = 0.9 * pmf + 0.1 / N_ACTIONS
            cdf = np.cumsum(pmf, axis=1)
            chosen = np.minimum((cdf < rng.random((m, 1)) * cdf[:, -1:]).sum(axis=1), 9)
            ctr = 1.0 / (1.0 + np.exp(-(-3.0 + item_score[shown[np.arange(m), chosen]])))
            reward = (rng.random(m) < ctr).astype(float)
            users = rng.integers(0, 1_000, m)
            hours = rng.integers(0, 24, m)
            device = rng.integers(0, 3, m)
            lines = []
            for r in range(m):
                p = pmf[r].tolist()
                c = int(chosen[r])
                lines.append(
                    orjson.dumps(
                        {
                            "decision_id": f"d{start + r}",
                            "timestamp": 1_790_000_000_000 + start + r,
                            "user_id": f"user-{users[r]}",
                            "arm": "vw",
                            "policy_version": "1",
                            "context": {"device": devices[device[r]], "hour": int(hours[r])},
                            "actions": [
                                {
                                    "id": f"item-{j}",
                                    "features": {"category": categories[j], "price": prices[j]},
                                }
                                for j in shown[r].tolist()
                            ],
                            "chosen": c,
                            "propensity": p[c],
                            "pmf": p,
                            "reward": float(reward[r]),
                            "reward_components": {"click": float(reward[r])},
                        }
                    )
                )
            out.write(b"\n".join(lines) + b"\n")


def _records(path: Path, limit: int) -> Any:
    with path.open("rb") as lines:
        for i, line in enumerate(lines):
            if i >= limit:
                return
            record = orjson.loads(line)
            if check_record(record) is None:
                yield record


def _features(record: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """A checked record's ``(shared, actions)``, as every policy sees them."""
    typed = LogRecord.from_dict(record, check=False)
    return typed.shared(), typed.action_list()


def _head(path: Path, n: int, out: Path) -> Path:
    with path.open("rb") as src, out.open("wb") as dst:
        for i, line in enumerate(src):
            if i >= n:
                break
            dst.write(line)
    return out


def loop_ips_snips(path: Path, limit: int) -> dict[str, float]:
    """IPS/SNIPS of ``uniform`` and ``logged``, one record at a time."""
    n = 0
    sums = {"uniform": [0.0, 0.0], "logged": [0.0, 0.0]}
    for record in _records(path, limit):
        n += 1
        c, p, r = record["chosen"], record["propensity"], record["reward"]
        for name, prob in (("uniform", 1.0 / len(record["actions"])), ("logged", record["pmf"][c])):
            w = prob / p
            sums[name][0] += w * r
            sums[name][1] += w
    out = {}
    for name, (wr, w) in sums.items():
        out[f"{name}/ips"] = wr / n
        out[f"{name}/snips"] = wr / w
    return out


def loop_dr(path: Path, limit: int, seed: int) -> dict[str, float]:
    """Cross-fitted DM/DR of ``uniform``: same reward model, two passes, per record."""
    model = CrossFitRewardModel(folds=2, seed=seed)
    try:
        for i, record in enumerate(_records(path, limit)):
            model.learn(i, *_features(record), record["chosen"], record["reward"])
        n, dm_sum, dr_sum = 0, 0.0, 0.0
        for i, record in enumerate(_records(path, limit)):
            q = model.predict(i, *_features(record))
            k = len(record["actions"])
            dm = float(q.sum()) / k
            w = (1.0 / k) / record["propensity"]
            dm_sum += dm
            dr_sum += dm + w * (record["reward"] - float(q[record["chosen"]]))
            n += 1
    finally:
        model.close()
    return {"uniform/dm": dm_sum / n, "uniform/dr": dr_sum / n}


def loop_vw(path: Path, limit: int, seed: int) -> dict[str, float]:
    """IPS/SNIPS of a progressive VW candidate: score each record, then learn from it."""
    policy = VWPolicy(args=VW_TARGET, seed=seed)
    wr_sum = w_sum = 0.0
    n = 0
    for record in _records(path, limit):
        shared, actions = _features(record)
        pmf = policy.pmf(shared, actions)
        c, p, r = record["chosen"], record["propensity"], record["reward"]
        w = float(pmf[c] / pmf.sum()) / p
        wr_sum += w * r
        w_sum += w
        n += 1
        policy.learn(shared, actions, c, p, r)
    policy.close()
    return {f"vw:{VW_TARGET}/ips": wr_sum / n, f"vw:{VW_TARGET}/snips": wr_sum / w_sum}


def estimator_math(n: int, seed: int) -> dict[str, Any]:
    """IPS, SNIPS and DR point estimates over ``n`` in-memory rounds of 10 actions: the numpy
    estimators of :mod:`loopwise.learners.ope` against a per-round Python loop over the same
    values."""
    from loopwise.learners.ope import DR, IPS, SNIPS, BanditData

    rng = np.random.default_rng(seed)
    k = N_ACTIONS
    logged = rng.dirichlet(np.ones(k), size=n) * 0.9 + 0.1 / k
    target = rng.dirichlet(np.ones(k), size=n)
    q_hat = rng.random((n, k)) * 0.2
    chosen = rng.integers(0, k, n)
    rows = np.arange(n)
    reward = (rng.random(n) < 0.1).astype(float)
    offsets = np.arange(0, n * k + 1, k, dtype=np.int64)
    data = BanditData(
        reward=reward,
        propensity=logged[rows, chosen],
        target_prob=target[rows, chosen],
        offsets=offsets,
        target_pmf=target.ravel(),
        q_hat=q_hat.ravel(),
        chosen=chosen,
    )
    t = time.perf_counter()
    ours = {e.name: e.estimate_policy_value(data) for e in (IPS(), SNIPS(), DR())}
    t_numpy = time.perf_counter() - t
    py_target, py_q = target.tolist(), q_hat.tolist()
    py_chosen, py_p, py_r = chosen.tolist(), data.propensity.tolist(), reward.tolist()
    t = time.perf_counter()
    wr = w_sum = dr = 0.0
    for i in range(n):
        c = py_chosen[i]
        pi, q = py_target[i], py_q[i]
        w = pi[c] / py_p[i]
        wr += w * py_r[i]
        w_sum += w
        dm = 0.0
        for a in range(k):
            dm += pi[a] * q[a]
        dr += dm + w * (py_r[i] - q[c])
    loop = {"ips": wr / n, "snips": wr / w_sum, "dr": dr / n}
    t_loop = time.perf_counter() - t
    _agree(ours, loop)
    return {
        "measure": "estimator math only (IPS+SNIPS+DR on in-memory columns)",
        "records": n,
        "replay_s": t_numpy,
        "replay_records_per_s": n / t_numpy,
        "loop_s": t_loop,
        "loop_records_per_s": n / t_loop,
        "values": ours,
    }


def _values(result: dict[str, Any], keys: list[str]) -> dict[str, float]:
    out = {}
    for key in keys:
        name, _, estimator = key.rpartition("/")
        out[key] = result["candidates"][name][estimator]["value"]
    return out


def _agree(a: dict[str, float], b: dict[str, float]) -> None:
    for key, value in a.items():
        if not math.isclose(value, b[key], rel_tol=1e-9, abs_tol=1e-12):
            raise AssertionError(f"{key}: replay {value!r} != loop {b[key]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--dr-records", type=int, default=1_000_000)
    parser.add_argument("--vw-records", type=int, default=20_000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console()
    rows: list[dict[str, Any]] = []

    rows.append(estimator_math(args.records, args.seed))
    console.print(
        f"{rows[-1]['measure']}: numpy {rows[-1]['replay_records_per_s']:,.0f} rec/s, "
        f"loop {rows[-1]['loop_records_per_s']:,.0f}"
    )
    with tempfile.TemporaryDirectory(prefix="loopwise-bench-ope-") as tmp:
        log = Path(tmp) / "log.jsonl"
        t0 = time.perf_counter()
        generate_log(log, args.records, args.seed)
        console.print(
            f"generated {args.records:,} records ({log.stat().st_size / 1e6:,.0f} MB) "
            f"in {time.perf_counter() - t0:.1f} s"
        )

        def measure(name: str, n: int, run_replay: Any, run_loop: Any, keys: list[str]) -> None:
            t = time.perf_counter()
            result = run_replay()
            t_replay = time.perf_counter() - t
            t = time.perf_counter()
            loop = run_loop()
            t_loop = time.perf_counter() - t
            ours = _values(result, keys)
            _agree(ours, loop)
            rows.append(
                {
                    "measure": name,
                    "records": n,
                    "replay_s": t_replay,
                    "replay_records_per_s": n / t_replay,
                    "loop_s": t_loop,
                    "loop_records_per_s": n / t_loop,
                    "values": ours,
                }
            )
            console.print(f"{name}: replay {n / t_replay:,.0f} rec/s, loop {n / t_loop:,.0f}")

        measure(
            "ips+snips",
            args.records,
            lambda: replay(
                [str(log)],
                ["uniform", "logged"],
                estimators=["ips", "snips"],
                n_bootstrap=args.bootstrap,
                seed=args.seed,
                progress=False,
            ),
            lambda: loop_ips_snips(log, args.records),
            ["uniform/ips", "uniform/snips", "logged/ips", "logged/snips"],
        )
        measure(
            "ips+snips, 1 bootstrap replicate",
            args.records,
            lambda: replay(
                [str(log)],
                ["uniform", "logged"],
                estimators=["ips", "snips"],
                n_bootstrap=1,
                seed=args.seed,
                progress=False,
            ),
            lambda: loop_ips_snips(log, args.records),
            ["uniform/ips", "uniform/snips", "logged/ips", "logged/snips"],
        )
        dr_log = (
            log
            if args.dr_records >= args.records
            else _head(log, args.dr_records, Path(tmp) / "dr.jsonl")
        )
        measure(
            "ips+snips+dm+dr (VW reward model, 2-fold cross-fit)",
            min(args.dr_records, args.records),
            lambda: replay(
                [str(dr_log)],
                ["uniform"],
                estimators=["ips", "snips", "dm", "dr"],
                n_bootstrap=args.bootstrap,
                seed=args.seed,
                progress=False,
            ),
            lambda: loop_dr(dr_log, args.dr_records, args.seed),
            ["uniform/dm", "uniform/dr"],
        )
        vw_log = _head(log, args.vw_records, Path(tmp) / "vw.jsonl")
        measure(
            f"progressive vw:{VW_TARGET} (ips+snips)",
            min(args.vw_records, args.records),
            lambda: replay(
                [str(vw_log)],
                [f"vw:{VW_TARGET}"],
                estimators=["ips", "snips"],
                n_bootstrap=args.bootstrap,
                seed=args.seed,
                progress=False,
            ),
            lambda: loop_vw(vw_log, args.vw_records, args.seed),
            [f"vw:{VW_TARGET}/ips", f"vw:{VW_TARGET}/snips"],
        )

    table = Table(title="Off-policy evaluation throughput (records/s)")
    for column in ("measure", "records", "replay rec/s", "loop rec/s", "replay s", "loop s"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for row in rows:
        table.add_row(
            row["measure"],
            f"{row['records']:,}",
            f"{row['replay_records_per_s']:,.0f}",
            f"{row['loop_records_per_s']:,.0f}",
            f"{row['replay_s']:.1f}",
            f"{row['loop_s']:.1f}",
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "ope",
        "bootstrap_replicates": args.bootstrap,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "note": "replay times include reading, validation, diagnostics and bootstrap intervals "
        "(the replicates given); loop times compute point estimates only",
        "rows": rows,
    }
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
