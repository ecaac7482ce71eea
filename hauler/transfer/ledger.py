"""The receiver's ledger: which chunk comes next, what is durable, what to acknowledge.

Chunks arrive in plan order on a connection. Each header is checked against the
plan before its payload may land; each payload's checksum is kept so a tensor's
digest is verified the moment its last chunk lands, with no second pass.
"""

from __future__ import annotations

from hauler.core.errors import IntegrityError, RemoteProtocolError
from hauler.model.manifest import Chunk, digest_of_checksums
from hauler.model.plan import ChunkPlan
from hauler.transfer.frames import FrameHeader, Kind


class ReceiveLedger:
    """Tracks one transfer's progress at the receiver, across reconnects."""

    def __init__(self, plan: ChunkPlan) -> None:
        self.plan = plan
        self.next_seq = 0
        self.tensors_done = 0
        self._checksums: list[int] = []  # of the tensor in progress
        self.bytes_received = 0

    @property
    def done(self) -> bool:
        return self.next_seq == self.plan.total

    def expect(self, header: FrameHeader) -> Chunk:
        """Check a DATA header names exactly the next planned chunk; return that chunk."""
        if header.kind is not Kind.DATA or self.done:
            raise RemoteProtocolError(f"unexpected {header.kind.name} frame")
        chunk = self.plan.chunk(self.next_seq)
        if (header.tensor, header.offset, header.length) != (chunk.tensor, chunk.offset, chunk.length):
            raise RemoteProtocolError(
                f"chunk ({header.tensor}, {header.offset}, {header.length}) is not the expected "
                f"({chunk.tensor}, {chunk.offset}, {chunk.length}) of seq {chunk.seq}"
            )
        return chunk

    def begin(self) -> range:
        """Tensors complete before any chunk arrives (leading empty ones); call once per transfer."""
        return self._advance()

    def commit(self, chunk: Chunk, checksum: int) -> range:
        """Record a landed chunk; returns the indices of tensors this completed (maybe none)."""
        self._checksums.append(checksum)
        self.next_seq = chunk.seq + 1
        self.bytes_received += chunk.length
        completed = self._advance()
        if chunk.tensor in completed:
            self._verify(chunk.tensor)
        return completed

    def _advance(self) -> range:
        before, self.tensors_done = self.tensors_done, self.plan.tensors_done_before(self.next_seq)
        return range(before, self.tensors_done)

    def _verify(self, index: int) -> None:
        tensor = self.plan.manifest.tensors[index]
        digest, self._checksums = digest_of_checksums(self._checksums), []
        if tensor.digest and digest != tensor.digest:
            raise IntegrityError(f"tensor {tensor.name!r}: digest {digest} does not match the manifest's {tensor.digest}")
