"""Structured events: the one way a transfer, round or job reports progress.

Library code never prints. It emits named events with fields; subscribers (the
job's events.jsonl, the CLI's progress display, metrics) decide what to show.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Event:
    """Something that happened, e.g. `round.complete` with `round=2`."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    time_s: float = field(default_factory=time.time)

    def to_record(self) -> dict[str, Any]:
        return {"event": self.name, "time_s": round(self.time_s, 6), **self.fields}


Subscriber = Callable[[Event], None]
TrackTransfer = Callable[
    [str, int], Callable[[int], None]
]  # (what, total bytes) -> told bytes moved


def untracked(what: str, total: int) -> Callable[[int], None]:
    """A TrackTransfer that shows nothing."""
    return lambda nbytes: None


class EventBus:
    """Fan events out to subscribers; a subscriber that raises is dropped, not fatal."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def emit(self, name: str, /, **fields: Any) -> Event:
        event = Event(name, fields)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # a full disk or a broken watcher must not fail the job
                self._subscribers.remove(subscriber)
        return event


class JsonLines:
    """Append events to a JSON-lines file, one line each, flushed as written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        self.write(event.to_record())

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (empty if it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json_lines_page(
    path: Path, offset: int, max_bytes: int
) -> tuple[list[dict[str, Any]], int]:
    """The whole records in about `max_bytes` from byte `offset`, and the offset after the last of
    them,
    so a growing file can be read in pages of bounded size (a line still being written waits)."""
    if not path.exists():
        return [], offset
    with path.open("rb") as file:
        file.seek(offset)
        data = file.read(max_bytes)
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end
