"""A job's rounds on disk: round 0 kept for good, later rounds rotating through keep_rounds files,
and every kind of torn round skipped at restart, newest first, down to round 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import fill_exact_values, manifest_of

from hauler.model.rounds import RoundStore

LAYOUT = [("a", "F32", (3000,)), ("b", "I64", (100,))]


def store_with_rounds(job_dir: Path, last: int, keep: int = 2) -> RoundStore:
    """Rounds 0..last committed as the federation commits them."""
    rounds = RoundStore(job_dir, keep)
    for round in range(last + 1):
        with rounds.create(round, manifest_of(LAYOUT)) as model:
            fill_exact_values(model, seed=round)
            rounds.commit(round, model.compute_digests())
    return rounds


def test_round_zero_is_kept_and_later_rounds_rotate(tmp_path):
    rounds = store_with_rounds(tmp_path, 5)
    assert sorted(
        int(p.name.split("-")[1].split(".")[0]) for p in rounds.directory.glob("*.safetensors")
    ) == [0, 4, 5]
    assert rounds.rounds() == [5, 4, 0]
    assert rounds.latest_intact() == (5, [])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def extend(path: Path) -> None:
    with path.open("ab") as file:
        file.write(b"\0" * 64)


def flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def tear_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:20] = b"\0" * 12
    path.write_bytes(bytes(data))


TEARS = {
    "manifest_missing": lambda r, n: r.manifest_path(n).unlink(),
    "manifest_truncated": lambda r, n: r.manifest_path(n).write_text(
        r.manifest_path(n).read_text()[:40]
    ),
    "manifest_not_json": lambda r, n: r.manifest_path(n).write_bytes(b"\xff\x00garbage"),
    "manifest_of_another_layout": lambda r, n: r.manifest_path(n).write_text(
        json.dumps(manifest_of([("z", "F32", (7,))]).to_json())
    ),
    "file_short": lambda r, n: truncate(r.path(n)),
    "file_long": lambda r, n: extend(r.path(n)),
    "file_missing": lambda r, n: r.path(n).unlink(),
    "file_header_torn": lambda r, n: tear_header(r.path(n)),
    "data_not_matching_digests": lambda r, n: flip_a_data_byte(r.path(n)),
}


@pytest.mark.parametrize("tear", TEARS.values(), ids=TEARS.keys())
def test_a_torn_newest_round_is_skipped_with_its_reason_and_its_manifest_removed(tmp_path, tear):
    rounds = store_with_rounds(tmp_path, 3)
    tear(rounds, 3)
    latest, skipped = rounds.latest_intact()
    assert latest == 2
    assert [s.round for s in skipped] == [3] and skipped[0].reason
    assert rounds.latest() == 2  # no reader takes the torn round for complete any more
    assert not rounds.manifest_path(3).exists()


def test_torn_rounds_fall_back_down_to_round_zero_and_past_it(tmp_path):
    rounds = store_with_rounds(tmp_path, 4)
    for round in (4, 3):
        truncate(rounds.path(round))
    latest, skipped = rounds.latest_intact()
    assert latest == 0 and [s.round for s in skipped] == [
        4,
        3,
    ]  # retired rounds 1, 2 are not listed
    flip_a_data_byte(rounds.path(0))
    latest, skipped = rounds.latest_intact()
    assert latest is None and [s.round for s in skipped] == [4, 3, 0]


def test_a_round_being_built_at_a_crash_is_skipped_as_never_completed(tmp_path):
    rounds = store_with_rounds(tmp_path, 2)
    rounds.create(3, manifest_of(LAYOUT)).close()  # the crash came before its commit
    latest, skipped = rounds.latest_intact()
    assert latest == 2 and skipped[0].round == 3 and "never completed" in skipped[0].reason


def test_creating_a_round_again_drops_its_stale_manifest(tmp_path):
    rounds = store_with_rounds(tmp_path, 2)
    rounds.create(2, manifest_of(LAYOUT)).close()
    assert rounds.latest() == 1


def test_a_committed_manifest_is_known_without_reading_it_until_its_file_changes(tmp_path):
    rounds = RoundStore(tmp_path, 2)
    with rounds.create(1, manifest_of(LAYOUT)) as model:
        committed = model.compute_digests()
        rounds.commit(1, committed)
    assert rounds.manifest(1) is committed  # not read back and parsed
    other = manifest_of([("z", "F32", (7,))]).to_json()
    temporary = rounds.manifest_path(1).with_suffix(".edited")
    temporary.write_text(json.dumps(other))
    temporary.replace(rounds.manifest_path(1))  # another hand rewrote it
    assert rounds.manifest(1).names == ["z"]
