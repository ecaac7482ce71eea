"""Update codecs: every codec round-trips within its stated bound (lossless ones bit-exact),
raw pieces travel exact, non-finite values never decode finite, malformed data is refused with
RemoteProtocolError only, and error feedback keeps the accumulated error to one round's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hauler.core.errors import ConfigError, RemoteProtocolError
from hauler.model import codecs
from hauler.model.codecs import CODEC_NAMES, Codec, encode_with_feedback, make_codec

BLOCK = 16  # the smallest block: pieces of a few dozen elements cut blocks anywhere
FLOATS = [np.dtype("<f4"), np.dtype("<f8")]
OTHERS = [np.dtype(c) for c in ("i1", "<i2", "<i4", "<i8", "u1", "?")]
SPECIALS = [
    float(v)
    for v in "0 -0 nan -nan inf -inf 1e-45 -3e-39 5e-8 65504 65519 65520 -1e6 3e38 1e-30".split()
]
LOSSY = [name for name in CODEC_NAMES if make_codec(name).lossy]


@contextlib.contextmanager
def tiny_strips(on: bool) -> Iterator[None]:
    """Shrink the strip and small-piece limits, so small arrays take the large-piece paths."""
    saved = codecs.STRIP_ELEMENTS, codecs.SMALL_ELEMENTS
    if on:
        codecs.STRIP_ELEMENTS, codecs.SMALL_ELEMENTS = 4 * BLOCK, 2 * BLOCK
    try:
        yield
    finally:
        codecs.STRIP_ELEMENTS, codecs.SMALL_ELEMENTS = saved


@st.composite
def pieces(draw: st.DrawFn, *, specials: bool = True) -> list[np.ndarray]:
    """0..6 pieces of mixed dtypes and sizes; float values at scales from 1e-8 to 1e4, some
    of them special (NaN, infinities, signed zeros, subnormals, half's limits)."""
    count = draw(st.integers(0, 6))
    sizes = st.one_of(
        st.integers(0, 3 * BLOCK + 5), st.sampled_from([1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK])
    )
    result = []
    for _ in range(count):
        dtype = draw(st.sampled_from(FLOATS * 3 + OTHERS))
        size, seed = draw(sizes), draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        if dtype.kind != "f":
            result.append(rng.integers(0, 256, size * dtype.itemsize, np.uint8).view(dtype))
            continue
        scale = 10.0 ** draw(st.floats(-8, 4))
        values = rng.standard_normal(size) * scale
        if specials and size and draw(st.booleans()):
            spots = draw(st.lists(st.integers(0, size - 1), max_size=3))
            chosen = st.lists(st.sampled_from(SPECIALS), min_size=len(spots), max_size=len(spots))
            values[spots] = draw(chosen)
        result.append(values.astype(dtype))
    return result


def round_trip(codec: Codec, chunk: list[np.ndarray]) -> tuple[bytes, list[np.ndarray]]:
    """The encoded bytes and the decoded pieces (checking the size promise on the way)."""
    bound = codec.max_encoded_bytes([(p.dtype, p.size) for p in chunk])
    out = bytearray(bound + 7)
    written = codec.encode(chunk, memoryview(out))
    assert written <= bound
    decoded = [np.full_like(p, 7) for p in chunk]
    codec.decode(memoryview(out)[:written], decoded)
    return bytes(out[:written]), decoded


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_piece(codec: Codec, sent: np.ndarray, got: np.ndarray) -> None:
    """Raw pieces and lossless codecs: the same bits. Lossy: within the codec's bound where
    finite, and never finite where the input was not."""
    if not codec.lossy or not codec.coded(sent.dtype, sent.size):
        assert same_bits(sent, got)
        return
    finite = np.isfinite(sent)
    assert not np.isfinite(got[~finite]).any()
    with np.errstate(invalid="ignore"):
        error = np.abs(sent.astype(np.float64) - got.astype(np.float64))
    bound = codec.error_bound(sent)
    block = getattr(codec, "block", 1)  # int8/int4 bound only blocks without a non-finite value
    assert (error[finite_blocks(sent, block)] <= bound[finite_blocks(sent, block)]).all()


def finite_blocks(values: np.ndarray, block: int) -> np.ndarray:
    """Which elements lie in blocks of `block` elements that hold finite values only."""
    rows = -(-values.size // block)
    padded = np.zeros(rows * block, bool)
    padded[: values.size] = ~np.isfinite(values)
    return ~np.repeat(padded.reshape(rows, block).any(axis=1), block)[: values.size]


@pytest.mark.parametrize("tiny", [False, True], ids=["strips", "tiny-strips"])
@pytest.mark.parametrize("name", CODEC_NAMES)
@given(chunk=pieces())
@settings(max_examples=50)
def test_round_trip_within_bound(name: str, tiny: bool, chunk: list[np.ndarray]) -> None:
    codec = make_codec(name, block_elements=BLOCK)
    with tiny_strips(tiny):
        encoded, decoded = round_trip(codec, chunk)
    for sent, got in zip(chunk, decoded, strict=True):
        check_piece(codec, sent, got)
    slack = 3 * codecs.BLOSC2_OVERHEAD if name == "zstd" else 0
    assert len(encoded) <= sum(piece.nbytes for piece in chunk) + slack


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_large_pieces_within_bound(name: str) -> None:
    """Pieces larger than a strip, mixed with small ones, at the default block size."""
    rng = np.random.default_rng(7)
    chunk = [
        (rng.standard_normal(n) * 10.0**e).astype(d)
        for n, e, d in [(70_001, -3, "<f4"), (3, 0, "<f4"), (20_000, -6, "<f8"), (257, 2, "<f4")]
    ]
    chunk[0][12_345] = np.nan
    codec = make_codec(name)
    _, decoded = round_trip(codec, chunk)
    for sent, got in zip(chunk, decoded, strict=True):
        check_piece(codec, sent, got)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_fixed_size_formats_are_exactly_their_size(name: str) -> None:
    codec = make_codec(name, block_elements=BLOCK)
    chunk = [np.ones(37, "<f4"), np.arange(5, dtype="<i8"), np.ones(1, "<f8"), np.ones(0, "<f4")]
    data, _ = round_trip(codec, chunk)
    if name != "zstd":
        assert len(data) == codec.max_encoded_bytes([(p.dtype, p.size) for p in chunk])


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_zero_blocks_decode_to_exact_zeros(name: str) -> None:
    codec = make_codec(name, block_elements=BLOCK)
    values = np.zeros(3 * BLOCK + 3, "<f4")
    values[BLOCK + 2] = 1e-3
    _, (decoded,) = round_trip(codec, [values])
    assert (decoded[:BLOCK] == 0).all() and (decoded[2 * BLOCK :] == 0).all()


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_non_finite_never_decodes_finite(name: str, special: float) -> None:
    codec = make_codec(name, block_elements=BLOCK)
    values = np.linspace(-1, 1, 2 * BLOCK + 5).astype("<f4")
    values[BLOCK + 3] = special
    _, (decoded,) = round_trip(codec, [values])
    assert not np.isfinite(decoded[BLOCK + 3])
    if name in ("int8", "int4"):  # the whole block goes
        assert not np.isfinite(decoded[BLOCK : 2 * BLOCK]).any()


def test_fp16_clamps_finite_values_and_keeps_non_finite() -> None:
    values = np.array([1e6, -1e6, 65519.0, 65520.0, 3e38, np.inf, -np.inf, np.nan], "<f4")
    _, (decoded,) = round_trip(make_codec("fp16"), [values])
    assert decoded[:5].tolist() == [65504.0, -65504.0, 65504.0, 65504.0, 65504.0]
    assert decoded[5] == np.inf and decoded[6] == -np.inf and not np.isfinite(decoded[7])


def test_fp16_rounds_exactly_as_ieee() -> None:
    """Every finite float32 pattern class (normal, subnormal half, ties) as numpy would."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values) & (np.abs(values) <= 65504)]
    ties = (np.arange(1, 2000, dtype=np.float32) + np.float32(0.5)) * np.float32(2**-24)
    values = np.concatenate([values, ties, -ties])
    _, (decoded,) = round_trip(make_codec("fp16"), [values])
    assert same_bits(decoded, values.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("name", CODEC_NAMES)
@given(chunk=pieces(specials=False), data=st.data())
@settings(max_examples=25)
def test_wrong_length_is_refused(name: str, chunk: list[np.ndarray], data: st.DataObject) -> None:
    codec = make_codec(name, block_elements=BLOCK)
    encoded, _ = round_trip(codec, chunk)
    cut = data.draw(st.integers(0, max(0, len(encoded) - 1)))
    extra = data.draw(st.binary(min_size=1, max_size=40))
    for bad in ([encoded[:cut]] if encoded else []) + [encoded + extra]:
        with pytest.raises(RemoteProtocolError):
            codec.decode(memoryview(bad), [np.empty_like(p) for p in chunk])


@pytest.mark.parametrize("name", CODEC_NAMES)
@given(chunk=pieces(specials=False), garbage=st.binary(max_size=400), data=st.data())
@settings(max_examples=40)
def test_garbage_raises_protocol_errors_only(
    name: str, chunk: list[np.ndarray], garbage: bytes, data: st.DataObject
) -> None:
    """Random bytes, and valid chunks with bytes flipped: refused, or (for a format that has
    no checksum of its own) decoded into the pieces; never another exception."""
    codec = make_codec(name, block_elements=BLOCK)
    encoded, _ = round_trip(codec, chunk)
    flipped = bytearray(encoded)
    for spot in data.draw(st.lists(st.integers(0, max(0, len(flipped) - 1)), max_size=4)):
        if flipped:
            flipped[spot] ^= data.draw(st.integers(1, 255))
    for bad in (garbage, bytes(flipped)):
        with contextlib.suppress(RemoteProtocolError):
            codec.decode(memoryview(bad), [np.empty_like(p) for p in chunk])


def test_zstd_refuses_a_frame_that_claims_or_holds_more() -> None:
    codec = make_codec("zstd")
    big = np.random.default_rng(1).standard_normal(4096).astype("<f4")
    encoded, _ = round_trip(codec, [big])
    with pytest.raises(RemoteProtocolError, match="claims"):
        codec.decode(memoryview(encoded), [np.empty(1024, "<f4")])
    lying = bytearray(encoded)
    lying[4:8] = (1024 * 4).to_bytes(4, "little")  # the header's uncompressed size, shrunk
    with pytest.raises(RemoteProtocolError):
        codec.decode(memoryview(bytes(lying)), [np.empty(1024, "<f4")])


def test_unknown_codec_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as refused:
        make_codec("gzip")
    assert "gzip" in str(refused.value)
    assert all(name in str(refused.value) for name in CODEC_NAMES)
    with pytest.raises(ConfigError, match="block_elements"):
        make_codec("int8", block_elements=3)


def feedback_rounds(name: str, *, feedback: bool, rounds: int = 20) -> tuple[np.ndarray, ...]:
    """Sum of true deltas, sum of decoded deltas, final residual, and the largest one-round
    error bound, over `rounds` rounds of random float32 deltas (plus a raw int piece)."""
    codec, rng = make_codec(name, block_elements=BLOCK), np.random.default_rng(11)
    residual = np.zeros(4000, "<f4")
    true_sum, decoded_sum, worst = np.zeros(4000), np.zeros(4000), np.zeros(4000)
    for _ in range(rounds):
        delta = (rng.standard_normal(4000) * 1e-3).astype("<f4")
        counter = rng.integers(0, 100, 3, dtype="<i4")
        out = bytearray(codec.max_encoded_bytes([(delta.dtype, 4000), (counter.dtype, 3)]))
        target = delta.astype(np.float64) + residual if feedback else delta
        worst = np.maximum(worst, codec.error_bound(np.asarray(target, "<f4")))
        if feedback:
            written = encode_with_feedback(codec, [delta, counter], [residual, None], out)
        else:
            written = codec.encode([delta, counter], memoryview(out))
        back = [np.empty(4000, "<f4"), np.empty(3, "<i4")]
        codec.decode(memoryview(out)[:written], back)
        assert same_bits(back[1], counter)
        true_sum += delta
        decoded_sum += back[0]
    return true_sum, decoded_sum, residual, worst


@pytest.mark.parametrize("name", ["int4", "int8", "fp16", "bf16"])
def test_error_feedback_carries_what_quantisation_drops(name: str) -> None:
    true_sum, decoded_sum, residual, worst = feedback_rounds(name, feedback=True)
    drift = decoded_sum - true_sum
    assert np.allclose(drift, -residual, rtol=0, atol=1e-5 * np.abs(true_sum).max())
    assert (np.abs(drift) <= worst * 1.01 + 1e-9).all()  # one round's error, not twenty
    plain_true, plain_decoded, _, _ = feedback_rounds(name, feedback=False)
    plain_drift = plain_decoded - plain_true
    assert np.linalg.norm(plain_drift) > 2.5 * np.linalg.norm(drift)  # it grows without it


def test_error_feedback_is_exact_for_lossless_codecs_and_forgets_non_finite() -> None:
    codec = make_codec("zstd")
    delta, residual = np.linspace(-1, 1, 100, dtype="<f4"), np.zeros(100, "<f4")
    out = bytearray(codec.max_encoded_bytes([(delta.dtype, 100)] * 2))
    encode_with_feedback(codec, [delta, delta], [residual, None], out)  # None: no feedback
    assert not residual.any()
    int8 = make_codec("int8", block_elements=BLOCK)
    delta[3] = np.nan
    out = bytearray(int8.max_encoded_bytes([(delta.dtype, 100)]))
    encode_with_feedback(int8, [delta], [residual], out)
    assert np.isfinite(residual).all() and not residual[:BLOCK].any()
