"""The interface every codec implements, and what the codecs share.

`Codec` is the interface: a chunk's pieces into a caller's buffer, and back into the caller's
arrays. `Scratch` holds each instance's reused buffers, so nothing on the hot path allocates
and an instance belongs to one lane or worker thread. `FixedCodec` is the frame of every codec
whose output size follows from the pieces (all but zstd): a header, the codes of the float
pieces, then the raw pieces. `encode_with_feedback` works with any codec. The encoded formats
and error bounds are summarised in the package docstring (`hauler/model/codecs/__init__.py`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from hauler.core.errors import LocalProtocolError, RemoteProtocolError

FLOATS = (np.dtype("<f8"), np.dtype("<f4"))  # the coded dtypes, in the order of their sections
CODED = frozenset(FLOATS)
BYTES = np.dtype(np.uint8)

Spec = tuple[np.dtype, int]  # a piece's dtype and element count


class Scratch:
    """Named buffers reused across calls and grown, never shrunk: fresh memory costs about
    10 us per 4 KiB page on our machines, so nothing on the hot path allocates per chunk."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, dtype: np.dtype | type, count: int) -> np.ndarray:
        """A 1-D array of `count` elements of `dtype`, in the buffer called `name`."""
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < nbytes:
            grown = max(nbytes, 2 * buffer.size if buffer is not None else 0, 64)
            buffer = self._buffers[name] = np.empty(grown, BYTES)
        return buffer[:nbytes].view(dtype)


class Codec(abc.ABC):
    """Encodes a chunk's pieces into a caller's buffer, and decodes them into caller's arrays."""

    name: str
    lossy: bool

    def __init__(self) -> None:
        self.scratch = Scratch()

    def coded(self, dtype: np.dtype, size: int) -> bool:
        """Whether a piece of this dtype and size is encoded (else its raw bytes travel)."""
        return dtype in CODED

    @abc.abstractmethod
    def max_encoded_bytes(self, pieces: Sequence[Spec]) -> int:
        """Upper bound of encode()'s output for pieces of these dtypes and element counts (the
        receiver sizes its buffer with it and refuses longer frames)."""

    @abc.abstractmethod
    def encode(self, pieces: Sequence[np.ndarray], out: memoryview) -> int:
        """Encode the pieces into `out` (at least max_encoded_bytes long); the bytes written."""

    @abc.abstractmethod
    def decode(self, data: memoryview, pieces: Sequence[np.ndarray]) -> None:
        """Decode a peer's `data` into the pieces (the dtypes and sizes that were encoded).
        Malformed data raises RemoteProtocolError; nothing beyond the pieces' size is
        allocated."""

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        """The largest |x - x^| allowed for each of a piece's finite values (for tests)."""
        return np.zeros(values.size)

    def _split(self, pieces: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The pieces as flat arrays: those encoded, and those that travel raw, in order."""
        coded, raw = [], []
        for piece in pieces:
            if not piece.flags.c_contiguous:
                raise LocalProtocolError("codec pieces must be contiguous arrays")
            flat = piece.reshape(-1)
            (coded if self.coded(flat.dtype, flat.size) else raw).append(flat)
        return coded, raw


def encode_with_feedback(
    codec: Codec,
    pieces: Sequence[np.ndarray],
    residuals: Sequence[np.ndarray | None],
    out: memoryview,
) -> int:
    """Encode pieces plus residuals into `out`, and keep what the codec dropped as the next
    residuals; returns the bytes written.

    Error feedback (EF-SGD; DiLoCo-style compressed pseudo-gradients): each encoded piece's
    target is piece + residual; the targets are encoded, then decoded, and each residual
    becomes target - decoded, in place. What quantisation drops is sent in a later round
    instead of lost: over any number of rounds, the sum of the decoded pieces differs from the
    sum of the true pieces by minus the last residual only. A piece whose residual is None
    (every non-float piece; a float piece sent without feedback) is encoded as it is, and a
    piece the codec sends raw leaves its residual alone. A non-finite residual element is reset
    to zero (the non-finite value itself has been sent, and is refused), so one bad round
    cannot poison every later one."""
    targets, fed = [], []
    for piece, residual in zip(pieces, residuals, strict=True):
        if residual is not None and codec.coded(piece.dtype, piece.size):
            if residual.dtype != piece.dtype or residual.size != piece.size:
                raise LocalProtocolError("a residual must have its piece's dtype and size")
            np.add(residual, piece.reshape(residual.shape), out=residual)
            piece = residual
            fed.append(len(targets))
        targets.append(piece)
    written = codec.encode(targets, out)
    decoded = _arrays_like(codec.scratch, targets)
    codec.decode(out[:written], decoded)
    for index in fed:
        flat = targets[index].reshape(-1)
        np.subtract(flat, decoded[index], out=flat)
        if not _finite(flat):
            flat[~np.isfinite(flat)] = 0
    return written


def _arrays_like(scratch: Scratch, pieces: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Flat arrays of the pieces' dtypes and sizes, in one scratch buffer, each 8-aligned."""
    spans = [-(-piece.nbytes // 8) * 8 for piece in pieces]
    buffer, offset, arrays = scratch.array("like", BYTES, sum(spans)), 0, []
    for piece, span in zip(pieces, spans):
        arrays.append(buffer[offset : offset + piece.nbytes].view(piece.dtype))
        offset += span
    return arrays


def _finite(values: np.ndarray) -> bool:
    """Whether every value is finite, by two fast reductions (NaN propagates through them)."""
    return not values.size or bool(np.isfinite(values.max()) and np.isfinite(values.min()))


class FixedCodec(Codec):
    """A codec whose output size follows from the pieces: a header (int8/int4: lows and steps),
    the codes of the encoded pieces in order, then the raw pieces in order."""

    def _sizes(self, coded: Sequence[Spec], raw_bytes: int) -> tuple[int, int, int]:
        """Bytes of the header, of the codes and of the raw pieces."""
        return self._header_bytes(coded), self._code_bytes(coded), raw_bytes

    def _header_bytes(self, coded: Sequence[Spec]) -> int:
        return 0

    @abc.abstractmethod
    def _code_bytes(self, coded: Sequence[Spec]) -> int:
        """Bytes of the codes of these encoded pieces."""

    def max_encoded_bytes(self, pieces: Sequence[Spec]) -> int:
        specs = [(np.dtype(dtype), size) for dtype, size in pieces]
        coded = [(dtype, size) for dtype, size in specs if self.coded(dtype, size)]
        raw = sum(size * dtype.itemsize for dtype, size in specs if not self.coded(dtype, size))
        return sum(self._sizes(coded, raw))

    def _layout(self, pieces: Sequence[np.ndarray]) -> tuple[list[np.ndarray], ...]:
        coded, raw = self._split(pieces)
        header, codes, raw_bytes = self._sizes(
            [(p.dtype, p.size) for p in coded], sum(p.nbytes for p in raw)
        )
        return coded, raw, (header, header + codes, header + codes + raw_bytes)

    def encode(self, pieces: Sequence[np.ndarray], out: memoryview) -> int:
        coded, raw, (header, codes_end, total) = self._layout(pieces)
        if len(out) < total:
            raise LocalProtocolError(f"codec output buffer of {len(out)} bytes, {total} needed")
        buffer = np.frombuffer(out, BYTES, total)
        with np.errstate(all="ignore"):
            self._encode(coded, buffer[:codes_end], header)
        gather_bytes(raw, buffer[codes_end:])
        return total

    def decode(self, data: memoryview, pieces: Sequence[np.ndarray]) -> None:
        coded, raw, (header, codes_end, total) = self._layout(pieces)
        if len(data) != total:
            raise RemoteProtocolError(
                f"{self.name} chunk of {len(data)} bytes where its pieces make {total}; "
                "close the connection"
            )
        buffer = np.frombuffer(data, BYTES)
        with np.errstate(all="ignore"):
            self._decode(buffer[:codes_end], header, coded)
        scatter_bytes(buffer[codes_end:], raw)

    @abc.abstractmethod
    def _encode(self, coded: list[np.ndarray], out: np.ndarray, header: int) -> None:
        """Write the header and the codes of the encoded pieces into `out` (bytes)."""

    @abc.abstractmethod
    def _decode(self, data: np.ndarray, header: int, coded: list[np.ndarray]) -> None:
        """Decode header and codes (bytes, of the right length) into the encoded pieces."""


def gather_bytes(pieces: Sequence[np.ndarray], out: np.ndarray) -> None:
    """Copy the pieces' bytes one after another into `out` (exactly their total size)."""
    if pieces:
        np.concatenate([piece.view(BYTES) for piece in pieces], out=out)


def scatter_bytes(data: np.ndarray, pieces: Sequence[np.ndarray]) -> None:
    """Copy consecutive byte ranges of `data` into the pieces, in order."""
    offset = 0
    for piece in pieces:
        piece.view(BYTES)[...] = data[offset : offset + piece.nbytes]
        offset += piece.nbytes
