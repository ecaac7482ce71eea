"""Where received chunks go: into a model file, each tensor checked as it completes.

A sink says where a chunk's payload lands (`landing`) and consumes it once it has landed and
matched its checksum (`landed`). `FileSink` lands raw chunks in place in a model file (a site's
download, round 0 uploaded to the server, an admin's download) and checks every tensor against
the manifest's digest from the bytes just landed. Sinks that decode or fold take the same two
calls (`aggregate.uploads`, `transfer.deltas`).
"""

from __future__ import annotations

from typing import Protocol

from hauler.model import Chunk, ChunkPlan
from hauler.transfer.digests import DigestCheck


class ChunkViews(Protocol):
    def chunk_view(self, chunk: Chunk) -> memoryview: ...


class LaneBuffers:
    """One landing buffer per lane, and one to decode into (chunks are decoded one at a time),
    reused all job long: grown if a larger chunk comes."""

    def __init__(self, lanes: int, nbytes: int) -> None:
        self._buffers = [memoryview(bytearray(nbytes)) for _ in range(lanes)]
        self._decoded = memoryview(b"")

    def landing(self, lane: int, nbytes: int) -> memoryview:
        if lane >= len(self._buffers):
            self._buffers += [
                memoryview(bytearray(nbytes)) for _ in range(lane + 1 - len(self._buffers))
            ]
        if len(self._buffers[lane]) < nbytes:
            self._buffers[lane] = memoryview(bytearray(nbytes))
        return self._buffers[lane][:nbytes]

    def decoded(self, nbytes: int) -> memoryview:
        if len(self._decoded) < nbytes:
            self._decoded = memoryview(bytearray(nbytes))
        return self._decoded[:nbytes]


class FileSink:
    """Raw chunks land in place in `model` (laid out as `plan` says); each tensor is checked
    against the manifest's digest once its last piece is in."""

    def __init__(self, model: ChunkViews, plan: ChunkPlan) -> None:
        self.model = model
        self.digests = DigestCheck(plan)

    def landing(self, chunk: Chunk, lane: int, nbytes: int) -> memoryview:
        return self.model.chunk_view(chunk)

    def landed(self, chunk: Chunk, lane: int, view: memoryview, checksum: int) -> None:
        self.digests.landed(chunk, view, checksum)
