"""The receiver's ledger: which chunk comes next on each lane, what is durable, what to ack.

A transfer's chunks are split into `lanes` contiguous runs of the plan, one per parallel
connection; on each lane they arrive in order. Each header is checked against the plan
before its payload may land. Every payload's checksum is kept (8 bytes a chunk), so a
tensor's digest is verified the moment its last chunk lands, on whichever lane, with no
second pass over its bytes. The ledger outlives connections: a reconnected lane resumes
at `position(lane)`.
"""

from __future__ import annotations

from array import array

from hauler.core.errors import DigestError, RemoteProtocolError
from hauler.model.manifest import Chunk, digest_of_checksums
from hauler.model.plan import ChunkPlan, lane_of
from hauler.transfer.frames import FrameHeader, Kind


class ReceiveLedger:
    """Tracks one transfer's progress at the receiver, across lanes and reconnects."""

    def __init__(self, plan: ChunkPlan, lanes: int = 1) -> None:
        self.plan = plan
        self.lanes = plan.lanes(lanes)
        self._positions = [lane.start for lane in self.lanes]
        self._checksums = array("Q", bytes(8 * plan.total))
        self._missing = [plan.first_seq[i + 1] - plan.first_seq[i] for i in range(len(plan.manifest.tensors))]
        self.bytes_received = 0
        self._begun = False

    @property
    def next_seq(self) -> int:
        """Where the single lane of a one-lane transfer resumes."""
        return self._positions[0]

    def position(self, lane: int) -> int:
        """The next chunk expected on `lane`: everything before it on that lane has landed."""
        return self._positions[lane]

    @property
    def done(self) -> bool:
        return all(position == lane.stop for position, lane in zip(self._positions, self.lanes))

    def expect(self, header: FrameHeader, lane: int = 0) -> Chunk:
        """Check a DATA header names exactly the next planned chunk of `lane`; return that chunk."""
        if header.kind is not Kind.DATA or self._positions[lane] == self.lanes[lane].stop:
            raise RemoteProtocolError(f"unexpected {header.kind.name} frame")
        chunk = self.plan.chunk(self._positions[lane])
        if (header.tensor, header.offset, header.length) != (chunk.tensor, chunk.offset, chunk.length):
            raise RemoteProtocolError(
                f"chunk ({header.tensor}, {header.offset}, {header.length}) is not the expected "
                f"({chunk.tensor}, {chunk.offset}, {chunk.length}) of seq {chunk.seq}"
            )
        return chunk

    def begin(self) -> list[int]:
        """Tensors complete before any chunk arrives (the empty ones); [] on later calls."""
        if self._begun:
            return []
        self._begun = True
        return [index for index, missing in enumerate(self._missing) if missing == 0]

    def commit(self, chunk: Chunk, checksum: int) -> list[int]:
        """Record a landed chunk; returns the tensors it completed, each checked against its digest."""
        self._checksums[chunk.seq] = checksum
        self._positions[lane_of(self.lanes, chunk.seq)] = chunk.seq + 1
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
            raise DigestError(f"tensor {tensor.name!r}: its chunks hash to {digest}, not to the manifest's "
                              f"{tensor.digest}; the sender's data and manifest disagree")
