"""Live job progress from the job's events: rich bars on a terminal, plain lines elsewhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


async def follow(events: AsyncIterator[dict[str, Any]], console: Console) -> dict[str, Any]:
    """Show events until the job ends; returns the final event."""
    last: dict[str, Any] = {}
    if not console.is_terminal:
        async for event in events:
            last = event
            if event["event"] != "transfer.progress":
                console.print(_describe(event), highlight=False)
        return last
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bars: dict[tuple, Any] = {}
        async for event in events:
            last = event
            if event["event"] == "transfer.progress":
                key = (event["round"], event["site"], event["direction"])
                if key not in bars:
                    bars[key] = progress.add_task(f"round {event['round']} {event['site']} {event['direction']}",
                                                  total=event["total"])
                progress.update(bars[key], completed=event["bytes"])
            else:
                progress.console.print(_describe(event), highlight=False)
    return last


def _describe(event: dict[str, Any]) -> str:
    name = event["event"]
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time_s", "job"))
    return f"{name} {details}".strip()
