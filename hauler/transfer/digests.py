"""Tensor digests checked as chunks land, from bytes already in cache: no second pass.

A tensor's digest is xxh3-64 over the checksums of its pieces (`Manifest.tensor_pieces`).
When a chunk lands (or is decoded into place), each of its pieces is hashed (a chunk that is
one whole piece reuses its frame's checksum) and kept, 8 bytes a piece; the tensor whose last
piece this was, on whichever lane, is checked against the manifest at once. A mismatch after
every frame matched means the sender's data and manifest disagree: `DigestError`, never
retried.
"""

from __future__ import annotations

from array import array
from itertools import accumulate

from hauler.core.errors import DigestError
from hauler.model.manifest import Chunk, chunk_checksum, digest_of_checksums
from hauler.model.plan import ChunkPlan


class DigestCheck:
    """The tensors of one transfer, each checked the moment its last piece lands."""

    def __init__(self, plan: ChunkPlan) -> None:
        self.plan = plan
        self._first, self._missing = plan.chunk_spans()
        self._at = [0, *accumulate(self._missing)]  # where each tensor's checksums begin
        self._checksums = array("Q", bytes(8 * self._at[-1]))
        for index, missing in enumerate(self._missing):
            if not missing:  # an empty tensor is complete before anything arrives
                self._verify(index)

    @property
    def complete(self) -> bool:
        """Every tensor has landed whole and matched its digest."""
        return not any(self._missing)

    def landed(self, chunk: Chunk, view: memoryview, checksum: int | None = None) -> None:
        """The raw bytes of `chunk` are in place (`checksum`: theirs, if known). (Runs once
        per piece: a chunk of small tensors has hundreds, hence the local names.)"""
        at, first, missing, checksums = self._at, self._first, self._missing, self._checksums
        for tensor, start, _, length in self.plan.pieces(chunk):
            if checksum is not None and length == chunk.length:
                found = checksum  # the chunk is this one piece
            else:
                found = chunk_checksum(view[start : start + length])
            checksums[at[tensor] + chunk.seq - first[tensor]] = found
            missing[tensor] -= 1
            if not missing[tensor]:
                self._verify(tensor)

    def _verify(self, index: int) -> None:
        tensor = self.plan.manifest.tensors[index]
        digest = digest_of_checksums(self._checksums[self._at[index] : self._at[index + 1]])
        if tensor.digest and digest != tensor.digest:
            raise DigestError(
                f"tensor {tensor.name!r}: its chunks hash to {digest}, not to the manifest's "
                f"{tensor.digest}; the sender's data and manifest disagree"
            )
