"""A site's download of the round's global delta: each encoded chunk decoded and added, in
place, to the previous round's model the site holds, then checked against the new round's
digests.

The server defined the new model as previous + decode(encoded delta) with the same arithmetic
(aggregate/finish.py: float pieces added in their wide dtype, then cast; other pieces set), so
the sum lands bit-identical to the server's round file, which the digests prove tensor by
tensor as they complete. A chunk is applied and acknowledged in one step, so a resumed
download never applies a chunk twice; a model half-updated by a download that failed is no
longer the previous round's, and the caller downloads the whole model instead.
"""

from __future__ import annotations

from hauler.model import Chunk, ChunkPlan, ModelFile
from hauler.model.codecs import Codec
from hauler.model.updates import apply_delta
from hauler.transfer.digests import DigestCheck
from hauler.transfer.sinks import LaneBuffers


class DeltaSink:
    """Encoded chunks land in a lane's buffer; decoded, they update `model` in place."""

    def __init__(self, model: ModelFile, plan: ChunkPlan, codec: Codec, lanes: int) -> None:
        self.model, self.plan, self.codec = model, plan, codec
        self.digests = DigestCheck(plan)
        self._landing = LaneBuffers(lanes, 0)
        self._decoded = memoryview(bytearray(plan.max_wide_bytes))
        self._sum = memoryview(bytearray(plan.max_wide_bytes))

    def landing(self, chunk: Chunk, lane: int, nbytes: int) -> memoryview:
        return self._landing.landing(lane, nbytes)

    def landed(self, chunk: Chunk, lane: int, view: memoryview, checksum: int) -> None:
        decoded = self.plan.wide_arrays(chunk, self._decoded)
        self.codec.decode(view, [array for _, array in decoded])
        target = self.model.chunk_view(chunk)
        for (_, delta), (_, current) in zip(decoded, self.plan.arrays(chunk, target)):
            apply_delta(current, delta, self._sum)
        self.digests.landed(chunk, target)
