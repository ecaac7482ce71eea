"""Where an update's chunks land before they are folded, and the fold of each as it lands."""

from __future__ import annotations

from collections.abc import Callable

from hauler.aggregate.fedavg import Contribution
from hauler.core.errors import UpdateRefused
from hauler.model import Chunk
from hauler.transfer import ReceiveLedger


class UploadBuffers:
    """One chunk-sized buffer per lane (each lands one chunk at a time), reused all job long.
    Which lane a chunk is arriving on is for the `ledger` of the upload in progress to say."""

    def __init__(self, chunk_bytes: int, lanes: int) -> None:
        self._buffers = [memoryview(bytearray(chunk_bytes)) for _ in range(lanes)]
        self.ledger: ReceiveLedger | None = None

    def chunk_bytes(self, tensor: int, offset: int, length: int) -> memoryview:
        assert self.ledger is not None, "no upload in progress"
        return self._buffers[self.ledger.lane_of(tensor, offset)][:length]


def folding(
    contribution: Contribution, buffers: UploadBuffers, site: str
) -> Callable[[Chunk], None]:
    """Fold each landed chunk of `site`'s upload; a refusal names the site."""

    def fold(chunk: Chunk) -> None:
        try:
            contribution.fold(chunk, buffers.chunk_bytes(chunk.tensor, chunk.offset, chunk.length))
        except UpdateRefused as error:
            raise UpdateRefused(f"{site}'s update: {error}") from None

    return fold
