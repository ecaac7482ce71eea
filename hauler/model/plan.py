"""Where every chunk of a manifest sits, and which pieces of which tensors it holds.

Both peers derive the same plan from the manifest: chunk `seq` is the byte range
[seq x chunk_bytes, ...) of the data region, and its pieces are its intersections with the
tensors it crosses (found by bisection, in O(log tensors + pieces)). A piece is what a
codec encodes, a fold adds and a digest covers: whole elements of one tensor.

An update (a model minus the global one, what codecs carry) is laid out "wide": float pieces
in their accumulator dtype (float32, or float64 for float64 tensors: the difference of two
bfloat16 values needs more than bfloat16), the others as they are. `wide_arrays` lays a
chunk's pieces out that way in a caller's reused buffer of `max_wide_bytes`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from hauler.model.dtypes import accumulator_dtype, numpy_dtype
from hauler.model.manifest import Chunk, Manifest


@dataclass(frozen=True)
class Piece:
    """The part of tensor `tensor` a chunk holds: `length` bytes from `start` within the chunk,
    `offset` bytes into the tensor."""

    tensor: int
    start: int
    offset: int
    length: int


PieceArrays = list[tuple[Piece, np.ndarray]]


class ChunkPlan:
    """The fixed order in which a model's chunks travel, and their pieces."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.total = manifest.chunk_count()
        self._ends = [tensor.end for tensor in manifest.tensors]
        self._dtypes = [numpy_dtype(tensor.dtype) for tensor in manifest.tensors]
        self._wide = [wide_dtype(tensor.dtype) for tensor in manifest.tensors]
        self.max_wide_bytes = 2 * manifest.chunk_bytes  # bfloat16 and float16 widen twofold

    def chunk(self, seq: int) -> Chunk:
        """The chunk with sequence number `seq` (0 <= seq < total)."""
        offset = seq * self.manifest.chunk_bytes
        return Chunk(
            seq, offset, min(self.manifest.chunk_bytes, self.manifest.total_bytes - offset)
        )

    def pieces(self, chunk: Chunk) -> list[Piece]:
        """The non-empty pieces of the tensors `chunk` crosses, in file order."""
        tensors, end = self.manifest.tensors, chunk.offset + chunk.length
        index, found = bisect.bisect_right(self._ends, chunk.offset), []
        while index < len(tensors) and tensors[index].offset < end:
            tensor = tensors[index]
            start, stop = max(tensor.offset, chunk.offset), min(tensor.end, end)
            if stop > start:
                found.append(
                    Piece(index, start - chunk.offset, start - tensor.offset, stop - start)
                )
            index += 1
        return found

    def seqs_of(self, index: int) -> range:
        """The chunks that hold a piece of tensor `index` (none for an empty tensor)."""
        tensor, size = self.manifest.tensors[index], self.manifest.chunk_bytes
        if not tensor.length:
            return range(0)
        return range(tensor.offset // size, (tensor.end - 1) // size + 1)

    def dtype(self, piece: Piece) -> np.dtype:
        return self._dtypes[piece.tensor]

    def wide(self, piece: Piece) -> np.dtype:
        """The dtype an update of this piece is held in."""
        return self._wide[piece.tensor]

    def count(self, piece: Piece) -> int:
        """Elements in the piece."""
        return piece.length // self._dtypes[piece.tensor].itemsize

    def arrays(self, chunk: Chunk, view: memoryview) -> PieceArrays:
        """Each piece of `chunk` as a numpy array of its tensor's dtype, viewing `view` (the
        chunk's raw bytes)."""
        found = []
        for piece in self.pieces(chunk):
            dtype = self._dtypes[piece.tensor]
            count = piece.length // dtype.itemsize
            found.append((piece, np.frombuffer(view, dtype, count, offset=piece.start)))
        return found

    def wide_arrays(self, chunk: Chunk, buffer: memoryview) -> PieceArrays:
        """Each piece of `chunk` as an array of its wide dtype, one after another in `buffer`."""
        found, position = [], 0
        for piece in self.pieces(chunk):
            dtype = self._wide[piece.tensor]
            count = piece.length // self._dtypes[piece.tensor].itemsize
            found.append((piece, np.frombuffer(buffer, dtype, count, offset=position)))
            position += count * dtype.itemsize
        return found


def wide_dtype(name: str) -> np.dtype:
    """How an update of a tensor of this dtype is held: floats in their accumulator dtype."""
    dtype = numpy_dtype(name)
    return accumulator_dtype(dtype) if is_float(name) else dtype


def is_float(name: str) -> bool:
    """Whether a safetensors dtype holds floating-point values (bfloat16 included)."""
    return numpy_dtype(name).kind == "f" or name == "BF16"
