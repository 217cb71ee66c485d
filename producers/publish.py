"""``loopwise publish FILE.jsonl``: validate each line, publish the valid ones, report the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.progress import TransferSpeedColumn

from loopwise.producers.sdk import EventPublisher, InvalidEvent
from loopwise.progress import progress_bar


@dataclass(slots=True)
class PublishReport:
    published: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, with line numbers


def publish_jsonl(path: Path, publisher: EventPublisher, progress: bool = True) -> PublishReport:
    """Publish every valid line of ``path``; refused lines are counted and the first 20 reported."""
    report = PublishReport()
    total = path.stat().st_size
    bar = progress_bar(
        "[bold]publish",
        "{task.fields[events]} events",
        enabled=progress,
        count=TransferSpeedColumn(),
    )
    with path.open("rb") as lines, bar:
        task = bar.add_task("publish", total=total, events=0)
        for number, line in enumerate(lines, start=1):
            bar.advance(task, len(line))
            if not line.strip():
                continue
            try:
                publisher.send(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                _refuse(report, number, f"invalid_json: {exc}")
            except InvalidEvent as exc:
                _refuse(report, number, str(exc))
            else:
                report.published += 1
                if report.published % 1000 == 0:
                    bar.update(task, events=report.published)
        publisher.flush()
        bar.update(task, events=report.published)
    return report


def _refuse(report: PublishReport, line: int, why: str) -> None:
    report.refused += 1
    if len(report.errors) < 20:
        report.errors.append(f"line {line}: {why}")
