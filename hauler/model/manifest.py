"""Manifests: the names, dtypes, shapes, byte ranges and digests of a model's tensors.

A manifest is all a receiver needs to pre-size a model file and check every chunk
before it lands. Its byte layout is the safetensors layout: tensors packed in order,
contiguous, from offset 0 of the data region. Every manifest from a peer or a file
passes `Manifest.validate` before anything is allocated: the limits below are the
reasons a hostile manifest cannot make us allocate or write out of bounds.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import xxhash

from hauler.core.errors import RemoteProtocolError
from hauler.model.dtypes import numpy_dtype

MAX_TENSORS = 1 << 20  # more names than any real model; bounds the manifest's own size
MAX_NAME_BYTES = 1024  # safetensors names are module paths, never this long
MAX_DIMS = 16  # numpy's own limit is 64; no model layer needs more than a handful
MAX_MODEL_BYTES = 1 << 46  # 64 TiB: far past the seed's 128 GB, far short of overflow
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on a header
MAX_CHUNK_BYTES = 64 << 20  # one frame; the receiver's buffers are sized by it
HEADER_ALIGN = 8  # safetensors pads the JSON header to 8 bytes with spaces
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: `offset` and `length` are bytes within the model's data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int
    digest: str = ""

    @property
    def itemsize(self) -> int:
        return numpy_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Chunk:
    """A piece of one tensor as it travels: `seq` orders chunks across the whole model."""

    seq: int
    tensor: int
    offset: int
    length: int


@dataclass(frozen=True)
class Manifest:
    """The tensors of a model in file order, and the chunk size their digests use."""

    tensors: tuple[TensorEntry, ...]
    chunk_bytes: int

    @classmethod
    def build(cls, layout: Sequence[tuple[str, str, Sequence[int]]], chunk_bytes: int) -> Manifest:
        """Pack `(name, dtype, shape)` tensors one after another, as safetensors does."""
        tensors, offset = [], 0
        for name, dtype, shape in layout:
            length = math.prod(shape) * numpy_dtype(dtype).itemsize
            tensors.append(TensorEntry(name, dtype, tuple(int(d) for d in shape), offset, length))
            offset += length
        manifest = cls(tuple(tensors), chunk_bytes)
        manifest.validate()
        return manifest

    @property
    def total_bytes(self) -> int:
        return self.tensors[-1].offset + self.tensors[-1].length if self.tensors else 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(t.name, t.dtype, t.shape) for t in self.tensors]

    def same_layout(self, other: Manifest) -> bool:
        """True when both describe the same names, dtypes and shapes (digests may differ)."""
        return self.layout() == other.layout() and self.chunk_bytes == other.chunk_bytes

    def digested(self, tensor_bytes: Callable[[int], memoryview]) -> Manifest:
        """This manifest with every tensor's digest computed from `tensor_bytes(index)` (about 25
        GB/s)."""
        step = self.chunk_bytes
        return self.with_digests(
            [
                digest_of_checksums(
                    [chunk_checksum(view[o : o + step]) for o in range(0, t.length, step)]
                )
                for t, view in ((t, tensor_bytes(i)) for i, t in enumerate(self.tensors))
            ]
        )

    def with_digests(self, digests: Sequence[str]) -> Manifest:
        if len(digests) != len(self.tensors):
            raise ValueError("one digest per tensor")
        return replace(
            self, tensors=tuple(replace(t, digest=d) for t, d in zip(self.tensors, digests))
        )

    def chunks(self, start_seq: int = 0) -> Iterator[Chunk]:
        """Every chunk of the model in order, from `start_seq` on."""
        seq = 0
        for index, tensor in enumerate(self.tensors):
            count = self.chunk_count(tensor)
            if seq + count <= start_seq:
                seq += count
                continue
            for k in range(max(0, start_seq - seq), count):
                offset = k * self.chunk_bytes
                yield Chunk(seq + k, index, offset, min(self.chunk_bytes, tensor.length - offset))
            seq += count

    def chunk_count(self, tensor: TensorEntry | None = None) -> int:
        """Chunks in one tensor, or in the whole model."""
        if tensor is not None:
            return -(-tensor.length // self.chunk_bytes)
        return sum(self.chunk_count(t) for t in self.tensors)

    def safetensors_header(self) -> bytes:
        """The file's header: 8-byte little-endian length, then space-padded JSON."""
        entries = {
            t.name: {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [t.offset, t.offset + t.length],
            }
            for t in self.tensors
        }
        body = json.dumps(
            {"__metadata__": {"format": "np"}, **entries}, separators=(",", ":")
        ).encode()
        body += b" " * (-(len(body) + _U64.size) % HEADER_ALIGN)
        return _U64.pack(len(body)) + body

    def to_json(self) -> dict:
        return {
            "chunk_bytes": self.chunk_bytes,
            "tensors": [
                [t.name, t.dtype, list(t.shape), t.offset, t.length, t.digest] for t in self.tensors
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """Parse and validate a manifest received from a peer or read from disk."""
        try:
            assert isinstance(data, dict)
            rows = data["tensors"]
            assert isinstance(rows, list) and len(rows) <= MAX_TENSORS
            tensors = tuple(
                TensorEntry(str(n), str(d), tuple(s), o, length, str(g))
                for n, d, s, o, length, g in rows
            )
            manifest = cls(tensors, data["chunk_bytes"])
        except (AssertionError, KeyError, TypeError, ValueError):
            raise RemoteProtocolError(
                "malformed manifest: expected {chunk_bytes, tensors: [...]}"
            ) from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check every limit and that tensors tile the data region exactly, in order."""
        if not isinstance(self.chunk_bytes, int) or not 8 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise RemoteProtocolError(
                f"chunk_bytes {self.chunk_bytes!r} outside 8..{MAX_CHUNK_BYTES}"
            )
        if self.chunk_bytes % 8:
            raise RemoteProtocolError(
                "chunk_bytes must be a multiple of 8 so chunks hold whole elements"
            )
        if len(self.tensors) > MAX_TENSORS:
            raise RemoteProtocolError(
                f"{len(self.tensors)} tensors exceed the limit of {MAX_TENSORS}"
            )
        expected_offset, seen = 0, set()
        for tensor in self.tensors:
            _validate_tensor(tensor, expected_offset)
            if tensor.name in seen:
                raise RemoteProtocolError(f"tensor {tensor.name!r} appears twice")
            seen.add(tensor.name)
            expected_offset += tensor.length
        if expected_offset > MAX_MODEL_BYTES:
            raise RemoteProtocolError(
                f"model of {expected_offset} bytes exceeds the limit of {MAX_MODEL_BYTES}"
            )


def _validate_tensor(tensor: TensorEntry, expected_offset: int) -> None:
    name = tensor.name
    if (
        not name
        or len(name.encode()) > MAX_NAME_BYTES
        or not name.isprintable()
        or name == "__metadata__"
    ):
        raise RemoteProtocolError(f"tensor name {name[:80]!r} is empty, too long or not printable")
    itemsize = numpy_dtype(tensor.dtype).itemsize
    if len(tensor.shape) > MAX_DIMS or any(not isinstance(d, int) or d < 0 for d in tensor.shape):
        raise RemoteProtocolError(f"tensor {name!r}: shape {tensor.shape!r} is not a list of sizes")
    for value in (tensor.offset, tensor.length):
        if not isinstance(value, int) or not 0 <= value <= MAX_MODEL_BYTES:
            raise RemoteProtocolError(f"tensor {name!r}: offset or length {value!r} out of range")
    if math.prod(tensor.shape) * itemsize != tensor.length:  # Python ints: no overflow
        raise RemoteProtocolError(f"tensor {name!r}: shape x dtype is not {tensor.length} bytes")
    if tensor.offset != expected_offset:
        raise RemoteProtocolError(
            f"tensor {name!r}: offset {tensor.offset} leaves a hole or overlaps"
        )


def chunk_checksum(data: memoryview) -> int:
    """Checksum carried by every chunk frame."""
    return xxhash.xxh3_64_intdigest(data)


def digest_of_checksums(checksums: Sequence[int]) -> str:
    """A tensor's digest: xxh3-64 over its chunks' checksums, so receivers need no second pass."""
    hasher = xxhash.xxh3_64()
    for checksum in checksums:
        hasher.update(_U64.pack(checksum))
    return hasher.hexdigest()
