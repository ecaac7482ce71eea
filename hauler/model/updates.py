"""Updates: a model minus the global model it started from, chunk by chunk, and back.

A site uploads its update encoded (`encode_update`): each chunk's float pieces as the
difference from the global model, widened (model/plan.py), plus the site's residual when error
feedback is on (what the codec dropped last round, kept in a memory-mapped file beside its
model); its other pieces as they are. The server encodes the round's global delta the same
way, and both it and every site then apply a decoded delta with the one arithmetic in
`apply_delta`, so every participant holds the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from hauler.core.errors import HaulerError
from hauler.model.codecs import Codec, encode_with_feedback
from hauler.model.dtypes import dtype_name
from hauler.model.encoded import EncodedFile, EncodedWriter
from hauler.model.file import ModelFile
from hauler.model.manifest import Chunk, Manifest
from hauler.model.plan import ChunkPlan, Piece, PieceArrays, Span, is_float, wide_dtype

RESIDUAL = "residual"


class ChunkSource(Protocol):
    def chunk_views(self, chunk: Chunk) -> Sequence[memoryview]: ...


def source_arrays(
    plan: ChunkPlan, source: ChunkSource, chunk: Chunk
) -> list[tuple[Piece, np.ndarray]]:
    """Each piece of `chunk` of a model file or a script's arrays, as an array of its dtype."""
    views, pieces = source.chunk_views(chunk), plan.pieces(chunk)
    if len(views) == 1:
        return [(p, np.frombuffer(views[0], plan.dtype(p), plan.count(p), p.start)) for p in pieces]
    return [(p, np.frombuffer(v, plan.dtype(p))) for p, v in zip(pieces, views, strict=True)]


def wide_manifest(manifest: Manifest, kinds: Sequence[str]) -> Manifest:
    """A file of `kind/name` flat tensors, one per kind and float tensor of `manifest`, each of
    its wide dtype: a residual, or a server optimizer's moments."""
    rows = [
        (f"{kind}/{t.name}", dtype_name(wide_dtype(t.dtype)), (t.length // t.itemsize,))
        for kind in kinds
        for t in manifest.tensors
        if is_float(t.dtype)
    ]
    return Manifest.build(rows, manifest.chunk_bytes)


def open_residual(path: Path, manifest: Manifest) -> ModelFile:
    """The residual file of a model of `manifest` at `path`: kept while the layout holds, else
    started again from zero."""
    layout = wide_manifest(manifest, [RESIDUAL])
    if path.exists():
        try:
            residual = ModelFile.open(path, writable=True, chunk_bytes=manifest.chunk_bytes)
            if residual.manifest.same_layout(layout):
                return residual
            residual.close()
        except HaulerError:
            pass  # torn or foreign: start again
        path.unlink()
    return ModelFile.create(path, layout)


def encode_update(
    plan: ChunkPlan,
    trained: ChunkSource,
    base: ChunkSource | None,
    codec: Codec,
    path: Path,
    *,
    block_elements: int,
    residual: ModelFile | None = None,
) -> EncodedFile:
    """Encode `trained` minus `base` (or `trained` itself, already an update, if `base` is
    None) chunk by chunk into the file at `path`, with error feedback through `residual` (an
    `open_residual` file) if given; the encoded file, to send (its index names the codec and
    `block_elements`, which the receiver decodes with)."""
    writer = EncodedWriter(path, codec.name, block_elements)
    wide = memoryview(bytearray(plan.max_wide_bytes))
    encoded = memoryview(bytearray(0))
    for chunk in plan.manifest.chunks():
        values = plan.wide_arrays(chunk, wide)
        _difference(values, source_arrays(plan, trained, chunk), base, plan, chunk)
        limit = codec.max_encoded_bytes([(a.dtype, a.size) for _, a in values])
        if len(encoded) < limit:
            encoded = memoryview(bytearray(limit))
        arrays = [array for _, array in values]
        if residual is None:
            size = codec.encode(arrays, encoded)
        else:
            size = encode_with_feedback(codec, arrays, _residuals(plan, values, residual), encoded)
        writer.write(encoded[:size])
    return EncodedFile(path, writer.close())


def _difference(
    out: PieceArrays,
    trained: list[tuple[Piece, np.ndarray]],
    base: ChunkSource | None,
    plan: ChunkPlan,
    chunk: Chunk,
) -> None:
    """Each run of `out` <- its pieces of `trained` minus `base`'s (floats), or as they are."""
    wide = [part for run, array in out for _, part in run.split(array)]
    based = source_arrays(plan, base, chunk) if base is not None else None
    for index, (into, (_, values)) in enumerate(zip(wide, trained, strict=True)):
        if into.dtype.kind != "f" or based is None:
            np.copyto(into, values, casting="unsafe")
        else:
            np.subtract(values, based[index][1], out=into, dtype=into.dtype, casting="unsafe")


def _residuals(
    plan: ChunkPlan, values: PieceArrays, residual: ModelFile
) -> list[np.ndarray | None]:
    """The residual's block of each float run (None for the others)."""
    return [
        kind_block(residual, RESIDUAL, plan.manifest, run) if array.dtype.kind == "f" else None
        for run, array in values
    ]


def kind_block(model: ModelFile, kind: str, manifest: Manifest, span: Span) -> np.ndarray:
    """The block of a `wide_manifest` file (a residual, a server state) that matches a piece or
    run of a model of `manifest`: the same tensors, one kind, contiguous in the file as they are
    in the model."""
    first = manifest.tensors[span.tensor]
    entry = model.manifest.tensors[model.manifest.index[f"{kind}/{first.name}"]]
    dtype = wide_dtype(first.dtype)
    start = entry.offset + span.offset // first.itemsize * dtype.itemsize
    count = span.length // first.itemsize
    return np.frombuffer(model.region(start, count * dtype.itemsize), dtype)


def apply_delta(
    current: np.ndarray,
    delta: np.ndarray,
    scratch: memoryview,
    start: np.ndarray | None = None,
) -> None:
    """current <- current + delta for a float piece (summed in the delta's wide dtype, then
    cast), current <- delta for any other: the one arithmetic the server and every site share.
    With `start` (of current's dtype), current <- start + delta: no copy of start first."""
    if delta.dtype.kind != "f":
        np.copyto(current, delta)
        return
    total = np.frombuffer(scratch, delta.dtype, delta.size)
    np.copyto(total, current if start is None else start, casting="unsafe")
    np.add(total, delta, out=total)
    np.copyto(current, total, casting="unsafe")
