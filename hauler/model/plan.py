"""Where every chunk of a manifest sits, and which pieces of which tensors it holds.

Both peers derive the same plan from the manifest: chunk `seq` is the byte range
[seq x chunk_bytes, ...) of the data region, and its pieces are its intersections with the
tensors it crosses (found by bisection, in O(log tensors + pieces)). A piece is what a
codec encodes, a fold adds and a digest covers: whole elements of one tensor.

Consecutive pieces of one dtype form a run, handled as one array (`arrays`, `wide_arrays`):
a chunk of a model of thousands of small tensors is a few runs, not thousands of numpy calls,
for the fold, the finish and the codecs alike; what is kept per tensor (digests, integer
policies, side accumulators) takes the run's pieces one by one (`Run.split`).

An update (a model minus the global one, what codecs carry) is laid out "wide": float pieces
in their accumulator dtype (float32, or float64 for float64 tensors: the difference of two
bfloat16 values needs more than bfloat16), the others as they are. `wide_arrays` lays a
chunk's runs out that way in a caller's reused buffer of `max_wide_bytes`.
"""

from __future__ import annotations

import bisect
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hauler.model.dtypes import accumulator_dtype, numpy_dtype
from hauler.model.manifest import Chunk, Manifest

RECENT_CHUNKS = 64  # chunks whose pieces a plan keeps: a window's worth, or more


class Piece(NamedTuple):
    """The part of tensor `tensor` a chunk holds: `length` bytes from `start` within the chunk,
    `offset` bytes into the tensor. (A named tuple: a chunk of a model of small tensors makes
    hundreds of them.)"""

    tensor: int
    start: int
    offset: int
    length: int


@dataclass(frozen=True)
class Run:
    """Consecutive pieces of one chunk whose tensors share a dtype: one array covers them."""

    pieces: tuple[Piece, ...]
    itemsize: int

    @property
    def tensor(self) -> int:
        """The first piece's tensor (every piece of a run has its dtype)."""
        return self.pieces[0].tensor

    @property
    def start(self) -> int:
        """Bytes into the chunk."""
        return self.pieces[0].start

    @property
    def offset(self) -> int:
        """Bytes into its first tensor (the run goes on, contiguous, through the next ones)."""
        return self.pieces[0].offset

    @property
    def length(self) -> int:
        return sum(piece.length for piece in self.pieces)

    def split(self, array: np.ndarray) -> list[tuple[Piece, np.ndarray]]:
        """The run's array cut back into its pieces' (views, no copy)."""
        found, position = [], 0
        for piece in self.pieces:
            count = piece.length // self.itemsize
            found.append((piece, array[position : position + count]))
            position += count
        return found

    def piece_at(self, element: int) -> Piece:
        """The piece that holds element `element` of the run's array."""
        for piece in self.pieces:
            if element < piece.length // self.itemsize:
                return piece
            element -= piece.length // self.itemsize
        raise IndexError(element)


Span = Piece | Run  # both name their (first) tensor, their offset in it and their length
PieceArrays = list[tuple[Run, np.ndarray]]


class ChunkPlan:
    """The fixed order in which a model's chunks travel, and their pieces."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.total = manifest.chunk_count()
        self._offsets = [tensor.offset for tensor in manifest.tensors]
        self._ends = [tensor.end for tensor in manifest.tensors]
        self._dtypes = [numpy_dtype(tensor.dtype) for tensor in manifest.tensors]
        self._wide = [wide_dtype(tensor.dtype) for tensor in manifest.tensors]
        self.max_wide_bytes = 2 * manifest.chunk_bytes  # bfloat16 and float16 widen twofold
        self._recent: OrderedDict[int, list[Piece]] = OrderedDict()

    def chunk(self, seq: int) -> Chunk:
        """The chunk with sequence number `seq` (0 <= seq < total)."""
        offset = seq * self.manifest.chunk_bytes
        return Chunk(
            seq, offset, min(self.manifest.chunk_bytes, self.manifest.total_bytes - offset)
        )

    def pieces(self, chunk: Chunk) -> list[Piece]:
        """The non-empty pieces of the tensors `chunk` crosses, in file order (the last few
        chunks' are kept: a landed chunk is checked, decoded and folded piece by piece)."""
        found = self._recent.get(chunk.seq)
        if found is None:
            found = self._recent[chunk.seq] = self._pieces(chunk)
            if len(self._recent) > RECENT_CHUNKS:
                self._recent.popitem(last=False)
        return found

    def _pieces(self, chunk: Chunk) -> list[Piece]:
        offsets, ends, end = self._offsets, self._ends, chunk.offset + chunk.length
        index, found = bisect.bisect_right(ends, chunk.offset), []
        while index < len(ends) and offsets[index] < end:
            start, stop = max(offsets[index], chunk.offset), min(ends[index], end)
            if stop > start:
                found.append(
                    Piece(index, start - chunk.offset, start - offsets[index], stop - start)
                )
            index += 1
        return found

    def chunk_spans(self) -> tuple[list[int], list[int]]:
        """Each tensor's first chunk and how many chunks hold a piece of it (none for an empty
        tensor), for every tensor at once: new lists, the caller's to keep."""
        size, tensors = self.manifest.chunk_bytes, self.manifest.tensors
        first = [t.offset // size for t in tensors]
        counts = [
            (t.offset + t.length - 1) // size - start + 1 if t.length else 0
            for t, start in zip(tensors, first)
        ]
        return first, counts

    def dtype(self, span: Span) -> np.dtype:
        return self._dtypes[span.tensor]

    def wide(self, span: Span) -> np.dtype:
        """The dtype an update of this piece or run is held in."""
        return self._wide[span.tensor]

    def count(self, span: Span) -> int:
        """Elements in the piece or run."""
        return span.length // self._dtypes[span.tensor].itemsize

    def data_offset(self, span: Span) -> int:
        """Where a piece or run starts in the model's data region."""
        return self.manifest.tensors[span.tensor].offset + span.offset

    def runs(self, chunk: Chunk) -> list[Run]:
        """The chunk's pieces, consecutive ones of one dtype together."""
        groups: list[list[Piece]] = []
        for piece in self.pieces(chunk):
            if groups and self._dtypes[groups[-1][-1].tensor] == self._dtypes[piece.tensor]:
                groups[-1].append(piece)
            else:
                groups.append([piece])
        return [Run(tuple(group), self._dtypes[group[0].tensor].itemsize) for group in groups]

    def arrays(self, chunk: Chunk, view: memoryview) -> PieceArrays:
        """Each run of `chunk` as a numpy array of its tensors' dtype, viewing `view` (the
        chunk's raw bytes)."""
        found = []
        for run in self.runs(chunk):
            dtype = self._dtypes[run.tensor]
            array = np.frombuffer(view, dtype, run.length // dtype.itemsize, offset=run.start)
            found.append((run, array))
        return found

    def wide_arrays(self, chunk: Chunk, buffer: memoryview) -> PieceArrays:
        """Each run of `chunk` as an array of its wide dtype, one after another in `buffer`."""
        found, position = [], 0
        for run in self.runs(chunk):
            dtype, count = self._wide[run.tensor], run.length // run.itemsize
            found.append((run, np.frombuffer(buffer, dtype, count, offset=position)))
            position += count * dtype.itemsize
        return found


@functools.cache
def wide_dtype(name: str) -> np.dtype:
    """How an update of a tensor of this dtype is held: floats in their accumulator dtype."""
    dtype = numpy_dtype(name)
    return accumulator_dtype(dtype) if is_float(name) else dtype


def is_float(name: str) -> bool:
    """Whether a safetensors dtype holds floating-point values (bfloat16 included)."""
    return numpy_dtype(name).kind == "f" or name == "BF16"
