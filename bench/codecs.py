"""Codec benchmark: encode and decode GB/s per core, ratio and error of every update codec.

    python -m bench.codecs --json out.json
    python -m bench.codecs --mib 16 --runs 3      # quicker

Data: float32 deltas in 4 MiB chunks of 16 pieces, two sets. "gaussian": per-tensor scales
over three decades (1e-5..1e-2), 0.1 % of the elements 30 times larger; "model": w ~ N(0, 0.02)
and w' = w + N(0, 1e-4) in float32, delta = w' - w computed in float32 (so its low mantissa
bits are zero, as in real deltas). Speeds are float32 input bytes over seconds, the median of
--runs passes over --mib MiB, on one thread. Also measured: chunks of many small pieces (the
codec's cost per piece; a model's neighbouring tensors of one dtype reach the codec as one
array, so this is the worst case of a chunk of alternating dtypes), the int8/int4 block size,
symmetric against asymmetric int8 at equal bytes, and blosc2 against zstandard (with a numpy
byte shuffle) for the zstd codec.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
from rich.console import Console
from rich.table import Table

from hauler.model.codecs import CODEC_NAMES, DEFAULT_BLOCK_ELEMENTS, Codec, make_codec

MiB = 1 << 20
CHUNK_BYTES = 4 * MiB
SWEEP_BLOCKS = (64, 128, 256, 512, 1024, 4096)
SMALL_PIECES = (1024, 256)  # elements per piece in the many-small-pieces chunks
console = Console(width=None if sys.stdout.isatty() else 140)
Chunk = list[np.ndarray]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.codecs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--mib", type=int, default=64, help="MiB of float32 deltas per data set")
    parser.add_argument("--pieces", type=int, default=16, help="pieces per 4 MiB chunk")
    parser.add_argument("--runs", type=int, default=5, help="passes; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def gaussian_deltas(rng: np.random.Generator, size: int) -> np.ndarray:
    """One tensor's delta: Gaussian at a scale drawn over three decades, with 0.1 % outliers."""
    values = rng.standard_normal(size) * 10.0 ** rng.uniform(-5, -2)
    values[rng.integers(0, size, size // 1000)] *= 30
    return values.astype(np.float32)


def model_deltas(rng: np.random.Generator, size: int) -> np.ndarray:
    """One tensor's delta as training makes it: new weights minus old, in float32."""
    weights = (rng.standard_normal(size) * 0.02).astype(np.float32)
    return (weights + (rng.standard_normal(size) * 1e-4).astype(np.float32)) - weights


def chunks_of(make: Callable, rng: np.random.Generator, total: int, pieces: int) -> list[Chunk]:
    """total bytes of float32 deltas as 4 MiB chunks of `pieces` pieces each."""
    elements = CHUNK_BYTES // 4
    cuts = np.linspace(0, elements, pieces + 1).astype(int)
    return [[make(rng, n) for n in np.diff(cuts)] for _ in range(total // CHUNK_BYTES)]


def timed(action: Callable[[], None], runs: int, nbytes: int) -> tuple[float, float]:
    """GB/s of nbytes: the median and the best of `runs` timed calls (after one warm-up). The
    best says what the code can do when the machine's other tenants leave it alone."""
    action()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return nbytes / float(np.median(seconds)) / 1e9, nbytes / min(seconds) / 1e9


def speeds(encode: Callable[[], None], decode: Callable[[], None], runs: int, nbytes: int) -> dict:
    """encode_gb_s and decode_gb_s (medians), and the best of each."""
    (encode_gb_s, encode_best), (decode_gb_s, decode_best) = (
        timed(encode, runs, nbytes),
        timed(decode, runs, nbytes),
    )
    return {
        "encode_gb_s": round(encode_gb_s, 3),
        "decode_gb_s": round(decode_gb_s, 3),
        "encode_gb_s_best": round(encode_best, 3),
        "decode_gb_s_best": round(decode_best, 3),
    }


def measure(codec: Codec, chunks: list[Chunk], runs: int) -> dict[str, float]:
    """Encode and decode GB/s, ratio and errors of one codec over all chunks."""
    specs = [[(p.dtype, p.size) for p in chunk] for chunk in chunks]
    outs = [bytearray(codec.max_encoded_bytes(spec)) for spec in specs]
    decoded = [[np.empty_like(p) for p in chunk] for chunk in chunks]
    written = [0] * len(chunks)
    nbytes = sum(p.nbytes for chunk in chunks for p in chunk)

    def encode() -> None:
        for i, chunk in enumerate(chunks):
            written[i] = codec.encode(chunk, memoryview(outs[i]))

    def decode() -> None:
        for i, chunk in enumerate(decoded):
            codec.decode(memoryview(outs[i])[: written[i]], chunk)

    figures = speeds(encode, decode, runs, nbytes)
    sent = [p for chunk in chunks for p in chunk]
    got = [p for chunk in decoded for p in chunk]
    return {**figures, "ratio": round(nbytes / sum(written), 4), **errors(sent, got)}


def errors(sent: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """max_rel_error: max |x - x^| / |x| over x != 0; rel_rms_error: ||x - x^|| / ||x||;
    max_error_rms: max |x - x^| over the piece's RMS."""
    worst_rel = worst_rms = square_error = square = 0.0
    for x, y in zip(sent, got):
        x, y = x.astype(np.float64), y.astype(np.float64)
        difference, nonzero = np.abs(x - y), x != 0
        if nonzero.any():
            worst_rel = max(worst_rel, float((difference[nonzero] / np.abs(x[nonzero])).max()))
        rms = float(np.sqrt(np.mean(x * x))) or 1.0
        worst_rms = max(worst_rms, float(difference.max(initial=0)) / rms)
        square_error, square = square_error + float(difference @ difference), square + float(x @ x)
    return {
        "max_rel_error": float(f"{worst_rel:.4g}"),
        "rel_rms_error": float(f"{np.sqrt(square_error / square):.4g}"),
        "max_error_rms": float(f"{worst_rms:.4g}"),
    }


def small_pieces(rng: np.random.Generator, runs: int) -> dict[str, dict[str, dict]]:
    """Per-piece overhead: one 4 MiB chunk of many small pieces, for every codec."""
    result: dict[str, dict[str, dict]] = {}
    for size in SMALL_PIECES:
        chunks = chunks_of(gaussian_deltas, rng, CHUNK_BYTES, CHUNK_BYTES // 4 // size)
        result[f"{size}_elements"] = {
            name: measure(make_codec(name), chunks, runs) for name in CODEC_NAMES
        }
    return result


def block_sweep(chunks: list[Chunk], runs: int) -> dict[str, dict[int, dict]]:
    """int8 and int4 at several block sizes: ratio, error and speed."""
    return {
        name: {
            block: measure(make_codec(name, block_elements=block), chunks, runs)
            for block in SWEEP_BLOCKS
        }
        for name in ("int8", "int4")
    }


def symmetric(x: np.ndarray, block: int) -> np.ndarray:
    """Reference symmetric int8: per block, scale absmax / 127, q = rint(x / scale)."""
    rows = -(-x.size // block)
    padded = np.zeros(rows * block, np.float32)
    padded[: x.size] = x
    values = padded.reshape(rows, block)
    scale = np.abs(values).max(axis=1, keepdims=True) / np.float32(127)
    q = np.rint(values / np.where(scale > 0, scale, 1))
    return (q * scale).astype(np.float32).reshape(-1)[: x.size]


def int8_schemes(chunks: list[Chunk]) -> dict[str, dict]:
    """Symmetric int8 at block B (one float32 a block) against int8 with a zero point (the
    codec) at 2B (two float32 a block): the same bytes. Errors only."""
    sent = [p for chunk in chunks for p in chunk]
    result = {}
    for block in (64, 128, 256, 512, 1024):
        codec = make_codec("int8", block_elements=2 * block)
        got = []
        for chunk in chunks:
            out = bytearray(codec.max_encoded_bytes([(p.dtype, p.size) for p in chunk]))
            back = [np.empty_like(p) for p in chunk]
            codec.decode(memoryview(out)[: codec.encode(chunk, memoryview(out))], back)
            got.extend(back)
        result[str(block)] = {
            "bytes_per_element": 1 + 4 / block,
            "symmetric": errors(sent, [symmetric(p, block) for p in sent]),
            "asymmetric_2x_block": errors(sent, got),
        }
    return result


class Blosc2Zstd:
    """The zstd codec's way: groups gathered, blosc2 shuffles and compresses (one thread);
    `tuned`: one zstd stream per MiB block (as the codec does), else blosc2's defaults."""

    def __init__(self, level: int, *, tuned: bool) -> None:
        self.params: dict[str, Any] = {"clevel": level, "codec": blosc2.Codec.ZSTD, "nthreads": 1}
        if tuned:
            self.params.update(blocksize=1 << 20, splitmode=blosc2.SplitMode.NEVER_SPLIT)

    def encode(self, chunk: Chunk, scratch: np.ndarray, out: bytearray) -> int:
        joined = scratch[: sum(p.nbytes for p in chunk)]
        np.concatenate([p.view(np.uint8) for p in chunk], out=joined)
        frame = blosc2.compress2(joined, typesize=4, filters=[blosc2.Filter.SHUFFLE], **self.params)
        out[: len(frame)] = frame
        return len(frame)

    def decode(self, data: memoryview, scratch: np.ndarray, chunk: Chunk) -> None:
        joined = scratch[: sum(p.nbytes for p in chunk)]
        blosc2.decompress2(data, dst=joined, nthreads=1)
        scatter(joined, chunk)


class ZstandardShuffled:
    """The alternative: a numpy byte shuffle per piece, then one zstandard frame."""

    def __init__(self, level: int) -> None:
        import zstandard

        self.compressor = zstandard.ZstdCompressor(level=level, threads=0)
        self.decompressor = zstandard.ZstdDecompressor()

    def encode(self, chunk: Chunk, scratch: np.ndarray, out: bytearray) -> int:
        offset = 0
        for piece in chunk:
            planes, size = piece.view(np.uint8), piece.size
            for byte in range(4):
                scratch[offset + byte * size : offset + (byte + 1) * size] = planes[byte::4]
            offset += piece.nbytes
        frame = self.compressor.compress(scratch[:offset])
        out[: len(frame)] = frame
        return len(frame)

    def decode(self, data: memoryview, scratch: np.ndarray, chunk: Chunk) -> None:
        total, filled = sum(p.nbytes for p in chunk), 0
        reader, target = self.decompressor.stream_reader(data), memoryview(scratch)
        while filled < total and (count := reader.readinto(target[filled:total])):
            filled += count
        offset = 0
        for piece in chunk:
            planes, size = piece.view(np.uint8), piece.size
            for byte in range(4):
                planes[byte::4] = scratch[offset + byte * size : offset + (byte + 1) * size]
            offset += piece.nbytes


def scatter(data: np.ndarray, chunk: Chunk) -> None:
    offset = 0
    for piece in chunk:
        piece.view(np.uint8)[...] = data[offset : offset + piece.nbytes]
        offset += piece.nbytes


def zstd_libraries(chunks: list[Chunk], runs: int) -> dict[str, dict]:
    """blosc2 against zstandard + numpy shuffle, levels 1 and 3, with the same gathering
    (zstandard only if installed: `pip install zstandard`)."""
    libraries: dict[str, Any] = {
        f"blosc2 {blosc2.__version__} L1, 1 MiB blocks (the codec)": Blosc2Zstd(1, tuned=True),
        f"blosc2 {blosc2.__version__} L3, 1 MiB blocks": Blosc2Zstd(3, tuned=True),
        f"blosc2 {blosc2.__version__} L1, defaults": Blosc2Zstd(1, tuned=False),
    }
    if version := zstandard_version():
        for level in (1, 3):
            libraries[f"zstandard {version} L{level}"] = ZstandardShuffled(level)
    return {name: measure_library(library, chunks, runs) for name, library in libraries.items()}


def zstandard_version() -> str | None:
    """zstandard's version, or None (saying so) if it is not installed."""
    try:
        import zstandard
    except ImportError:
        console.print("zstandard is not installed: the zstd comparison leaves it out")
        return None
    return zstandard.__version__


def measure_library(library: Any, chunks: list[Chunk], runs: int) -> dict[str, float]:
    """Encode and decode GB/s and ratio of one zstd library; checks the round trip."""
    nbytes = sum(p.nbytes for chunk in chunks for p in chunk)
    scratch = np.empty(CHUNK_BYTES, np.uint8)
    outs = [bytearray(CHUNK_BYTES + 1024) for _ in chunks]
    written = [library.encode(chunk, scratch, out) for chunk, out in zip(chunks, outs)]
    back = [[np.empty_like(p) for p in chunk] for chunk in chunks]

    def encode() -> None:
        for chunk, out in zip(chunks, outs):
            library.encode(chunk, scratch, out)

    def decode() -> None:
        for out, size, chunk in zip(outs, written, back):
            library.decode(memoryview(out)[:size], scratch, chunk)

    figures = {**speeds(encode, decode, runs, nbytes), "ratio": round(nbytes / sum(written), 4)}
    assert all(a.tobytes() == b.tobytes() for c, d in zip(chunks, back) for a, b in zip(c, d))
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, as the JSON document."""
    rng = np.random.default_rng(args.seed)
    total = args.mib * MiB
    gaussian = chunks_of(gaussian_deltas, rng, total, args.pieces)
    model = chunks_of(model_deltas, rng, total, args.pieces)
    codecs: dict[str, dict] = {}
    for name in CODEC_NAMES:
        console.print(f"measuring {name} ...")
        codecs[name] = measure(make_codec(name), gaussian, args.runs)
        codecs[name]["model"] = measure(make_codec(name), model, args.runs)
    sweep_data = gaussian[: max(1, len(gaussian) // 4)]
    console.print("measuring small pieces, block sizes, int8 schemes and zstd libraries ...")
    return {
        "chunk_bytes": CHUNK_BYTES,
        "threads": 1,
        "pieces_per_chunk": args.pieces,
        "data_mib": args.mib,
        "runs": args.runs,
        "block_elements": DEFAULT_BLOCK_ELEMENTS,
        "versions": {
            "numpy": np.__version__,
            "blosc2": blosc2.__version__,
            "zstandard": zstandard_version(),
        },
        "codecs": codecs,
        "small_pieces": small_pieces(rng, args.runs),
        "block_sweep": block_sweep(sweep_data, args.runs),
        "int8_schemes": int8_schemes(sweep_data),
        "zstd_libraries": {
            "gaussian": zstd_libraries(gaussian, args.runs),
            "model": zstd_libraries(model, args.runs),
        },
    }


def speed(row: dict[str, float], direction: str) -> str:
    """'median (best)' GB/s of one direction, encode or decode."""
    return f"{row[f'{direction}_gb_s']:.2f} ({row[f'{direction}_gb_s_best']:.2f})"


def show(result: dict[str, Any]) -> None:
    for data in ("gaussian", "model"):
        table = Table(
            "codec",
            "enc GB/s (best)",
            "dec GB/s (best)",
            "ratio",
            "max rel err",
            "rel RMS err",
            "max err / RMS",
            title=f"{data} deltas, float32, {result['data_mib']} MiB in 4 MiB chunks of "
            f"{result['pieces_per_chunk']} pieces, one thread: median (best) of {result['runs']}",
        )
        for name, row in result["codecs"].items():
            row = row if data == "gaussian" else row["model"]
            table.add_row(
                name,
                speed(row, "encode"),
                speed(row, "decode"),
                f"{row['ratio']:.3f}",
                f"{row['max_rel_error']:.3g}",
                f"{row['rel_rms_error']:.3g}",
                f"{row['max_error_rms']:.3g}",
            )
        console.print(table)
    small = Table(
        "codec",
        *(f"{k}: enc / dec GB/s (best)" for k in result["small_pieces"]),
        title="one 4 MiB chunk of many small pieces",
    )
    for name in CODEC_NAMES:
        small.add_row(
            name,
            *(
                f"{speed(v[name], 'encode')} / {speed(v[name], 'decode')}"
                for v in result["small_pieces"].values()
            ),
        )
    console.print(small)
    show_blocks(result)
    zstd = Table(
        "library", "data", "enc GB/s (best)", "dec GB/s (best)", "ratio", title="zstd libraries"
    )
    for data, rows in result["zstd_libraries"].items():
        for name, row in rows.items():
            zstd.add_row(
                name, data, speed(row, "encode"), speed(row, "decode"), f"{row['ratio']:.3f}"
            )
    console.print(zstd)


def show_blocks(result: dict[str, Any]) -> None:
    sweep = Table(
        "codec",
        "block",
        "ratio",
        "rel RMS err",
        "max err / RMS",
        "enc GB/s (best)",
        "dec GB/s (best)",
        title="int8 / int4 block size (gaussian)",
    )
    for name, rows in result["block_sweep"].items():
        for block, row in rows.items():
            sweep.add_row(
                name,
                str(block),
                f"{row['ratio']:.3f}",
                f"{row['rel_rms_error']:.4f}",
                f"{row['max_error_rms']:.3f}",
                speed(row, "encode"),
                speed(row, "decode"),
            )
    console.print(sweep)
    schemes = Table(
        "bytes/element",
        "symmetric B: rel RMS",
        "max err / RMS",
        "asymmetric 2B: rel RMS",
        "max err / RMS",
        title="int8 schemes, equal bytes",
    )
    for block, row in result["int8_schemes"].items():
        sym, asym = row["symmetric"], row["asymmetric_2x_block"]
        schemes.add_row(
            f"{row['bytes_per_element']:.4f} (B={block})",
            f"{sym['rel_rms_error']:.4f}",
            f"{sym['max_error_rms']:.3f}",
            f"{asym['rel_rms_error']:.4f}",
            f"{asym['max_error_rms']:.3f}",
        )
    console.print(schemes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    show(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
