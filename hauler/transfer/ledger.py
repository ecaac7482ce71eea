"""The receiver's ledger: which chunks have landed, on which lane, what to acknowledge.

The sender hands a transfer's chunks to its lanes (parallel connections) as each has room,
so a lane's chunks are not known in advance: a header is checked against the plan (a real
chunk, not landed yet, not arriving on another lane, of a length the transfer allows) before
its payload may land. A lane is acknowledged by how many of its chunks have landed, which is
where its sender resumes after a reconnect. An encoded transfer's chunks have lengths only
their sender knows, bounded by `payload_limit`; every payload's checksum is kept (8 bytes a
chunk) and, once all have landed, checked against the transfer's `stream_digest`, so data and
announcement that disagree are caught even when each frame was intact. The ledger outlives
connections.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from hauler.core.errors import DigestError, RemoteProtocolError
from hauler.model.manifest import Chunk, digest_of_checksums
from hauler.model.plan import ChunkPlan
from hauler.transfer.frames import FrameHeader, Kind


class ReceiveLedger:
    """Tracks one transfer's progress at the receiver, across lanes and reconnects."""

    def __init__(
        self,
        plan: ChunkPlan,
        lanes: int = 1,
        *,
        payload_limit: Callable[[Chunk], int] | None = None,
        stream_digest: str = "",
    ) -> None:
        self.plan = plan
        self.lanes = max(1, min(lanes, plan.total))
        self.payload_limit = payload_limit
        self.stream_digest = stream_digest
        self._landed = bytearray(plan.total)
        self._arriving: list[int | None] = [None] * self.lanes  # the chunk each lane is landing
        self._held = [0] * self.lanes
        self._checksums = array("Q", bytes(8 * plan.total))
        self.bytes_received = 0  # payload bytes, as they travelled
        self.raw_bytes_received = 0  # the model's bytes they stand for

    def held(self, lane: int) -> int:
        """How many chunks have landed on `lane`: its acknowledgement."""
        return self._held[lane]

    @property
    def done(self) -> bool:
        return sum(self._held) == self.plan.total

    def expect(self, header: FrameHeader, lane: int = 0) -> Chunk:
        """Check a DATA header names a chunk of the plan that may land now, on `lane`; return it."""
        if header.kind is not Kind.DATA:
            raise RemoteProtocolError(f"unexpected {header.kind.name} frame")
        if header.seq >= self.plan.total:
            raise RemoteProtocolError(f"chunk {header.seq} is not one of the model's")
        chunk = self.plan.chunk(header.seq)
        self._check_length(chunk, header.length)
        if self._landed[chunk.seq]:
            raise RemoteProtocolError(f"chunk {chunk.seq} sent twice")
        if chunk.seq in self._arriving and self._arriving[lane] != chunk.seq:
            raise RemoteProtocolError(f"chunk {chunk.seq} is already arriving on another lane")
        self._arriving[lane] = chunk.seq
        return chunk

    def _check_length(self, chunk: Chunk, length: int) -> None:
        limit = chunk.length if self.payload_limit is None else self.payload_limit(chunk)
        if length > limit or (self.payload_limit is None and length != chunk.length):
            raise RemoteProtocolError(
                f"chunk {chunk.seq} of {length} bytes, where this transfer allows "
                f"{'at most ' if self.payload_limit else ''}{limit}"
            )

    def commit(self, chunk: Chunk, checksum: int, nbytes: int, lane: int = 0) -> None:
        """Record a chunk of `nbytes` landed (and consumed) on `lane`; the last one checks the
        transfer's stream digest, if it has one."""
        self._checksums[chunk.seq] = checksum
        self._landed[chunk.seq] = 1
        self._arriving[lane] = None
        self._held[lane] += 1
        self.bytes_received += nbytes
        self.raw_bytes_received += chunk.length
        if self.stream_digest and self.done:
            found = digest_of_checksums(self._checksums)
            if found != self.stream_digest:
                raise DigestError(
                    f"the transfer's chunks hash to {found}, not to the announced "
                    f"{self.stream_digest}; the sender's data and announcement disagree"
                )
