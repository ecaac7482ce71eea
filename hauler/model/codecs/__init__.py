"""Codecs for model updates: a chunk's pieces in, bytes out, and back, in the caller's buffers.

A chunk reaches a codec as *pieces*, contiguous numpy arrays. A float32 or float64 piece holds
an update (new model minus old: small, about Gaussian, heavy-tailed) and is encoded, lossy or
not. Any other piece travels as its raw bytes: integers, bool, float16 and bfloat16 (already
two bytes), and, in int8/int4, float pieces of fewer than 3 elements (a low and a step would
cost more than the values). Nothing on the hot path allocates: each codec instance owns
scratch buffers that grow and are reused, so an instance belongs to one lane or worker thread.

Encoded chunk, little-endian. The decoder knows the pieces' dtypes and sizes, so nothing about
them travels, and a chunk must be exactly as long as they imply (zstd: as its headers say):
    none, bf16, fp16  the codes of the float pieces in order (their own bytes, bfloat16, IEEE
                      half), then the raw bytes of the other pieces in order.
    int8, int4        a (low, step) pair per block (float64 pieces' first, as float64, then
                      float32 pieces', as float32; blocks in piece order), then the codes of
                      every float element in piece order (int8: a byte each; int4: two a byte,
                      low nibble first, the last byte zero-padded), then the raw pieces.
    zstd              a blosc2 chunk (zstd, byte shuffle) for each group that has bytes, in
                      this order: the float64 pieces, the float32 pieces, the raw pieces.
No chunk is longer than its pieces' raw bytes, but for zstd's 32 bytes a group.

Error bounds, for finite x and its decoded x^ (`Codec.error_bound` gives them per element):
    none, zstd  exact: the same bits, NaN payloads included.
    bf16        |x - x^| <= |x| 2^-8 (round to nearest even; below 2^-126, 2^-134 absolute).
                Finite values beyond bfloat16's range (3.39e38) become infinite.
    fp16        |x - x^| <= |x| 2^-11 in half's normal range (2^-11 + 2^-24 for float64, which
                goes through float32); below 2^-14, 2^-25 absolute: half's subnormals are
                2^-24 apart, so deltas that small keep little precision (bf16 suits them).
                Finite values are clamped to +-65504 first, so none becomes infinite.
    int8, int4  |x - x^| <= (max - min) / 510 (int8) or / 30 (int4) over x's block, plus float
                rounding, (|max| + |min|) 2^-20 and, for float32, 1e-36 absolute; a constant
                block (all zeros, say) is exact.
NaN and infinity never decode finite: bf16 and fp16 keep them (NaN payloads aside); in
int8/int4 they make their block's low or step non-finite, so the whole block decodes
non-finite, which the server refuses. Nothing is laundered into a finite number.

One module a codec family, each with its rationale and measurements: `base` (the `Codec`
interface, `Scratch`, `encode_with_feedback`), `floats` (none, bf16, fp16), `blocks` (int8,
int4) and `zstd`. A new codec is a new module plus one line in `_FACTORIES` below; this module
lists what the rest of Hauler may import.
"""

from __future__ import annotations

from collections.abc import Callable

from hauler.core.errors import ConfigError
from hauler.model.codecs.base import Codec, Scratch, encode_with_feedback
from hauler.model.codecs.blocks import BLOCK_ELEMENTS_RANGE, DEFAULT_BLOCK_ELEMENTS, BlockCodec
from hauler.model.codecs.floats import BFloat16Codec, HalfCodec, RawCodec
from hauler.model.codecs.zstd import BLOSC2_OVERHEAD, ZstdCodec

# Read at call time by floats and blocks as `codecs.STRIP_ELEMENTS`, so a test can shrink them.
STRIP_ELEMENTS = 1 << 16  # elements per numpy pass: near the L2 cache, few calls (measured)
SMALL_ELEMENTS = STRIP_ELEMENTS // 4  # int8/int4 quantise smaller pieces together, in batches

_FACTORIES: dict[str, Callable[[int], Codec]] = {  # name: a new instance, given block_elements
    "none": lambda block_elements: RawCodec(),
    "bf16": lambda block_elements: BFloat16Codec(),
    "fp16": lambda block_elements: HalfCodec(),
    "int8": lambda block_elements: BlockCodec("int8", 255, block_elements),
    "int4": lambda block_elements: BlockCodec("int4", 15, block_elements),
    "zstd": lambda block_elements: ZstdCodec(),
}
CODEC_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_codec(name: str, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Codec:
    """A new codec instance, with its own scratch buffers: one per lane or worker thread. An
    unknown name, or a block size outside BLOCK_ELEMENTS_RANGE, raises ConfigError."""
    low, high = BLOCK_ELEMENTS_RANGE
    if not low <= block_elements <= high:
        raise ConfigError(f"codec block_elements {block_elements} is outside {low}..{high}")
    if name not in _FACTORIES:
        raise ConfigError(f"unknown codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    return _FACTORIES[name](block_elements)


__all__ = [
    "BLOCK_ELEMENTS_RANGE",
    "BLOSC2_OVERHEAD",
    "CODEC_NAMES",
    "DEFAULT_BLOCK_ELEMENTS",
    "SMALL_ELEMENTS",
    "STRIP_ELEMENTS",
    "Codec",
    "Scratch",
    "encode_with_feedback",
    "make_codec",
]
