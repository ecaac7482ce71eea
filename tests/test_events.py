"""Structured events: fan-out to subscribers and JSON-lines files."""

from __future__ import annotations

from hauler.core.events import EventBus, JsonLines, read_json_lines, read_json_lines_page


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
        ("round.complete", 2, None),
        ("job.finished", None, 3),
    ]
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


def test_pages_hold_whole_records_and_together_every_record_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = JsonLines(path)
    for k in range(50):
        lines.write({"k": k, "pad": "x" * (k % 7)})
    with path.open("a") as file:
        file.write('{"k": "still being written"')  # no newline yet: not a record
    seen, offset = [], 0
    while True:
        records, offset = read_json_lines_page(path, offset, max_bytes=100)
        if not records:
            break
        seen.extend(record["k"] for record in records)
    lines.close()
    assert seen == list(range(50))
    assert read_json_lines_page(tmp_path / "absent.jsonl", 0, 100) == ([], 0)
