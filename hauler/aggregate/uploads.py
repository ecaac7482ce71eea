"""Where a site's update lands before it is folded, and the fold of each chunk as it lands.

Each lane lands one chunk at a time into its own buffer, kept all job long (`LaneBuffers`).
Once a chunk has landed and matched its checksum, the `UploadSink` checks it (a raw chunk's
tensors against the site's digests; an encoded stream is checked whole by its ledger), decodes
it if it is encoded (into one reused buffer: chunks are handled one at a time), and folds it.
So the server never holds more than a chunk per lane of any site's update.
"""

from __future__ import annotations

from hauler.aggregate.fedavg import Contribution
from hauler.core.errors import UpdateRefused
from hauler.model import Chunk, ChunkPlan
from hauler.model.codecs import Codec
from hauler.transfer import DigestCheck, LaneBuffers


class UploadSink:
    """A site's model or update as it lands: each chunk checked, decoded and folded."""

    def __init__(
        self,
        buffers: LaneBuffers,
        contribution: Contribution,
        plan: ChunkPlan,
        *,
        site: str,
        codec: Codec | None = None,
    ) -> None:
        self.buffers, self.contribution, self.plan, self.site = buffers, contribution, plan, site
        self.codec = codec
        self.digests = DigestCheck(plan) if codec is None else None
        self._decoded = buffers.decoded(plan.max_wide_bytes) if codec else memoryview(b"")

    def landing(self, chunk: Chunk, lane: int, nbytes: int) -> memoryview:
        return self.buffers.landing(lane, nbytes)

    def landed(self, chunk: Chunk, lane: int, view: memoryview, checksum: int) -> None:
        if self.codec is not None:
            values = self.plan.wide_arrays(chunk, self._decoded)
            self.codec.decode(view, [array for _, array in values])
        else:
            assert self.digests is not None
            self.digests.landed(chunk, view, checksum)
            values = self.plan.arrays(chunk, view)
        try:
            self.contribution.fold(chunk, values)
        except UpdateRefused as error:
            raise UpdateRefused(f"{self.site}'s update: {error}") from None
