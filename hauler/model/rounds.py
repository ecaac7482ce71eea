"""A job's global models: `global/round-<r>.safetensors` with its manifest beside it.

A round's manifest file is written last (temporary name, then rename), so its presence means
the round is complete. Round 0 is the job's initial model and is kept for the job's life, so
a job can always fall back to it. Of the later rounds only `keep_rounds` files are kept: the
oldest lends its inode to the next round, renamed and overwritten in place, so steady-state
rounds write into pages already in the page cache. A job therefore holds keep_rounds + 1
model files on disk.

After a crash (or a full disk) any round may be torn: its manifest missing, truncated or
unparsable, its file short, long or not matching its digests. `latest_intact` skips such
rounds, newest first, says why, and removes their manifests so that no later reader takes
them for complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hauler.core.errors import HaulerError
from hauler.model.file import ModelFile
from hauler.model.manifest import Manifest

INITIAL_ROUND = 0


@dataclass(frozen=True)
class SkippedRound:
    """A round found torn at restart, and why."""

    round: int
    reason: str


class RoundStore:
    def __init__(self, job_dir: Path, keep_rounds: int) -> None:
        self.directory = job_dir / "global"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_rounds = keep_rounds

    def path(self, round: int) -> Path:
        return self.directory / f"round-{round}.safetensors"

    def manifest_path(self, round: int) -> Path:
        return self.directory / f"round-{round}.manifest.json"

    def rounds(self) -> list[int]:
        """Rounds whose manifest was written, newest first."""
        return _numbers(self.directory.glob("round-*.manifest.json"))

    def latest(self) -> int | None:
        """The newest complete round, or None if not even the initial model is there."""
        return next(iter(self.rounds()), None)

    def latest_intact(self) -> tuple[int | None, list[SkippedRound]]:
        """The newest round whose file matches its manifest, and the newer ones skipped as torn
        (their manifests removed). None if not even round 0 is intact."""
        found = {*self.rounds(), *_numbers(self.directory.glob("round-*.safetensors"))}
        skipped = []
        for round in sorted(found, reverse=True):
            reason = self.damage(round)
            if reason is None:
                return round, skipped
            skipped.append(SkippedRound(round, reason))
            self.manifest_path(round).unlink(missing_ok=True)
        return None, skipped

    def damage(self, round: int) -> str | None:
        """Why `round` cannot be used as it is on disk, or None if it is intact."""
        if not self.manifest_path(round).exists():
            return "no manifest: the round was never completed"
        try:
            with self.open(round) as model:
                expected = model.manifest
                if model.compute_digests() != expected:
                    return "its file does not match its manifest's digests"
        except (HaulerError, OSError, ValueError) as error:
            return f"unreadable: {error}"
        return None

    def create(self, round: int, manifest: Manifest) -> ModelFile:
        """A writable file for `round`, reusing the inode of the round that falls out of
        `keep_rounds` (never round 0's); a stale manifest of `round` goes first."""
        self.manifest_path(round).unlink(missing_ok=True)
        retired = round - self.keep_rounds
        reuse = self.path(retired) if retired > INITIAL_ROUND else None
        if reuse is not None:
            self.manifest_path(retired).unlink(missing_ok=True)
        return ModelFile.create(self.path(round), manifest, reuse=reuse)

    def remove_all(self) -> None:
        """Every round's file and manifest: the job keeps no model any more."""
        for path in [
            *self.directory.glob("round-*.safetensors"),
            *self.directory.glob("round-*.manifest.json"),
        ]:
            path.unlink(missing_ok=True)

    def commit(self, round: int, manifest: Manifest) -> None:
        """Mark `round` complete by writing its manifest (with digests) atomically."""
        temporary = self.manifest_path(round).with_suffix(".tmp")
        temporary.write_text(json.dumps(manifest.to_json()))
        os.replace(temporary, self.manifest_path(round))

    def manifest(self, round: int) -> Manifest:
        try:
            return Manifest.from_json(json.loads(self.manifest_path(round).read_text()))
        except ValueError as error:  # a torn or hand-edited manifest
            raise HaulerError(f"{self.manifest_path(round)}: not a manifest ({error})") from None

    def open(self, round: int) -> ModelFile:
        """A complete round's model, read-only, with its digests; its file must hold the layout
        its manifest says (a torn file is refused)."""
        manifest = self.manifest(round)
        model = ModelFile.open(self.path(round), chunk_bytes=manifest.chunk_bytes)
        if not model.manifest.same_layout(manifest):
            model.close()
            raise HaulerError(f"{self.path(round)}: its tensors differ from its manifest's")
        model.manifest = manifest
        return model


def _numbers(paths: object) -> list[int]:
    """Round numbers of `round-<r>.*` files, newest first (other names are ignored)."""
    found = set()
    for path in paths:  # type: ignore[attr-defined]
        number = path.name.split("-", 1)[1].split(".", 1)[0]
        if number.isdigit():
            found.add(int(number))
    return sorted(found, reverse=True)
