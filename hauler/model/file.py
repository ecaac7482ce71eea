"""Model files: safetensors on disk, seen through one memory map.

A `ModelFile` is pre-sized once (so a full disk fails now, not as SIGBUS later),
then written in place chunk by chunk and read back as numpy views of the mapping:
a model never has to fit in anonymous memory. Files are reused rather than
recreated, because fresh pages are the expensive ones (DESIGN.md, "Ids and files").
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from hauler.core.errors import ConfigError, RemoteProtocolError
from hauler.model.dtypes import numpy_dtype
from hauler.model.manifest import MAX_HEADER_BYTES, TIES_KEY, Chunk, Manifest

_U64 = struct.Struct("<Q")


class FileMapping:
    """A file's bytes mapped into memory (nothing for an empty file), as one memoryview."""

    def __init__(self, fd: int, size: int, *, writable: bool = False) -> None:
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        self.mmap = mmap.mmap(fd, size, access=access) if size else None
        self.buffer = memoryview(self.mmap) if self.mmap is not None else memoryview(b"")

    def flush(self) -> None:
        if self.mmap is not None:
            self.mmap.flush()

    def close(self) -> None:
        """Release the mapping, once no view handed out still holds it (else the GC closes it
        with the last view)."""
        self.buffer.release()
        if self.mmap is not None:
            with contextlib.suppress(BufferError):
                self.mmap.close()


class ModelFile:
    """A safetensors file mapped into memory; tensors are views, never copies."""

    def __init__(self, path: Path, manifest: Manifest, *, data_start: int, writable: bool) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.data_start = data_start
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        size = self.data_start + manifest.total_bytes
        self._mapping = FileMapping(self._fd, size, writable=writable)
        self._buffer = self._mapping.buffer
        self.writable = writable
        self._views: tuple[tuple, dict[str, np.ndarray]] | None = None

    @classmethod
    def create(cls, path: Path, manifest: Manifest, *, reuse: Path | None = None) -> ModelFile:
        """A writable file for `manifest`, pre-sized on disk.

        An existing file at `path` (or at `reuse`, renamed to `path`) of the same size
        is overwritten in place, so its pages in the page cache are reused.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if reuse is not None and Path(reuse).exists() and not path.exists():
            os.replace(reuse, path)
        header = manifest.safetensors_header()
        size = len(header) + manifest.total_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)
                _preallocate(fd, size, path)
            os.pwrite(fd, header, 0)
        finally:
            os.close(fd)
        return cls(path, manifest, data_start=len(header), writable=True)

    @classmethod
    def open(cls, path: Path, *, writable: bool = False, chunk_bytes: int = 4 << 20) -> ModelFile:
        """Open an existing safetensors file, validating its header before mapping it."""
        manifest, data_start = read_manifest(Path(path), chunk_bytes)
        return cls(path, manifest, data_start=data_start, writable=writable)

    def tensor_bytes(self, index: int) -> memoryview:
        """The bytes of tensor `index` as a view of the mapping."""
        tensor = self.manifest.tensors[index]
        start = self.data_start + tensor.offset
        return self._buffer[start : start + tensor.length]

    def chunk_view(self, chunk: Chunk) -> memoryview:
        """A chunk (a byte range of the data region) as a view of the mapping."""
        return self.region(chunk.offset, chunk.length)

    def region(self, offset: int, length: int) -> memoryview:
        """Bytes [offset, offset + length) of the data region, as a view of the mapping."""
        start = self.data_start + offset
        return self._buffer[start : start + length]

    def chunk_views(self, chunk: Chunk) -> list[memoryview]:
        """What a sender writes for `chunk`: one view of the mapping."""
        return [self.chunk_view(chunk)]

    def payload_bytes(self, chunk: Chunk) -> int:
        """A raw chunk weighs its length on the wire."""
        return chunk.length

    def array(self, index: int) -> np.ndarray:
        """Tensor `index` as a numpy array viewing the file."""
        tensor = self.manifest.tensors[index]
        dtype = numpy_dtype(tensor.dtype)
        if tensor.length == 0:
            return np.zeros(tensor.shape, dtype)
        flat = np.frombuffer(
            self._mapping.mmap,
            dtype=dtype,
            count=tensor.length // dtype.itemsize,
            offset=self.data_start + tensor.offset,
        )
        return flat.reshape(tensor.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor as a numpy view, by name, tied names viewing their tensor's memory;
        writes go to the file when writable. The views are made once (a model may have
        thousands of tensors) and handed out in a new dict each call."""
        if self._views is None or self._views[0] != self.manifest.layout_key:
            arrays = {t.name: self.array(i) for i, t in enumerate(self.manifest.tensors)}
            arrays |= {alias: arrays[target] for alias, target in self.manifest.ties}
            self._views = (self.manifest.layout_key, arrays)
        return dict(self._views[1])

    def copy_from(self, source: ModelFile) -> None:
        """Copy `source`'s data (the same layout) into this file chunk by chunk: file pages,
        no model-sized temporary."""
        for chunk in source.manifest.chunks():
            into = np.frombuffer(self.chunk_view(chunk), np.uint8)
            np.copyto(into, np.frombuffer(source.chunk_view(chunk), np.uint8))

    def compute_digests(self) -> Manifest:
        """Hash every chunk (about 25 GB/s) and return the manifest with tensor digests."""
        self.manifest = self.manifest.digested(self.tensor_bytes)
        return self.manifest

    def flush(self) -> None:
        """Push written pages towards the disk (msync); the kernel may do it later anyway."""
        if self.writable:
            self._mapping.flush()

    def close(self) -> None:
        """Release the mapping (once; again is a no-op). Views handed out earlier must not be
        used afterwards."""
        if self._fd < 0:
            return
        self._views = None
        self._mapping.close()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _preallocate(fd: int, size: int, path: Path) -> None:
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot reserve {size} bytes on disk ({error.strerror}); free space"
        ) from None


def read_manifest(path: Path, chunk_bytes: int) -> tuple[Manifest, int]:
    """The manifest of any safetensors file and where its data starts, checked against its size."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise RemoteProtocolError(f"{path}: too short to be a safetensors file")
            (header_len,) = _U64.unpack(prefix)
            size = os.fstat(handle.fileno()).st_size
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise RemoteProtocolError(
                    f"{path}: header of {header_len} bytes exceeds the file or {MAX_HEADER_BYTES}"
                )
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as error:
        raise RemoteProtocolError(f"{path}: not a readable safetensors file ({error})") from None
    manifest = _manifest_from_header(header, chunk_bytes, path)
    data_start = 8 + header_len
    if data_start + manifest.total_bytes != size:
        raise RemoteProtocolError(
            f"{path}: {size} bytes, but its header describes {data_start + manifest.total_bytes}"
        )
    return manifest, data_start


def _manifest_from_header(header: object, chunk_bytes: int, path: Path) -> Manifest:
    if not isinstance(header, dict):
        raise RemoteProtocolError(f"{path}: header is not a JSON object")
    rows = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            rows.append([name, entry["dtype"], entry["shape"], begin, end - begin, ""])
        except (KeyError, TypeError, ValueError):
            raise RemoteProtocolError(f"{path}: tensor {name!r} has a malformed entry") from None
    rows.sort(
        key=lambda row: (
            (row[3], row[4]) if isinstance(row[3], int) and isinstance(row[4], int) else (-1, -1)
        )
    )
    ties = _ties_from_metadata(header.get("__metadata__"), path)
    return Manifest.from_json({"chunk_bytes": chunk_bytes, "tensors": rows, "ties": ties})


def _ties_from_metadata(metadata: object, path: Path) -> list:
    """The tied names a Hauler-written file lists in its metadata (none in other files)."""
    if not isinstance(metadata, dict) or TIES_KEY not in metadata:
        return []
    try:
        ties = json.loads(metadata[TIES_KEY])
    except (TypeError, ValueError):
        raise RemoteProtocolError(f"{path}: metadata {TIES_KEY!r} is not a JSON list") from None
    if not isinstance(ties, list) or not all(isinstance(t, list) and len(t) == 2 for t in ties):
        raise RemoteProtocolError(f"{path}: metadata {TIES_KEY!r} is not a list of name pairs")
    return ties
