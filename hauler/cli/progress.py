"""Live progress: a job's events for `submit --wait` (rich bars on a terminal, plain lines
elsewhere), and a site's own transfers in its console (bars on a terminal, nothing elsewhere)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
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

from hauler.core.events import TrackTransfer, untracked

COLUMNS = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
           TimeRemainingColumn())
KEPT_BARS = 4  # finished bars a site's console keeps on screen


class TransferBars:
    """A site's downloads and uploads as progress bars (bytes, MB/s, ETA); use as a context manager."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(*COLUMNS, console=console)

    def __enter__(self) -> TransferBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def track(self, what: str, total: int) -> Callable[[int], None]:
        """A new bar; the returned function advances it by the bytes it is given."""
        finished = [task.id for task in self.progress.tasks if task.finished]
        for task_id in finished[:-KEPT_BARS] if len(finished) > KEPT_BARS else []:
            self.progress.remove_task(task_id)
        task_id = self.progress.add_task(what, total=total)
        return lambda nbytes: self.progress.advance(task_id, nbytes)


@contextlib.contextmanager
def transfer_display(console: Console) -> Iterator[TrackTransfer]:
    """Progress bars for transfers on a terminal; nothing elsewhere (logs stay clean)."""
    if not console.is_terminal:
        yield untracked
        return
    with TransferBars(console) as bars:
        yield bars.track


async def follow(events: AsyncIterator[dict[str, Any]], console: Console) -> dict[str, Any]:
    """Show events until the job ends; returns the final event."""
    last: dict[str, Any] = {}
    if not console.is_terminal:
        async for event in events:
            last = event
            if event["event"] != "transfer.progress":
                console.print(_describe(event), highlight=False)
        return last
    with Progress(*COLUMNS, console=console, transient=False) as progress:
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
