"""Encoded models on disk: one chunk after another, each as its codec wrote it.

An encoded update (a site's upload) or global delta (a round's download, encoded once and
served to every site) is written chunk by chunk by an `EncodedWriter` and read back, a view
per chunk, by an `EncodedFile`, which the data plane sends from like any model file. Its
`EncodedIndex` (codec, each chunk's length, and the digest of the chunks' checksums) travels in
the control messages, so a receiver bounds every frame and checks the whole stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

from hauler.core.errors import RemoteProtocolError
from hauler.model.file import FileMapping
from hauler.model.manifest import Chunk, chunk_checksum, digest_of_checksums
from hauler.model.plan import ChunkPlan

if TYPE_CHECKING:
    from hauler.model.codecs import Codec

MAX_CODEC_NAME = 16


@dataclass(frozen=True)
class EncodedIndex:
    """How a model was encoded: the codec and its block size, each chunk's length, the digest
    of the chunks' checksums (what the receiver's ledger checks at the end), and, for a delta,
    the digest of the model it applies to."""

    codec: str
    block_elements: int
    lengths: tuple[int, ...]
    digest: str
    base: str = ""

    def to_json(self) -> dict:
        return {
            "codec": self.codec,
            "block_elements": self.block_elements,
            "lengths": list(self.lengths),
            "digest": self.digest,
            "base": self.base,
        }

    @classmethod
    def from_json(cls, data: object, chunks: int) -> EncodedIndex:
        """Parse an index received from a peer or read from disk, for a model of `chunks`."""
        try:
            assert isinstance(data, dict)
            codec, block, lengths, digest = (
                data["codec"],
                data["block_elements"],
                data["lengths"],
                data["digest"],
            )
            assert isinstance(codec, str) and 0 < len(codec) <= MAX_CODEC_NAME
            assert type(block) is int and block > 0 and isinstance(digest, str)
            assert isinstance(lengths, list) and len(lengths) == chunks
            assert all(type(n) is int and n >= 0 for n in lengths)
            base = data.get("base", "")
            assert isinstance(base, str)
        except (AssertionError, KeyError, TypeError):
            raise RemoteProtocolError(
                f"malformed encoding: expected codec, block_elements, {chunks} lengths, digest"
            ) from None
        return cls(codec, block, tuple(lengths), digest, base)


class EncodedWriter:
    """Writes encoded chunks, in plan order, into one file (overwritten in place if it is
    there, so a reused file's pages are reused)."""

    def __init__(self, path: Path, codec: str, block_elements: int) -> None:
        self.path, self.codec, self.block_elements = Path(path), codec, block_elements
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._lengths: list[int] = []
        self._checksums: list[int] = []
        self._position = 0

    def write(self, encoded: memoryview) -> None:
        """Append the next chunk's encoding."""
        os.pwrite(self._fd, encoded, self._position)
        self._position += len(encoded)
        self._lengths.append(len(encoded))
        self._checksums.append(chunk_checksum(encoded))

    def close(self) -> EncodedIndex:
        """Trim the file to what was written; its index."""
        os.ftruncate(self._fd, self._position)
        os.close(self._fd)
        digest = digest_of_checksums(self._checksums)
        return EncodedIndex(self.codec, self.block_elements, tuple(self._lengths), digest)


class EncodedFile:
    """An encoded model to send: the view of each chunk's encoding, by its sequence number."""

    def __init__(self, path: Path, index: EncodedIndex) -> None:
        self.path, self.index = Path(path), index
        self._starts = [0, *accumulate(index.lengths)]
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != self._starts[-1]:
                raise RemoteProtocolError(
                    f"{path}: {size} bytes, its index says {self._starts[-1]}"
                )
            self._mapping = FileMapping(handle.fileno(), size)
        self._buffer = self._mapping.buffer

    def chunk_views(self, chunk: Chunk) -> list[memoryview]:
        return [self._buffer[self._starts[chunk.seq] : self._starts[chunk.seq + 1]]]

    def payload_bytes(self, chunk: Chunk) -> int:
        return self.index.lengths[chunk.seq]

    @property
    def total_bytes(self) -> int:
        return self._starts[-1]

    def close(self) -> None:
        """Release the mapping (once views handed out are gone, if some still are)."""
        self._mapping.close()


def encoded_limit(codec: Codec, plan: ChunkPlan) -> Callable[[Chunk], int]:
    """The most bytes `codec` may make of each chunk of `plan` (its runs, widened): what a
    receiver allows a frame and sizes its buffer by."""

    def limit(chunk: Chunk) -> int:
        runs = plan.runs(chunk)
        return codec.max_encoded_bytes([(plan.wide(run), plan.count(run)) for run in runs])

    return limit
