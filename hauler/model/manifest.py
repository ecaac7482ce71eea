"""Manifests: the names, dtypes, shapes, byte ranges and digests of a model's tensors.

A manifest is all a receiver needs to pre-size a model file and check every chunk
before it lands. Its byte layout is the safetensors layout: tensors packed one after
another, contiguous, from offset 0 of the data region, each at an offset that is a
multiple of its element size (safetensors orders tensors by element size for this, and
`Manifest.build` does the same), so no chunk boundary ever cuts an element.

A chunk is a byte range of the data region, not of one tensor: chunk k covers
[k x chunk_bytes, (k + 1) x chunk_bytes), whatever tensors lie there, so a model of
thousands of small tensors moves in as few chunks as one tensor of the same size. A
tensor's digest is xxh3-64 over the checksums of its pieces (its intersections with the
chunk grid), so a receiver checks it from bytes it has just landed, with no second pass.

Tensors that share storage in the training code (GPT-2's `lm_head.weight` and
`transformer.wte.weight`) are stored, sent and folded once: the manifest lists the other
names as `ties` (alias -> tensor), the safetensors header keeps them in its metadata, and
readers hand the same array out under both names.

Every manifest from a peer or a file passes `Manifest.validate` before anything is
allocated: the limits below are the reasons a hostile manifest cannot make us allocate or
write out of bounds.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from hauler.core.errors import RemoteProtocolError
from hauler.model.dtypes import numpy_dtype

# a manifest's cached properties that depend on its layout alone, not on its digests
LAYOUT_ONLY = ("index", "layout_key", "_header", "_rows")
MAX_TENSORS = 1 << 20  # more names than any real model; bounds the manifest's own size
MAX_NAME_BYTES = 1024  # safetensors names are module paths, never this long
MAX_DIMS = 16  # numpy's own limit is 64; no model layer needs more than a handful
MAX_MODEL_BYTES = 1 << 46  # 64 TiB: far past the seed's 128 GB, far short of overflow
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on a header
MAX_CHUNK_BYTES = 64 << 20  # one frame; the receiver's buffers are sized by it
HEADER_ALIGN = 8  # safetensors pads the JSON header to 8 bytes with spaces
TIES_KEY = "hauler.ties"  # the safetensors metadata entry that lists tied names
VARIATE_PREFIX = "scaffold.c/"  # SCAFFOLD's control variates (hauler.algorithms.scaffold)
MAX_DIGEST_CHARS = 64  # xxh3-64 hex digests are 16
_U64 = struct.Struct("<Q")

Layout = Sequence[tuple[str, str, Sequence[int]] | tuple[str, str, Sequence[int], str]]


class TensorEntry(NamedTuple):
    """One tensor: `offset` and `length` are bytes within the model's data region. A named
    tuple, not a frozen dataclass: a manifest of thousands is built several times a round, and
    a tuple is built in half the time."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int
    digest: str = ""

    @property
    def itemsize(self) -> int:
        return numpy_dtype(self.dtype).itemsize

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Chunk:
    """A byte range of the model's data region as it travels: chunk `seq` starts at
    `offset` = seq x chunk_bytes and may hold pieces of several tensors."""

    seq: int
    offset: int
    length: int


@dataclass(frozen=True)
class Manifest:
    """The tensors of a model in file order, the chunk size their digests use, and the names
    tied to them (alias, tensor)."""

    tensors: tuple[TensorEntry, ...]
    chunk_bytes: int
    ties: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, layout: Layout, chunk_bytes: int) -> Manifest:
        """Pack `(name, dtype, shape)` tensors one after another, widest elements first so
        every tensor is aligned (as safetensors does); a row `(name, dtype, shape, other)`
        ties `name` to tensor `other`, which must have the same dtype and shape."""
        rows = [row for row in layout if len(row) == 3]
        rows.sort(key=lambda row: -numpy_dtype(row[1]).itemsize)  # stable: order kept otherwise
        tensors, offset = [], 0
        for name, dtype, shape in rows:
            length = math.prod(shape) * numpy_dtype(dtype).itemsize
            tensors.append(TensorEntry(name, dtype, tuple(int(d) for d in shape), offset, length))
            offset += length
        manifest = cls(tuple(tensors), chunk_bytes, _ties_of(layout, tensors))
        manifest.validate()
        return manifest

    @property
    def total_bytes(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def names(self) -> list[str]:
        """The stored tensors' names (tied aliases are not among them)."""
        return [t.name for t in self.tensors]

    def layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(t.name, t.dtype, t.shape) for t in self.tensors]

    def same_layout(self, other: Manifest) -> bool:
        """True when both describe the same names, dtypes, shapes and ties (digests may differ)."""
        return self is other or self.layout_key == other.layout_key

    @functools.cached_property
    def _rows(self) -> list[list]:
        """Each tensor's JSON row without its digest, made once per layout, for comparisons
        only (never handed out: it is mutable)."""
        return [[t.name, t.dtype, list(t.shape), t.offset, t.length] for t in self.tensors]

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Each stored tensor's position, by name (computed once per manifest)."""
        return {tensor.name: position for position, tensor in enumerate(self.tensors)}

    @functools.cached_property
    def layout_key(self) -> tuple:
        """What `same_layout` compares, computed once per manifest (a model may have thousands
        of tensors, and every round compares several manifests)."""
        return (tuple(self.layout()), self.ties, self.chunk_bytes)

    def tensor_pieces(self, tensor: TensorEntry) -> list[tuple[int, int]]:
        """(start, length) within `tensor` of each of its pieces: its parts in successive chunks."""
        size, end = self.chunk_bytes, tensor.end
        if tensor.length and tensor.offset // size == (end - 1) // size:
            return [(0, tensor.length)]  # within one chunk, as a small tensor mostly is
        first = min(end, (tensor.offset // size + 1) * size)
        cuts = (
            [tensor.offset, *range(first, end, size), end] if first < end else [tensor.offset, end]
        )
        return [(a - tensor.offset, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]

    def digested(self, tensor_bytes: Callable[[int], memoryview]) -> Manifest:
        """This manifest with every tensor's digest computed from `tensor_bytes(index)` (about
        25 GB/s)."""
        digests = []
        for index, tensor in enumerate(self.tensors):
            view = tensor_bytes(index)
            checksums = [chunk_checksum(view[s : s + n]) for s, n in self.tensor_pieces(tensor)]
            digests.append(digest_of_checksums(checksums))
        return self.with_digests(digests)

    def with_digests(self, digests: Sequence[str]) -> Manifest:
        if len(digests) != len(self.tensors):
            raise ValueError("one digest per tensor")
        tensors = tuple(
            TensorEntry(t.name, t.dtype, t.shape, t.offset, t.length, d)
            for t, d in zip(self.tensors, digests)
        )
        manifest = Manifest(tensors, self.chunk_bytes, self.ties)
        for name in LAYOUT_ONLY:  # the same layout: what depends on it alone is not made again
            if name in self.__dict__:
                manifest.__dict__[name] = self.__dict__[name]
        return manifest

    def like(self, data: object) -> Manifest:
        """A peer's manifest (JSON) that should have this one's layout: rows compared as they
        are and only the digests taken, so a model of thousands of tensors is not parsed and
        validated anew each round; any other JSON is parsed and validated in full."""
        rows = data.get("tensors") if isinstance(data, dict) else None
        if (
            isinstance(data, dict)
            and data.get("chunk_bytes") == self.chunk_bytes
            and data.get("ties", []) == [list(tie) for tie in self.ties]
            and isinstance(rows, list)
            and len(rows) == len(self._rows)
            and all(
                isinstance(row, list) and row[:5] == own and _is_digest(row[5:])
                for row, own in zip(rows, self._rows)
            )
        ):
            return self.with_digests([row[5] for row in rows])
        return Manifest.from_json(data)

    @property
    def digest(self) -> str:
        """One digest of the whole model: its chunk size, layout (the safetensors header, made
        once per layout: it begins with its length) and every tensor's digest (which must be
        set), without serializing the whole manifest each time."""
        digests = json.dumps([t.digest for t in self.tensors]).encode()
        return xxhash.xxh3_128_hexdigest(b"%d\n%b%b" % (self.chunk_bytes, self._header, digests))

    def chunks(self, start_seq: int = 0) -> Iterator[Chunk]:
        """Every chunk of the model in order, from `start_seq` on."""
        for seq in range(start_seq, self.chunk_count()):
            offset = seq * self.chunk_bytes
            yield Chunk(seq, offset, min(self.chunk_bytes, self.total_bytes - offset))

    def chunk_count(self) -> int:
        """Chunks in the whole model."""
        return -(-self.total_bytes // self.chunk_bytes)

    def safetensors_header(self) -> bytes:
        """The file's header: 8-byte little-endian length, then space-padded JSON (made once
        per manifest)."""
        return self._header

    @functools.cached_property
    def _header(self) -> bytes:
        entries = {
            t.name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.offset, t.end]}
            for t in self.tensors
        }
        metadata = {"format": "np", **({TIES_KEY: json.dumps(self.ties)} if self.ties else {})}
        body = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
        body += b" " * (-(len(body) + _U64.size) % HEADER_ALIGN)
        return _U64.pack(len(body)) + body

    def to_json(self) -> dict:
        rows = [
            [t.name, t.dtype, list(t.shape), t.offset, t.length, t.digest] for t in self.tensors
        ]
        ties = {"ties": [list(tie) for tie in self.ties]} if self.ties else {}
        return {"chunk_bytes": self.chunk_bytes, "tensors": rows, **ties}

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """Parse and validate a manifest received from a peer or read from disk."""
        try:
            assert isinstance(data, dict)
            rows, ties = data["tensors"], data.get("ties", [])
            assert isinstance(rows, list) and len(rows) <= MAX_TENSORS
            assert isinstance(ties, list) and len(ties) <= MAX_TENSORS
            tensors = tuple(
                TensorEntry(str(n), str(d), tuple(s), o, length, str(g))
                for n, d, s, o, length, g in rows
            )
            manifest = cls(tensors, data["chunk_bytes"], tuple((str(a), str(b)) for a, b in ties))
        except (AssertionError, KeyError, TypeError, ValueError):
            raise RemoteProtocolError(
                "malformed manifest: expected {chunk_bytes, tensors: [...], ties: [...]}"
            ) from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check every limit, that tensors tile the data region exactly, in order, each aligned
        to its element size, and that every tie names a tensor of the model."""
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
        _validate_ties(self.ties, seen)


def _ties_of(layout: Layout, tensors: list[TensorEntry]) -> tuple[tuple[str, str], ...]:
    """The (alias, tensor) rows of a layout, each of the same dtype and shape as its tensor."""
    by_name = {t.name: t for t in tensors}
    ties = []
    for row in layout:
        if len(row) == 4:
            name, dtype, shape, other = row
            target = by_name.get(other)
            if target is None or (dtype, tuple(shape)) != (target.dtype, target.shape):
                raise RemoteProtocolError(
                    f"tensor {name!r} is tied to {other!r}, which is not a tensor of the same "
                    "dtype and shape in the layout"
                )
            ties.append((name, other))
    return tuple(ties)


def _validate_name(name: str) -> None:
    if (
        not name
        or len(name.encode()) > MAX_NAME_BYTES
        or not name.isprintable()
        or name == "__metadata__"
    ):
        raise RemoteProtocolError(f"tensor name {name[:80]!r} is empty, too long or not printable")


def _validate_tensor(tensor: TensorEntry, expected_offset: int) -> None:
    name = tensor.name
    _validate_name(name)
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
    if tensor.offset % itemsize:
        raise RemoteProtocolError(
            f"tensor {name!r} starts at byte {tensor.offset}, not a multiple of its element size "
            f"{itemsize}; save the model with safetensors, which aligns every tensor"
        )


def _validate_ties(ties: tuple[tuple[str, str], ...], tensors: set[str]) -> None:
    """Each alias a new valid name, each tied to a stored tensor."""
    aliases: set[str] = set()
    for alias, target in ties:
        _validate_name(alias)
        if alias in tensors or alias in aliases:
            raise RemoteProtocolError(f"tied name {alias!r} appears twice")
        if target not in tensors:
            raise RemoteProtocolError(f"{alias!r} is tied to {target!r}, which is not a tensor")
        aliases.add(alias)


def _is_digest(rest: list) -> bool:
    """The tail of a manifest row: exactly one digest, a short string."""
    return len(rest) == 1 and isinstance(rest[0], str) and len(rest[0]) <= MAX_DIGEST_CHARS


def chunk_checksum(data: memoryview) -> int:
    """Checksum carried by every chunk frame."""
    return xxhash.xxh3_64_intdigest(data)


def digest_of_checksums(checksums: Sequence[int]) -> str:
    """A tensor's digest: xxh3-64 over its pieces' checksums (little-endian u64 each), so
    receivers need no second pass."""
    if len(checksums) == 1:  # a tensor within one chunk: most of a model of small tensors
        return xxhash.xxh3_64_hexdigest(_U64.pack(checksums[0]))
    return xxhash.xxh3_64_hexdigest(struct.pack(f"<{len(checksums)}Q", *checksums))
