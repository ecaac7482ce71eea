"""`int8` and `int4`: blockwise quantisation with a zero point (`BlockCodec`).

int8/int4 quantise with a zero point: per block of `block_elements`, low = min, step = (max -
min) / 255 (int8) or / 15 (int4), q = round((x - low) / step). Symmetric absmax blocks (scale =
absmax / 127, q = rint(x / scale)) store one number a block, not two, so at equal bytes their
blocks are half as long; `python -m bench.codecs` measures both so. At 1.0156 bytes an element
(zero point over 512, symmetric over 256) the zero point's RMS error is 0.020 against 0.024 on
deltas with heavy-tail outliers and 0.0069 against 0.0070 on model deltas; its max error is
up to a third lower. On Gaussian blocks the two tie, but an outlier sits on one side of its
block, and a zero point spends all its levels on [min, max] where absmax leaves half on the
empty side. The price: a zero inside a mixed block decodes within step / 2 of zero, not
exactly. Lows and steps keep the piece's float type: float16 would flush the steps of deltas
below ~1e-6. The default block, 512, costs 1.6 % of an int8 payload (ratio 3.94 from float32;
3.88 at 256, 3.97 at 1024) for RMS error 0.020 on the outlier set (0.014 at 256, 0.029 at
1024); below 256, encoding slows down (a reduction a block).

Float pieces of fewer than `MIN_BLOCK_CODED` elements travel raw (a low and a step would cost
more than the values). Large pieces are quantised in place, a strip of `STRIP_ELEMENTS` at a
time; pieces of at most `SMALL_ELEMENTS` are quantised together, in batches. Formats and error
bounds: the package docstring.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from hauler.model import codecs  # STRIP_ELEMENTS, SMALL_ELEMENTS: read at call time
from hauler.model.codecs.base import BYTES, CODED, FLOATS, FixedCodec, Scratch, Spec

DEFAULT_BLOCK_ELEMENTS = 512  # error and speed against bytes of lows and steps: see above
BLOCK_ELEMENTS_RANGE = (16, 1 << 16)  # from 16 up, int8 never outgrows the floats it encodes
MIN_BLOCK_CODED = 3  # int8/int4: a low and a step cost more than one or two values: sent raw
_LARGEST = {dtype: float(np.finfo(dtype).max) for dtype in FLOATS}
_PAIR = np.dtype("<u2")  # two int4 codes, the first in the low byte


class BlockCodec(FixedCodec):
    """`int8` and `int4`: blockwise quantisation with a zero point. Every `block` consecutive
    elements of a piece (the grid restarts at each piece; the last block may be short) share a
    low, their minimum, and a step, (maximum - minimum) / levels; each element becomes
    round((x - low) / step) in 0..levels (halves up) and decodes as low + q * step."""

    def __init__(self, name: str, levels: int, block: int) -> None:
        super().__init__()
        self.name, self.lossy, self.levels, self.block = name, True, levels, block
        self.nibbles = levels < 16

    def coded(self, dtype: np.dtype, size: int) -> bool:
        return dtype in CODED and size >= MIN_BLOCK_CODED

    def _header_bytes(self, coded: Sequence[Spec]) -> int:
        return sum(-(-size // self.block) * 2 * dtype.itemsize for dtype, size in coded)

    def _code_bytes(self, coded: Sequence[Spec]) -> int:
        count = sum(size for _, size in coded)
        return (count + 1) // 2 if self.nibbles else count

    def _codes(self, coded: list[np.ndarray], data: np.ndarray) -> np.ndarray:
        """One byte of code per element: `data` itself, or scratch to pack nibbles from."""
        if not self.nibbles:
            return data
        return self.scratch.array("codes", BYTES, sum(piece.size for piece in coded))

    def _params(self, coded: list[np.ndarray], header: np.ndarray) -> list[np.ndarray]:
        """Each piece's (low, step) pairs, one row a block, viewed in the header: float64
        pieces' first, then float32 pieces'."""
        counts = [-(-piece.size // self.block) for piece in coded]
        wide = sum(count for piece, count in zip(coded, counts) if piece.dtype == FLOATS[0])
        offsets, views = {FLOATS[0]: 0, FLOATS[1]: 16 * wide}, []
        for piece, count in zip(coded, counts):
            start = offsets[piece.dtype]
            offsets[piece.dtype] = end = start + count * 2 * piece.dtype.itemsize
            views.append(header[start:end].view(piece.dtype).reshape(-1, 2))
        return views

    def _rows(self, values: np.ndarray) -> np.ndarray:
        return values.reshape(-1, self.block)

    def _parts(self, coded: list[np.ndarray], header: np.ndarray, codes: np.ndarray) -> tuple:
        """Each large piece's whole blocks, as rows, handled in place; and the small parts (a
        small piece entirely, or a large piece's short last block), handled in batches: lists
        of (values, params, codes)."""
        large, small, offset = [], [], 0
        for piece, params in zip(coded, self._params(coded, header)):
            piece_codes = codes[offset : offset + piece.size]
            offset += piece.size
            whole = (
                piece.size // self.block * self.block if piece.size > codecs.SMALL_ELEMENTS else 0
            )
            if whole:
                rows = whole // self.block
                values, block_codes = self._rows(piece[:whole]), self._rows(piece_codes[:whole])
                large.append((values, params[:rows], block_codes))
            if whole < piece.size:
                small.append((piece[whole:], params[whole // self.block :], piece_codes[whole:]))
        return large, small

    def _batches(self, small: list[tuple[np.ndarray, ...]]) -> Iterator[tuple[list, int]]:
        """Small parts of one dtype at a time, as batches that fill at most one strip of
        whole rows, each with its number of rows."""
        capacity = max(1, codecs.STRIP_ELEMENTS // self.block)
        for dtype in FLOATS:
            batch, rows = [], 0
            for part in (part for part in small if part[0].dtype == dtype):
                if batch and rows + len(part[1]) > capacity:
                    yield batch, rows
                    batch, rows = [], 0
                batch.append(part)
                rows += len(part[1])
            if batch:
                yield batch, rows

    def _encode(self, coded: list[np.ndarray], out: np.ndarray, header: int) -> None:
        codes = self._codes(coded, out[header:])
        large, small = self._parts(coded, out[:header], codes)
        for values, params, block_codes in large:
            step = max(1, codecs.STRIP_ELEMENTS // self.block)
            for start in range(0, len(values), step):
                lines = slice(start, start + step)
                self._quantise(values[lines], params[lines], block_codes[lines])
        for batch, rows in self._batches(small):
            self._quantise_batch(batch, rows)
        if self.nibbles:
            _pack_nibbles(codes, out[header:], self.scratch)

    def _decode(self, data: np.ndarray, header: int, coded: list[np.ndarray]) -> None:
        codes = self._codes(coded, data[header:])
        if self.nibbles:
            _unpack_nibbles(data[header:], codes)
        large, small = self._parts(coded, data[:header], codes)
        for values, params, block_codes in large:
            self._dequantise(block_codes, params, values)
        for batch, rows in self._batches(small):
            self._dequantise_batch(batch, rows)

    def _quantise(self, rows: np.ndarray, params: np.ndarray, codes: np.ndarray) -> None:
        """Low, step and codes of whole blocks, one per row. A constant block (all zeros, say)
        gets step 0 and decodes exactly; a non-finite value makes its block's low or step
        non-finite. The inverse step is capped at the dtype's largest value, so a block of tiny
        differences cannot overflow it."""
        dtype, low, step = rows.dtype, params[:, 0], params[:, 1]
        high = self.scratch.array("high", dtype, len(rows))
        inverse = self.scratch.array("inverse", dtype, len(rows))
        work = self.scratch.array("work", dtype, rows.size).reshape(rows.shape)
        np.minimum.reduce(rows, axis=1, out=low)
        np.maximum.reduce(rows, axis=1, out=high)
        np.subtract(high, low, out=high)
        np.divide(high, self.levels, out=step)
        np.divide(self.levels, high, out=inverse)
        np.minimum(inverse, _LARGEST[dtype], out=inverse)
        np.multiply(step, 0.5, out=high)
        np.subtract(low, high, out=high)  # low - step / 2: truncating (x - it) / step rounds
        np.subtract(rows, high[:, None], out=work)
        np.multiply(work, inverse[:, None], out=codes, casting="unsafe")

    def _dequantise(self, codes: np.ndarray, params: np.ndarray, rows: np.ndarray) -> None:
        """low + q * step, row by row."""
        np.multiply(codes, params[:, 1:], out=rows)
        np.add(rows, params[:, :1], out=rows)

    def _batch_arrays(self, dtype: np.dtype, rows: int) -> tuple[np.ndarray, ...]:
        """Scratch rows of values and of codes, and their (low, step) pairs, for one batch."""
        size = rows * self.block
        values = self._rows(self.scratch.array("batch", dtype, size))
        codes = self._rows(self.scratch.array("batch.codes", BYTES, size))
        return values, codes, self.scratch.array("batch.params", dtype, 2 * rows).reshape(-1, 2)

    def _quantise_batch(self, batch: list[tuple[np.ndarray, ...]], rows: int) -> None:
        """Quantise small parts together, each copied into rows of scratch, its last row padded
        with its last value (which moves neither its low nor its high): a chunk of thousands
        of small pieces costs a few short numpy calls a piece, not a dozen."""
        values, codes, params = self._batch_arrays(batch[0][0].dtype, rows)
        flat_values, flat_codes, row = values.reshape(-1), codes.reshape(-1), 0
        for part, part_params, _ in batch:
            values[row + len(part_params) - 1] = part[-1]
            flat_values[row * self.block : row * self.block + part.size] = part
            row += len(part_params)
        self._quantise(values, params, codes)
        row = 0
        for part, part_params, part_codes in batch:
            part_codes[...] = flat_codes[row * self.block : row * self.block + part.size]
            part_params[...] = params[row : row + len(part_params)]
            row += len(part_params)

    def _dequantise_batch(self, batch: list[tuple[np.ndarray, ...]], rows: int) -> None:
        """Decode small parts together, as _quantise_batch encoded them (padding is not read)."""
        values, codes, params = self._batch_arrays(batch[0][0].dtype, rows)
        flat_values, flat_codes, row = values.reshape(-1), codes.reshape(-1), 0
        for part, part_params, part_codes in batch:
            flat_codes[row * self.block : row * self.block + part.size] = part_codes
            params[row : row + len(part_params)] = part_params
            row += len(part_params)
        self._dequantise(codes, params, values)
        row = 0
        for part, part_params, _ in batch:
            part[...] = flat_values[row * self.block : row * self.block + part.size]
            row += len(part_params)

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        flat = values.reshape(-1)
        if not self.coded(flat.dtype, flat.size):
            return np.zeros(flat.size)
        padded = np.empty(-(-flat.size // self.block) * self.block)
        padded[: flat.size], padded[flat.size :] = flat, flat[-1]
        low, high = self._rows(padded).min(axis=1), self._rows(padded).max(axis=1)
        tiny = 2 * self.levels / _LARGEST[flat.dtype]  # where the inverse step is capped
        bound = (high - low) / (2 * self.levels) + (np.abs(low) + np.abs(high)) * 2.0**-20 + tiny
        return np.repeat(bound, self.block)[: flat.size]


def _pack_nibbles(codes: np.ndarray, out: np.ndarray, scratch: Scratch) -> None:
    """Pack codes in 0..15 two a byte, low nibble first: read as little-endian uint16, a pair
    is c0 + 256 c1, and the low byte of (pair | pair >> 4) is c0 + 16 c1. An odd last code
    goes alone."""
    pairs = codes.size // 2
    both, high = codes[: 2 * pairs].view(_PAIR), scratch.array("nibbles", _PAIR, pairs)
    np.right_shift(both, 4, out=high)
    np.bitwise_or(both, high, out=out[:pairs], casting="unsafe")
    if codes.size % 2:
        out[pairs] = codes[-1] & 0x0F


def _unpack_nibbles(packed: np.ndarray, codes: np.ndarray) -> None:
    """The inverse of _pack_nibbles: (byte << 4 | byte) & 0x0F0F is the pair c0 + 256 c1 (the
    padding nibble of an odd count is not read)."""
    pairs = codes.size // 2
    both = codes[: 2 * pairs].view(_PAIR)
    np.left_shift(packed[:pairs], 4, out=both, dtype=_PAIR)
    np.bitwise_or(both, packed[:pairs], out=both)
    np.bitwise_and(both, 0x0F0F, out=both)
    if codes.size % 2:
        codes[-1] = packed[pairs] & 0x0F
