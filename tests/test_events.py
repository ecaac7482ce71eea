"""Structured events: fan-out to subscribers and JSON-lines files."""

from __future__ import annotations

from hauler.core.events import EventBus, JsonLines, read_json_lines


def test_events_reach_every_subscriber_and_the_file(tmp_path):
    bus, seen = EventBus(), []
    lines = JsonLines(tmp_path / "job" / "events.jsonl")
    bus.subscribe(lines)
    unsubscribe = bus.subscribe(seen.append)
    bus.emit("round.complete", round=2, sites=["site-1"])
    unsubscribe()
    bus.emit("job.finished", rounds_done=3)
    lines.close()
    records = read_json_lines(tmp_path / "job" / "events.jsonl")
    assert [(r["event"], r.get("round"), r.get("rounds_done")) for r in records] == [
        ("round.complete", 2, None), ("job.finished", None, 3)]
    assert all(isinstance(r["time_s"], float) for r in records)
    assert [event.name for event in seen] == ["round.complete"]


def test_reading_a_file_not_written_yet_gives_nothing(tmp_path):
    assert read_json_lines(tmp_path / "events.jsonl") == []


def test_a_subscriber_that_raises_is_dropped_not_fatal():
    bus, seen = EventBus(), []

    def broken(event):
        raise OSError("No space left on device")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    bus.emit("round.started", round=0)
    bus.emit("round.complete", round=0)
    assert [event.name for event in seen] == ["round.started", "round.complete"]
