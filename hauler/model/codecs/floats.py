"""`none`, `bf16` and `fp16`: float pieces as codes of a fixed width, piece after piece.

`none` sends a float piece's own bytes; `bf16` and `fp16` send one 16-bit code an element, with
no header, so the output size follows from the pieces alone. Both go through float32, run by
run (at most `STRIP_ELEMENTS` elements, across small pieces), so a chunk of many small pieces
costs few numpy calls. bf16 rounds with ml_dtypes; fp16 is done with whole-array bit
arithmetic and a decoding table, because numpy's own float16 casts go one element at a time.
Formats and error bounds: the package docstring.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from functools import cache

import ml_dtypes
import numpy as np

from hauler.model import codecs  # STRIP_ELEMENTS is read from the package at call time
from hauler.model.codecs.base import FixedCodec, Scratch, Spec, gather_bytes, scatter_bytes

_HALF_LARGEST_BITS = 0x477FE000  # 65504.0 as float32 bits
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _runs(pieces: Sequence[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """The pieces' elements in order, cut into runs of at most codecs.STRIP_ELEMENTS: each run is a
    list of slices of consecutive pieces (a strip of one large piece, or several small ones)."""
    run: list[np.ndarray] = []
    room = step = codecs.STRIP_ELEMENTS
    for piece in pieces:
        start = 0
        while start < piece.size:
            part = piece[start : start + room]
            run.append(part)
            start, room = start + part.size, room - part.size
            if not room:
                yield run
                run, room = [], step
    if run:
        yield run


class RawCodec(FixedCodec):
    """`none`: float pieces travel as their own bytes."""

    name, lossy = "none", False

    def _code_bytes(self, coded: Sequence[Spec]) -> int:
        return sum(size * dtype.itemsize for dtype, size in coded)

    def _encode(self, coded: list[np.ndarray], out: np.ndarray, header: int) -> None:
        gather_bytes(coded, out)

    def _decode(self, data: np.ndarray, header: int, coded: list[np.ndarray]) -> None:
        scatter_bytes(data, coded)


class _TwoByteCodec(FixedCodec):
    """Float pieces as one 16-bit code per element, piece after piece. Encoding goes run by
    run (_runs), through float32, so a chunk of many small pieces costs few numpy calls."""

    def _code_bytes(self, coded: Sequence[Spec]) -> int:
        return sum(2 * size for _, size in coded)

    def _encode(self, coded: list[np.ndarray], out: np.ndarray, header: int) -> None:
        codes, offset = out.view(np.uint16), 0
        for run in _runs(coded):
            count = sum(part.size for part in run)
            if len(run) == 1 and run[0].dtype == np.float32:
                values = run[0]
            else:
                values = self.scratch.array("run", np.float32, count)
                np.concatenate(run, out=values, casting="unsafe")
            self._to_codes(values, codes[offset : offset + count])
            offset += count

    def _decode(self, data: np.ndarray, header: int, coded: list[np.ndarray]) -> None:
        codes, offset = data.view(np.uint16), 0
        for piece in coded:
            self._from_codes(codes[offset : offset + piece.size], piece)
            offset += piece.size

    @abc.abstractmethod
    def _to_codes(self, values: np.ndarray, codes: np.ndarray) -> None:
        """Encode float32 values into as many 16-bit codes."""

    @abc.abstractmethod
    def _from_codes(self, codes: np.ndarray, piece: np.ndarray) -> None:
        """Decode 16-bit codes into a piece of as many elements."""


class BFloat16Codec(_TwoByteCodec):
    """`bf16`: bfloat16, rounded to nearest even by ml_dtypes (several GB/s)."""

    name, lossy = "bf16", True

    def _to_codes(self, values: np.ndarray, codes: np.ndarray) -> None:
        np.copyto(codes.view(_BF16), values, casting="unsafe")

    def _from_codes(self, codes: np.ndarray, piece: np.ndarray) -> None:
        np.copyto(piece, codes.view(_BF16))

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        return np.maximum(np.abs(values.reshape(-1).astype(np.float64)) * 2.0**-8, 2.0**-134)


class HalfCodec(_TwoByteCodec):
    """`fp16`: IEEE half. numpy's own float16 casts convert one element at a time (0.4 GB/s
    here), so encoding is a dozen whole-array operations and decoding a table look-up."""

    name, lossy = "fp16", True

    def _to_codes(self, values: np.ndarray, codes: np.ndarray) -> None:
        _half_bits(values, codes, self.scratch)

    def _from_codes(self, codes: np.ndarray, piece: np.ndarray) -> None:
        _half_table(piece.dtype.char).take(codes, out=piece, mode="wrap")

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        wide = values.reshape(-1).astype(np.float64)
        clamped = np.clip(wide, -65504.0, 65504.0)
        relative = 2.0**-11 + (2.0**-24 if values.dtype == np.float64 else 0.0)
        return np.abs(wide - clamped) + np.maximum(np.abs(clamped) * relative, 2.0**-25)


def _half_bits(values: np.ndarray, codes: np.ndarray, scratch: Scratch) -> None:
    """float32 values to IEEE half bits (round to nearest even; finite values clamped to
    +-65504; NaN and infinity kept).

    Adding the magic number m = 2^(e + 13), e = max(exponent of |x|, -14), to |x| leaves the
    half's significand, rounded to nearest even by the FPU, as the low bits k of the float32 sum
    (subnormal halves included); the sum's biased exponent is e + 140, so the half's bits are
    (e + 14) << 10 plus k, which is (sum bits >> 13) + k + 0x800 modulo 2^16. numpy's minimum
    and maximum against a scalar are not vectorised, hence the arrays of constants."""
    size = values.size
    total, magic = scratch.array("half.sum", np.float32, size), scratch.array("m", np.uint32, size)
    (largest, smallest), bits = _half_constants(codecs.STRIP_ELEMENTS), total.view(np.uint32)
    np.bitwise_and(values.view(np.uint32), 0x7FFFFFFF, out=bits)
    top = np.maximum.reduce(bits)  # deltas are small: most strips need no clamping
    if top > _HALF_LARGEST_BITS:
        np.minimum(total, largest[:size], out=total)
    np.bitwise_and(bits, 0x7F800000, out=magic)
    np.maximum(magic, smallest[:size], out=magic)
    np.add(magic, 13 << 23, out=magic)
    np.add(total, magic.view(np.float32), out=total)
    np.right_shift(bits, 13, out=magic)
    np.bitwise_and(bits, 0xFFF, out=bits)
    np.add(magic, bits, out=magic)
    np.right_shift(values.view(np.uint32), 16, out=bits)
    np.bitwise_and(bits, 0x8000, out=bits)
    np.add(magic, bits, out=magic)
    np.add(magic, 0x800, out=codes, casting="unsafe")
    if top >= 0x7F800000:
        _half_specials(values, codes)


@cache
def _half_constants(length: int) -> tuple[np.ndarray, np.ndarray]:
    """`length` copies of 65504.0 (float32) and of 2^-14's exponent bits (uint32), shared
    read-only by every fp16 codec."""
    largest, smallest = np.full(length, 65504.0, np.float32), np.full(length, 113 << 23, np.uint32)
    return _read_only(largest), _read_only(smallest)


def _half_specials(values: np.ndarray, codes: np.ndarray) -> None:
    """Give NaN and infinite values their half codes (the rare path: it allocates)."""
    where = ~np.isfinite(values)
    special = values[where]
    sign = np.where(np.signbit(special), 0x8000, 0)
    codes[where] = sign | np.where(np.isnan(special), 0x7E00, 0x7C00)


@cache
def _half_table(char: str) -> np.ndarray:
    """Every half's value (as float32 'f' or float64 'd'), indexed by its bits."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    return _read_only(halves.astype(char))


def _read_only(array: np.ndarray) -> np.ndarray:
    """The array, made read-only: tables and constants are shared by every codec instance."""
    array.flags.writeable = False
    return array
