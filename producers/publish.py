"""``loopwise publish FILE.jsonl``: validate each line, publish the valid ones, report the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from loopwise.producers.sdk import EventPublisher, InvalidEvent


@dataclass(slots=True)
class PublishReport:
    published: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, with line numbers


def publish_jsonl(path: Path, publisher: EventPublisher, progress: bool = True) -> PublishReport:
    """Publish every valid line of ``path``; refused lines are counted and the first 20 reported."""
    report = PublishReport()
    total = path.stat().st_size
    columns = (
        TextColumn("[bold]publish"),
        BarColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[events]} events"),
        TimeRemainingColumn(),
    )
    with path.open("rb") as lines, Progress(*columns, disable=not progress) as bar:
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
