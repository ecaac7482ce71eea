"""Where every chunk of a manifest sits: seq <-> (tensor, offset, length), in O(log tensors)."""

from __future__ import annotations

import bisect
from itertools import accumulate

from hauler.model.manifest import Chunk, Manifest


class ChunkPlan:
    """The fixed order in which a model's chunks travel; both peers derive the same plan."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        counts = [manifest.chunk_count(t) for t in manifest.tensors]
        self.first_seq = [0, *accumulate(counts)]  # first_seq[i]: seq of tensor i's first chunk
        self.total = self.first_seq[-1]

    def chunk(self, seq: int) -> Chunk:
        """The chunk with sequence number `seq` (0 <= seq < total)."""
        tensor = bisect.bisect_right(self.first_seq, seq) - 1  # empty tensors are skipped here
        offset = (seq - self.first_seq[tensor]) * self.manifest.chunk_bytes
        length = min(self.manifest.chunk_bytes, self.manifest.tensors[tensor].length - offset)
        return Chunk(seq, tensor, offset, length)

    def seq_of(self, tensor: int, offset: int) -> int:
        """The sequence number of the chunk of `tensor` that starts at `offset`."""
        return self.first_seq[tensor] + offset // self.manifest.chunk_bytes
