"""``bench/bench_profile.py``'s rules: sampled stacks land in the stage they belong to."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_profile import IDLE, NATIVE, OTHER, STARTUP, Frame, aggregate, classify, read_raw

SITE = "/x/.venv/lib/python3.11/site-packages"
STDLIB = "/usr/lib/python3.11"
REPO = "/x/wt"

ROOT = [
    f"_run_module_as_main ({STDLIB}/runpy.py:198)",
    f"<module> ({REPO}/loopwise/cli.py:900)",
    f"run_worker ({REPO}/streams/worker.py:150)",
    f"Worker.execute_from_commandline ({SITE}/mode/worker.py:270)",
    f"BaseEventLoop.run_until_complete ({STDLIB}/asyncio/base_events.py:640)",
    f"BaseEventLoop.run_forever ({STDLIB}/asyncio/base_events.py:607)",
    f"BaseEventLoop._run_once ({STDLIB}/asyncio/base_events.py:1922)",
]
TASK = [*ROOT, f"Handle._run ({STDLIB}/asyncio/events.py:80)"]
AGENT = [
    *TASK,
    f"Agent._execute_actor ({SITE}/faust/agents/agent.py:680)",
    f"build_app.<locals>.events ({REPO}/streams/app.py:230)",
]
PROCESS = [
    *AGENT,
    f"build_app.<locals>.process ({REPO}/streams/app.py:220)",
    f"Pipeline.process_isolating ({REPO}/streams/pipeline.py:285)",
    f"retry ({REPO}/streams/errors.py:90)",
    f"Pipeline.process ({REPO}/streams/pipeline.py:273)",
    f"Pipeline._process ({REPO}/streams/pipeline.py:360)",
]


def stack(*frames: str) -> list[Frame]:
    return [Frame.parse(f) for f in frames]


@pytest.mark.parametrize(
    ("frames", "stage"),
    [
        ([*ROOT, f"EpollSelector.select ({STDLIB}/selectors.py:468)"], IDLE),
        (
            [f"<module> ({REPO}/loopwise/cli.py:3)", "_find_and_load (<frozen importlib>:1176)"],
            STARTUP,
        ),
        (
            [
                *PROCESS,
                f"RedisStore.commit ({REPO}/streams/redis_store.py:330)",
                f"Pipeline.execute ({SITE}/redis/asyncio/client.py:1500)",
                f"Connection.pack_commands ({SITE}/redis/_parsers/encoders.py:30)",
            ],
            "Redis commit (MULTI/EXEC, packing)",
        ),
        (
            [
                *PROCESS,
                f"Checkpoint.commit ({REPO}/streams/checkpoint.py:97)",
                f"RedisStore.commit ({REPO}/streams/redis_store.py:330)",
            ],
            "Redis commit (MULTI/EXEC, packing)",
        ),
        (
            [*PROCESS, f"RedisStore.read ({REPO}/streams/redis_store.py:200)"],
            "Redis read (one pipeline)",
        ),
        (
            [
                *PROCESS,
                f"triage ({REPO}/streams/pipeline.py:107)",
                f"decode ({REPO}/streams/decoding.py:70)",
            ],
            "decode / triage",
        ),
        (
            [
                *PROCESS,
                f"fold_users ({REPO}/streams/pipeline.py:170)",
                f"apply_event ({REPO}/streams/user_state.py:110)",
            ],
            "fold (user state, catalog)",
        ),
        (
            [
                *PROCESS,
                f"LearningLoop.plan ({REPO}/streams/loop.py:140)",
                f"DecisionMaker.decide ({REPO}/streams/decisions.py:110)",
                f"VWPolicy.pmf ({REPO}/learners/vw_policy.py:200)",
            ],
            "decisions: VW pmf",
        ),
        (
            [
                *PROCESS,
                f"LearningLoop.plan ({REPO}/streams/loop.py:140)",
                f"DecisionMaker.decide ({REPO}/streams/decisions.py:110)",
            ],
            "decisions: features, sampling, JSON",
        ),
        (
            [
                *PROCESS,
                f"LearningLoop.plan ({REPO}/streams/loop.py:112)",
                f"RewardJoin.close_due ({REPO}/streams/reward_join.py:300)",
            ],
            "reward join / close_due",
        ),
        ([*PROCESS], "pipeline glue (_process own lines, retry)"),
        ([*AGENT, f"Stream.ack ({SITE}/faust/streams.py:1390)"], "Faust per-event ack"),
        (
            [
                *AGENT,
                f"take_now ({REPO}/streams/batching.py:80)",
                f"Stream.wait_for_stopped ({SITE}/faust/streams.py:500)",
            ],
            "take_now batching",
        ),
        ([*AGENT], "events agent (Message objects, metrics)"),
        (
            [
                *AGENT,
                f"retry ({REPO}/streams/errors.py:90)",
                f"Pipeline.publish ({REPO}/streams/pipeline.py:347)",
                f"Checkpoint.publish ({REPO}/streams/checkpoint.py:120)",
                f"build_app.<locals>.send_log ({REPO}/streams/app.py:120)",
            ],
            "outbox: Kafka producer (send_log, Faust producer, aiokafka)",
        ),
        (
            [
                *AGENT,
                f"Pipeline.publish ({REPO}/streams/pipeline.py:347)",
                f"Checkpoint.publish ({REPO}/streams/checkpoint.py:108)",
            ],
            "outbox: publish (Redis outbox, parse, trim)",
        ),
        (
            [
                *TASK,
                f"Agent._execute_actor ({SITE}/faust/agents/agent.py:680)",
                f"build_app.<locals>.learn ({REPO}/streams/app.py:260)",
                f"Learner.learn ({REPO}/streams/learner.py:140)",
            ],
            "learner agent (learn, snapshot)",
        ),
        (
            [
                *TASK,
                f"Conductor.on_message ({SITE}/faust/transport/conductor.py:110)",
                f"Queue.put ({STDLIB}/asyncio/queues.py:140)",
            ],
            "Faust consumer: drain + conductor (per message)",
        ),
        (
            [*TASK, f"Fetcher._fetch_requests_routine ({SITE}/aiokafka/consumer/fetcher.py:500)"],
            "aiokafka (consumer commits, metadata, protocol)",
        ),
        (
            [*ROOT, f"BaseEventLoop._process_events ({STDLIB}/asyncio/selector_events.py:600)"],
            "asyncio event loop (scheduling, task steps)",
        ),
        (
            [*TASK, f"Event.wait ({STDLIB}/asyncio/locks.py:210)"],
            "short-lived waiting tasks (wait_first: Event.wait, asyncio.wait, Queue.get)",
        ),
        (
            [
                f"Thread._bootstrap ({STDLIB}/threading.py:1002)",
                f"ServiceThread._start_thread ({SITE}/mode/threads.py:211)",
                f"BaseEventLoop._run_once ({STDLIB}/asyncio/base_events.py:1922)",
                f"Handle._run ({STDLIB}/asyncio/events.py:80)",
                f"PartitionRecords.__next__ ({SITE}/aiokafka/consumer/fetcher.py:100)",
            ],
            "consumer thread (aiokafka fetch + parse, hand-over)",
        ),
        ([], NATIVE),
        ([*TASK, f"somewhere ({SITE}/unknownlib/x.py:1)"], OTHER),
    ],
)
def test_a_stack_lands_in_its_stage(frames: list[str], stage: str) -> None:
    assert classify(stack(*frames)) == stage


def test_aggregate_turns_shares_into_cpu_us_per_event(tmp_path: Path) -> None:
    thread = 'process 7:"python -m loopwise.cli worker";thread (7): MainThread'
    redis = ";".join([*PROCESS, f"RedisStore.commit ({REPO}/streams/redis_store.py:330)"])
    idle = ";".join([*ROOT, f"EpollSelector.select ({STDLIB}/selectors.py:468)"])
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"{thread};{redis} 30\n{thread};{';'.join(PROCESS)} 10\n{thread};{idle} 60\n"
        f"{thread};<module> ({REPO}/loopwise/cli.py:3);_find_and_load (<frozen importlib>:1) 99\n"
    )
    measured = {"events": 1000, "wall_s": 1.0, "cpu_s": 0.4, "main_thread_cpu_s": 0.4}
    result = aggregate(read_raw(raw), measured)
    by = {r["stage"]: r for r in result["stages"]}
    assert by["Redis commit (MULTI/EXEC, packing)"]["share_of_active"] == pytest.approx(0.75)
    assert by["Redis commit (MULTI/EXEC, packing)"]["cpu_us_per_event"] == pytest.approx(300)
    assert by["pipeline glue (_process own lines, retry)"]["cpu_us_per_event"] == pytest.approx(100)
    assert result["idle"]["wall_us_per_event"] == pytest.approx(600)
    assert result["idle"]["sampled_share_of_main_thread"] == pytest.approx(0.6)
    assert result["totals"]["startup_shutdown_samples"] == 99
