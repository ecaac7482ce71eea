"""The receiver's ledger: which chunks have landed, on which lane, what to acknowledge.

The sender hands a transfer's chunks to its lanes (parallel connections) as each has room,
so a lane's chunks are not known in advance: a header is checked against the plan (a real
chunk of the manifest, not landed yet, not arriving on another lane) before its payload may
land. A lane is acknowledged by how many of its chunks have landed, which is where its
sender resumes after a reconnect. Every payload's checksum is kept (8 bytes a chunk), so a
tensor's digest is verified the moment its last chunk lands, on whichever lane, with no
second pass over its bytes. The ledger outlives connections.
"""

from __future__ import annotations

from array import array

from hauler.core.errors import DigestError, RemoteProtocolError
from hauler.model.manifest import Chunk, digest_of_checksums
from hauler.model.plan import ChunkPlan
from hauler.transfer.frames import FrameHeader, Kind


class ReceiveLedger:
    """Tracks one transfer's progress at the receiver, across lanes and reconnects."""

    def __init__(self, plan: ChunkPlan, lanes: int = 1) -> None:
        self.plan = plan
        self.lanes = max(1, min(lanes, plan.total))
        self._landed = bytearray(plan.total)
        self._arriving: list[int | None] = [None] * self.lanes  # the chunk each lane is landing
        self._held = [0] * self.lanes
        self._checksums = array("Q", bytes(8 * plan.total))
        self._missing = [
            plan.first_seq[i + 1] - plan.first_seq[i] for i in range(len(plan.manifest.tensors))
        ]
        self.bytes_received = 0
        self._begun = False

    def held(self, lane: int) -> int:
        """How many chunks have landed on `lane`: its acknowledgement."""
        return self._held[lane]

    @property
    def done(self) -> bool:
        return sum(self._held) == self.plan.total

    def lane_of(self, tensor: int, offset: int) -> int:
        """The lane the chunk at (`tensor`, `offset`) is arriving on, between `expect` and
        `commit`."""
        return self._arriving.index(self.plan.seq_of(tensor, offset))

    def expect(self, header: FrameHeader, lane: int = 0) -> Chunk:
        """Check a DATA header names a chunk of the plan that may land now, on `lane`; return it."""
        if header.kind is not Kind.DATA:
            raise RemoteProtocolError(f"unexpected {header.kind.name} frame")
        chunk = self._planned(header)
        if self._landed[chunk.seq]:
            raise RemoteProtocolError(
                f"chunk {chunk.seq} (tensor {chunk.tensor}, offset {chunk.offset}) sent twice"
            )
        if chunk.seq in self._arriving and self._arriving[lane] != chunk.seq:
            raise RemoteProtocolError(f"chunk {chunk.seq} is already arriving on another lane")
        self._arriving[lane] = chunk.seq
        return chunk

    def _planned(self, header: FrameHeader) -> Chunk:
        manifest = self.plan.manifest
        if header.tensor < len(manifest.tensors) and header.offset % manifest.chunk_bytes == 0:
            seq = self.plan.seq_of(header.tensor, header.offset)
            if seq < self.plan.total:
                chunk = self.plan.chunk(seq)
                if (chunk.tensor, chunk.offset, chunk.length) == (
                    header.tensor,
                    header.offset,
                    header.length,
                ):
                    return chunk
        raise RemoteProtocolError(
            f"chunk ({header.tensor}, {header.offset}, {header.length}) "
            "is not one of the manifest's"
        )

    def begin(self) -> list[int]:
        """Tensors complete before any chunk arrives (the empty ones); [] on later calls."""
        if self._begun:
            return []
        self._begun = True
        return [index for index, missing in enumerate(self._missing) if missing == 0]

    def commit(self, chunk: Chunk, checksum: int, lane: int = 0) -> list[int]:
        """Record a chunk landed on `lane`; returns the tensors it completed, each checked against
        its digest."""
        self._checksums[chunk.seq] = checksum
        self._landed[chunk.seq] = 1
        self._arriving[lane] = None
        self._held[lane] += 1
        self.bytes_received += chunk.length
        self._missing[chunk.tensor] -= 1
        if self._missing[chunk.tensor]:
            return []
        self._verify(chunk.tensor)
        return [chunk.tensor]

    def _verify(self, index: int) -> None:
        tensor = self.plan.manifest.tensors[index]
        seqs = slice(self.plan.first_seq[index], self.plan.first_seq[index + 1])
        digest = digest_of_checksums(self._checksums[seqs])
        if tensor.digest and digest != tensor.digest:
            raise DigestError(
                f"tensor {tensor.name!r}: its chunks hash to {digest}, not to the manifest's "
                f"{tensor.digest}; the sender's data and manifest disagree"
            )
