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
from hauler.model.plan import ChunkPlan, PieceArrays, is_float, wide_dtype

RESIDUAL = "residual"


class ChunkSource(Protocol):
    def chunk_views(self, chunk: Chunk) -> Sequence[memoryview]: ...


def source_arrays(plan: ChunkPlan, source: ChunkSource, chunk: Chunk) -> PieceArrays:
    """Each piece of `chunk` of a model file or a script's arrays, as an array of its dtype."""
    views = source.chunk_views(chunk)
    if len(views) == 1:
        return plan.arrays(chunk, views[0])
    pieces = plan.pieces(chunk)
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
    out: PieceArrays, trained: PieceArrays, base: ChunkSource | None, plan: ChunkPlan, chunk: Chunk
) -> None:
    based = source_arrays(plan, base, chunk) if base is not None else None
    for index, ((_, wide), (_, values)) in enumerate(zip(out, trained, strict=True)):
        if wide.dtype.kind != "f" or based is None:
            np.copyto(wide, values, casting="unsafe")
        else:
            np.subtract(values, based[index][1], out=wide, dtype=wide.dtype, casting="unsafe")


def _residuals(
    plan: ChunkPlan, values: PieceArrays, residual: ModelFile
) -> list[np.ndarray | None]:
    """The residual's block of each float piece (None for the others)."""
    index = {t.name: i for i, t in enumerate(residual.manifest.tensors)}
    found: list[np.ndarray | None] = []
    for piece, array in values:
        tensor = plan.manifest.tensors[piece.tensor]
        name = f"{RESIDUAL}/{tensor.name}"
        if array.dtype.kind != "f" or name not in index:
            found.append(None)
            continue
        start = piece.offset // tensor.itemsize
        found.append(residual.array(index[name]).reshape(-1)[start : start + array.size])
    return found


def apply_delta(current: np.ndarray, delta: np.ndarray, scratch: memoryview) -> None:
    """current <- current + delta for a float piece (summed in the delta's wide dtype, then
    cast), current <- delta for any other: the one arithmetic the server and every site share."""
    if delta.dtype.kind != "f":
        np.copyto(current, delta)
        return
    total = np.frombuffer(scratch, delta.dtype, delta.size)
    np.copyto(total, current, casting="unsafe")
    np.add(total, delta, out=total)
    np.copyto(current, total, casting="unsafe")
