"""A job's global models: `global/round-<r>.safetensors` with its manifest beside it.

A round's manifest file is written last (temporary name, then rename), so its presence means
the round is complete. Round 0 is the job's initial model and is kept for the job's life, so
a job can always fall back to it. Of the later rounds only `keep_rounds` files are kept: the
oldest lends its inode to the next round, renamed and overwritten in place, so steady-state
rounds write into pages already in the page cache. A job therefore holds keep_rounds + 1
model files on disk.

A round may have companions, written before its manifest and named in it: `state-<r>` (the
server optimizer's moments and the download codec's residual after round r, aggregate/state.py)
and `delta-<r>` (the encoded difference from round r - 1, which sites holding round r - 1
download instead of the whole model). They are retired with their round.

After a crash (or a full disk) any round may be torn: its manifest missing, truncated or
unparsable, its file (or a companion) short, long or not matching its digests.
`latest_intact` skips such rounds, newest first, says why, and removes their manifests so
that no later reader takes them for complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hauler.core.errors import HaulerError
from hauler.core.files import replace_json
from hauler.model.encoded import EncodedFile, EncodedIndex, EncodedWriter
from hauler.model.file import ModelFile
from hauler.model.manifest import Manifest, chunk_checksum, digest_of_checksums

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
        self._cache: tuple[tuple, tuple[dict, Manifest]] | None = None

    def path(self, round: int) -> Path:
        return self.directory / f"round-{round}.safetensors"

    def state_path(self, round: int) -> Path:
        return self.directory / f"state-{round}.safetensors"

    def delta_path(self, round: int) -> Path:
        return self.directory / f"delta-{round}.bin"

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
            return self._companion_damage(round)
        except (HaulerError, OSError, ValueError) as error:
            return f"unreadable: {error}"

    def _companion_damage(self, round: int) -> str | None:
        state = self.open_state(round)
        if state is not None:
            with state:
                expected = state.manifest
                if state.compute_digests() != expected:
                    return "its state file does not match its manifest's digests"
        delta = self.open_delta(round)
        if delta is not None:
            try:
                checksums = [chunk_checksum(delta.chunk_views(c)[0]) for c in self._chunks(round)]
                if digest_of_checksums(checksums) != delta.index.digest:
                    return "its delta file does not match its digest"
            finally:
                delta.close()
        return None

    def create(self, round: int, manifest: Manifest) -> ModelFile:
        """A writable file for `round`, reusing the inode of the round that falls out of
        `keep_rounds` (never round 0's), whose companions are retired too; a stale manifest of
        `round` goes first."""
        self.manifest_path(round).unlink(missing_ok=True)
        retired = round - self.keep_rounds
        reuse = self.path(retired) if retired > INITIAL_ROUND else None
        if reuse is not None:
            self.manifest_path(retired).unlink(missing_ok=True)
            _rename_if_there(self.state_path(retired), self.state_path(round))
            _rename_if_there(self.delta_path(retired), self.delta_path(round))
        return ModelFile.create(self.path(round), manifest, reuse=reuse)

    def create_state(self, round: int, manifest: Manifest) -> ModelFile:
        """A writable state file for `round` (after `create`, which may have lent it an inode)."""
        return ModelFile.create(self.state_path(round), manifest)

    def delta_writer(self, round: int, codec: str, block_elements: int) -> EncodedWriter:
        """Where round `round`'s encoded delta from round - 1 is written."""
        return EncodedWriter(self.delta_path(round), codec, block_elements)

    def remove_all(self) -> None:
        """Every round's file, companions and manifest: the job keeps no model any more."""
        for pattern in ("round-*", "state-*", "delta-*"):
            for path in self.directory.glob(pattern):
                path.unlink(missing_ok=True)

    def commit(
        self,
        round: int,
        manifest: Manifest,
        *,
        state: Manifest | None = None,
        delta: EncodedIndex | None = None,
    ) -> None:
        """Mark `round` complete by writing its manifest (with digests, and those of its
        companions) atomically."""
        record = manifest.to_json()
        if state is not None:
            record["state"] = state.to_json()
        if delta is not None:
            record["delta"] = delta.to_json()
        replace_json(self.manifest_path(round), record)
        self._cache = (self._key(round), (record, manifest))  # not read back and parsed

    def _key(self, round: int) -> tuple:
        """What identifies the manifest file of `round` as it is now on disk."""
        stat = self.manifest_path(round).stat()
        return (round, stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _record(self, round: int) -> dict:
        return self._parsed(round)[0]

    def _parsed(self, round: int) -> tuple[dict, Manifest]:
        """A round's manifest file, read and validated once while the file stays the same (a
        model of thousands of tensors is read several times a round); the one just committed
        is known without reading it."""
        path, key = self.manifest_path(round), self._key(round)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            record = json.loads(path.read_text())
        except ValueError as error:  # a torn or hand-edited manifest
            raise HaulerError(f"{path}: not a manifest ({error})") from None
        if not isinstance(record, dict):
            raise HaulerError(f"{path}: not a manifest")
        parsed = (record, Manifest.from_json(record))
        self._cache = (key, parsed)
        return parsed

    def open_state(self, round: int) -> ModelFile | None:
        """Round `round`'s state file, read-only, or None if the round has none."""
        record = self._record(round).get("state")
        if record is None:
            return None
        return opened(self.state_path(round), Manifest.from_json(record))

    def delta_index(self, round: int) -> EncodedIndex | None:
        """How round `round`'s delta from round - 1 was encoded, or None if it has none."""
        record = self._record(round)
        if record.get("delta") is None:
            return None
        return EncodedIndex.from_json(record["delta"], self.manifest(round).chunk_count())

    def open_delta(self, round: int) -> EncodedFile | None:
        """Round `round`'s encoded delta from round - 1, to send, or None if it has none."""
        index = self.delta_index(round)
        return None if index is None else EncodedFile(self.delta_path(round), index)

    def _chunks(self, round: int) -> list:
        return list(self.manifest(round).chunks())

    def manifest(self, round: int) -> Manifest:
        return self._parsed(round)[1]

    def open(self, round: int) -> ModelFile:
        """A complete round's model, read-only, with its digests; its file must hold the layout
        its manifest says (a torn file is refused)."""
        return opened(self.path(round), self.manifest(round))


def _numbers(paths: object) -> list[int]:
    """Round numbers of `round-<r>.*` files, newest first (other names are ignored)."""
    found = set()
    for path in paths:  # type: ignore[attr-defined]
        number = path.name.split("-", 1)[1].split(".", 1)[0]
        if number.isdigit():
            found.add(int(number))
    return sorted(found, reverse=True)


def opened(path: Path, manifest: Manifest) -> ModelFile:
    """The file at `path`, read-only, which must hold `manifest`'s layout; it gets its digests.
    A file Hauler wrote has exactly the header the manifest makes, which is compared as bytes
    (a model of thousands of tensors is not parsed again each round); any other is parsed."""
    header = manifest.safetensors_header()
    with open(path, "rb") as handle:
        same = handle.read(len(header)) == header
        size = os.fstat(handle.fileno()).st_size
    if same and size == len(header) + manifest.total_bytes:
        return ModelFile(path, manifest, data_start=len(header), writable=False)
    model = ModelFile.open(path, chunk_bytes=manifest.chunk_bytes)
    if not model.manifest.same_layout(manifest):
        model.close()
        raise HaulerError(f"{path}: its tensors differ from its manifest's")
    model.manifest = manifest
    return model


def _rename_if_there(source: Path, target: Path) -> None:
    """Lend `source`'s inode to `target` (its pages are warm), if it exists."""
    if source.exists():
        os.replace(source, target)
