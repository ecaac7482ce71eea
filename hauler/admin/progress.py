"""Live progress on a console: a job's rounds as its events come (`job.wait(progress=True)`,
`hauler submit --wait`, `hauler simulate`, `hauler jobs follow`), and a site's or submitter's
own transfers as bars. On a terminal the live part is one line per round plus at most as many
transfer bars as fit; elsewhere (a log, a pipe) each event is one plain line and bars are off.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from hauler.core.events import TrackTransfer, untracked
from hauler.workflows.records import reported

COLUMNS = (
    TextColumn("{task.description}"),
    BarColumn(),
    DownloadColumn(),
    TransferSpeedColumn(),
    TimeRemainingColumn(),
)
KEPT_BARS = 4  # finished bars a site's console keeps on screen
RESERVED_ROWS = 4  # rows a job's display leaves to the shell around it


class TransferBars:
    """Downloads and uploads as progress bars (bytes, MB/s, ETA); use as a context manager."""

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


@dataclass
class RoundState:
    """What is known of the round in progress: its sites, who is done, what they reported."""

    round: int
    sites: int = 0
    done: int = 0
    started_s: float = 0.0
    metrics: dict[str, list[float]] = field(default_factory=dict)
    bytes_moved: dict[tuple[str, str], int] = field(default_factory=dict)

    def add_result(self, event: dict[str, Any]) -> None:
        self.done += 1
        for name, value in reported(event).items():
            if isinstance(value, int | float):
                self.metrics.setdefault(name, []).append(float(value))

    def line(self, now_s: float | None = None) -> str:
        """`round 2: 12/16 sites · loss 0.412 · validation/accuracy 0.81 · 4.3 s · 256 MB`."""
        parts = [f"round {self.round}: {self.done}/{self.sites or '?'} sites"]
        parts += [
            f"{name} {_number(statistics.fmean(values))}"
            for name, values in sorted(self.metrics.items())
        ]
        if now_s is not None and self.started_s:
            parts.append(f"{now_s - self.started_s:.1f} s")
        moved = sum(self.bytes_moved.values())
        if moved:
            parts.append(f"{moved / 1e6:,.0f} MB moved")
        return " · ".join(parts)


class JobDisplay:
    """Shows a job's events: `show(event)` for each, in order; a context manager."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.round: RoundState | None = None
        self._bars = Progress(*COLUMNS, console=console)
        self._tasks: dict[tuple[str, str], Any] = {}
        self._live = (
            Live(console=console, transient=True, auto_refresh=True)
            if console.is_terminal
            else None
        )

    def __enter__(self) -> JobDisplay:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def show(self, event: dict[str, Any]) -> None:
        handlers = {
            "round.started": self._round_started,
            "site.result": self._site_result,
            "transfer.progress": self._transfer,
            "round.complete": self._round_complete,
        }
        handlers.get(event.get("event", ""), self._plain)(event)
        self._refresh()

    def _plain(self, event: dict[str, Any]) -> None:
        self._print(describe(event))

    def _round_started(self, event: dict[str, Any]) -> None:
        self.round = RoundState(
            event["round"], len(event.get("sites") or []), started_s=event.get("time_s", 0.0)
        )
        self._clear_bars()

    def _site_result(self, event: dict[str, Any]) -> None:
        if self.round is not None:
            self.round.add_result(event)
        if self._live is None:  # a log gets every site's line; a terminal, the round's
            self._plain(event)

    def _round_complete(self, event: dict[str, Any]) -> None:
        if self.round is not None:
            self._print(self.round.line(event.get("time_s")))
        self.round = None
        self._clear_bars()

    def _transfer(self, event: dict[str, Any]) -> None:
        key = (event["site"], event["direction"])
        if self.round is not None:
            self.round.bytes_moved[key] = event["bytes"]
        if self._live is None:
            return
        if key not in self._tasks:
            self._tasks[key] = self._bars.add_task(
                f"{event['site']} {event['direction']}", total=event["total"]
            )
        self._bars.update(self._tasks[key], completed=event["bytes"])

    def _clear_bars(self) -> None:
        for task_id in self._tasks.values():
            self._bars.remove_task(task_id)
        self._tasks.clear()

    def _refresh(self) -> None:
        if self._live is None:
            return
        room = max(1, self.console.size.height - RESERVED_ROWS)
        running = [task for task in self._bars.tasks if not task.finished][: room - 1]
        for task in self._bars.tasks:
            task.visible = task in running
        line = Text(self.round.line() if self.round is not None else "", style="bold")
        self._live.update(Group(line, self._bars) if running else line)

    def _print(self, text: str) -> None:
        (self._live.console if self._live is not None else self.console).print(
            text, highlight=False
        )


def describe(event: dict[str, Any]) -> str:
    """An event as one readable line: its name, then its fields, numbers rounded."""
    fields = {k: v for k, v in event.items() if k not in ("event", "time_s", "job", "private")}
    details = " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v not in ("", None, [], {}))
    return f"{event.get('event', '')} {details}".strip()


def _value(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return ",".join(_value(v) for v in value)
    return str(value)


def _number(value: float) -> str:
    """Three significant digits: 0.412, 12.3, 4.2e-05."""
    return f"{value:.3g}"
