"""Models as named tensors plus a manifest: safetensors files, memory-mapped views, chunks,
and the codecs that encode updates chunk by chunk."""

from hauler.model.arrays import ArraySource, check_layout
from hauler.model.dtypes import DTYPES, accumulator_dtype, dtype_name, numpy_dtype
from hauler.model.file import ModelFile, read_manifest
from hauler.model.manifest import (
    VARIATE_PREFIX,
    Chunk,
    Manifest,
    TensorEntry,
    chunk_checksum,
)
from hauler.model.plan import ChunkPlan, Piece, Run, Span, is_float, wide_dtype

__all__ = [
    "DTYPES",
    "VARIATE_PREFIX",
    "ArraySource",
    "Chunk",
    "ChunkPlan",
    "Manifest",
    "ModelFile",
    "Piece",
    "Run",
    "Span",
    "TensorEntry",
    "accumulator_dtype",
    "check_layout",
    "chunk_checksum",
    "dtype_name",
    "is_float",
    "numpy_dtype",
    "read_manifest",
    "wide_dtype",
]
