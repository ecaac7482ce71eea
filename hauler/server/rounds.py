"""A job's global models: `global/round-<r>.safetensors` with its manifest beside it.

A round's manifest file is written last (temporary name, then rename), so its
presence means the round is complete. Only `keep_rounds` files are kept: the
oldest lends its inode to the next round, renamed and overwritten in place, so
steady-state rounds write into pages already in the page cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hauler.model import Manifest, ModelFile


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
        found = [int(p.name.split("-")[1].split(".")[0]) for p in self.directory.glob("round-*.manifest.json")]
        return sorted(found, reverse=True)

    def latest(self) -> int | None:
        """The newest complete round, or None if not even the initial model is there."""
        return next(iter(self.rounds()), None)

    def latest_intact(self) -> int | None:
        """The newest round whose file still matches its manifest's digests (after a crash, a
        machine that lost unwritten pages can leave a torn file behind its manifest)."""
        for round in self.rounds():
            with self.open(round) as model:
                expected = model.manifest
                if model.compute_digests() == expected:
                    return round
        return None

    def create(self, round: int, manifest: Manifest) -> ModelFile:
        """A writable file for `round`, reusing the inode of the round that falls out of `keep_rounds`."""
        retired = round - self.keep_rounds
        reuse = self.path(retired) if retired >= 0 else None
        if reuse is not None:
            self.manifest_path(retired).unlink(missing_ok=True)
        return ModelFile.create(self.path(round), manifest, reuse=reuse)

    def commit(self, round: int, manifest: Manifest) -> None:
        """Mark `round` complete by writing its manifest (with digests) atomically."""
        temporary = self.manifest_path(round).with_suffix(".tmp")
        temporary.write_text(json.dumps(manifest.to_json()))
        os.replace(temporary, self.manifest_path(round))

    def manifest(self, round: int) -> Manifest:
        return Manifest.from_json(json.loads(self.manifest_path(round).read_text()))

    def open(self, round: int) -> ModelFile:
        """A complete round's model, read-only, with its digests."""
        model = ModelFile.open(self.path(round), chunk_bytes=self.manifest(round).chunk_bytes)
        model.manifest = self.manifest(round)
        return model
