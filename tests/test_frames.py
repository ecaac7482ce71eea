"""The data-plane frame codec and the incremental FrameReader: round trips, bounds
checked before any buffer is handed out, and garbage refused with protocol errors only."""

from __future__ import annotations

import json

import pytest
from helpers import feed, manifest_of
from hypothesis import given
from hypothesis import strategies as st

from hauler.core import untrusted_json
from hauler.core.errors import IntegrityError, RemoteProtocolError
from hauler.core.untrusted_json import parse_object
from hauler.model import ChunkPlan, chunk_checksum
from hauler.transfer import (
    FrameHeader,
    FrameReader,
    Hello,
    Kind,
    ReceiveLedger,
    ack_frame,
    control_frame,
)
from hauler.transfer.frames import HEADER, MAGIC, MAX_CONTROL_PAYLOAD, MAX_ENCODED_CHUNK_BYTES
from hauler.transfer.sinks import FileSink

U32, U64 = (1 << 32) - 1, (1 << 64) - 1


@st.composite
def headers(draw: st.DrawFn) -> FrameHeader:
    kind = draw(st.sampled_from(Kind))
    limit = {Kind.DATA: MAX_ENCODED_CHUNK_BYTES, Kind.ACK: 0, Kind.END: 0}.get(
        kind, MAX_CONTROL_PAYLOAD
    )
    return FrameHeader(
        kind, draw(st.integers(0, U64)), draw(st.integers(0, limit)), draw(st.integers(0, U64))
    )


def data_frame(seq: int, payload: bytes) -> bytes:
    checksum = chunk_checksum(memoryview(payload))
    return FrameHeader.data(seq, len(payload), checksum).encode() + payload


def raw_header(
    kind: int,
    *,
    seq: int = 0,
    length: int = 0,
    checksum: int = 0,
    magic: bytes = MAGIC,
    flags: int = 0,
    spare: int = 0,
    reserved: int = 0,
) -> bytes:
    return HEADER.pack(magic, kind, flags, spare, reserved, seq, length, checksum)


class Recorder:
    """A destination that records what it was asked for and lands payloads one after another
    in one buffer."""

    def __init__(self, size: int = 1 << 16) -> None:
        self.sink = bytearray(size)
        self.asked: list[FrameHeader] = []
        self.position = 0

    def __call__(self, header: FrameHeader) -> memoryview:
        self.asked.append(header)
        start, self.position = self.position, self.position + header.length
        return memoryview(self.sink)[start : self.position]


@given(headers())
def test_header_round_trip(header):
    encoded = header.encode()
    assert len(encoded) == HEADER.size == 32
    assert FrameHeader.decode(encoded) == header


@given(st.binary(min_size=32, max_size=32))
def test_random_header_decodes_or_is_refused_as_remote_protocol_error(data):
    try:
        header = FrameHeader.decode(data)
    except RemoteProtocolError:
        return
    assert header.encode() == data


@given(st.binary(max_size=64).filter(lambda data: len(data) != HEADER.size))
def test_header_of_the_wrong_size_is_a_remote_protocol_error(data):
    with pytest.raises(RemoteProtocolError):
        FrameHeader.decode(data)


@pytest.mark.parametrize(
    "header",
    [
        raw_header(Kind.DATA, length=MAX_ENCODED_CHUNK_BYTES + 1),
        raw_header(Kind.DATA, length=U32),
        raw_header(Kind.HELLO, length=MAX_CONTROL_PAYLOAD + 1),
        raw_header(Kind.ERROR, length=U32),
        raw_header(Kind.ACK, length=1),
        raw_header(Kind.DATA, length=8, magic=b"HTTP"),
        raw_header(Kind.DATA, length=8, flags=1),
        raw_header(Kind.DATA, length=8, spare=7),
        raw_header(Kind.DATA, length=8, reserved=1),
        raw_header(0, length=8),
        raw_header(9, length=8),
    ],
    ids=[
        "data>max",
        "data=2**32-1",
        "hello>max",
        "error=2**32-1",
        "ack-with-payload",
        "magic",
        "flags",
        "spare",
        "reserved",
        "kind0",
        "kind9",
    ],
)
def test_bad_header_is_refused_before_any_payload_buffer_is_handed_out(header):
    destination = Recorder()
    reader = FrameReader(destination)
    handed_out = []
    with pytest.raises(RemoteProtocolError):
        for byte in header:  # one byte at a time, recording every buffer the reader offers
            buffer = reader.get_buffer()
            handed_out.append(len(buffer))
            buffer[0] = byte
            reader.buffer_updated(1)
    assert destination.asked == []
    assert max(handed_out) <= HEADER.size


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6), st.integers(1, 80))
def test_data_payloads_land_in_their_destination_however_the_stream_is_split(payloads, piece_bytes):
    destination = Recorder()
    stream, offset, placed = b"", 0, []
    for seq, payload in enumerate(payloads):
        stream += data_frame(seq, payload)
        placed.append((offset, payload))
        offset += len(payload)
    frames = feed(FrameReader(destination), stream, piece_bytes)
    assert [f.header.kind for f in frames] == [Kind.DATA] * len(payloads)
    assert all(f.payload == b"" for f in frames)  # DATA payloads are never copied into the frame
    for start, payload in placed:
        assert bytes(destination.sink[start : start + len(payload)]) == payload
    assert [h.length for h in destination.asked] == [len(p) for p in payloads]


@given(st.sampled_from([Kind.HELLO, Kind.ERROR]), st.binary(max_size=2000), st.integers(1, 64))
def test_control_frames_carry_their_payload(kind, payload, piece_bytes):
    frames = feed(FrameReader(), control_frame(kind, payload) + ack_frame(7), piece_bytes)
    assert [(f.header.kind, f.payload) for f in frames] == [(kind, payload), (Kind.ACK, b"")]
    assert frames[1].header.seq == 7


def test_control_payload_above_the_limit_cannot_be_built():
    with pytest.raises(ValueError):
        control_frame(Kind.ERROR, b"x" * (MAX_CONTROL_PAYLOAD + 1))


@pytest.mark.parametrize("kind", [Kind.DATA, Kind.HELLO])
def test_payload_that_does_not_match_its_checksum_is_an_integrity_error(kind):
    payload = b"model bytes" * 10
    header = FrameHeader(kind, 0, len(payload), chunk_checksum(memoryview(payload)))
    with pytest.raises(IntegrityError):
        feed(FrameReader(Recorder()), header.encode() + payload[:-1] + b"!")


def test_data_frame_on_a_connection_that_is_not_receiving_is_refused():
    with pytest.raises(RemoteProtocolError):
        feed(FrameReader(destination=None), data_frame(0, b"12345678"))


@st.composite
def frame_like(draw: st.DrawFn) -> bytes:
    """Bytes that often get past the magic: headers with small random fields, random payloads."""
    length = draw(st.integers(0, 600))
    header = raw_header(
        draw(st.integers(0, 5)),
        seq=draw(st.sampled_from([0, 1, 2, 3, 4096, U64])),
        length=length,
        checksum=draw(st.integers(0, U64)),
        flags=draw(st.sampled_from([0, 0, 0, 1])),
    )
    payload = draw(st.binary(min_size=length, max_size=length))
    if draw(st.booleans()):  # a correct checksum, so the frame gets as far as the ledger
        header = header[:24] + chunk_checksum(memoryview(payload)).to_bytes(8, "little")
    return header + payload


GARBLED = manifest_of([("a", "F32", (40,)), ("b", "U8", (9,))], chunk_bytes=64)
planned_frames = st.sampled_from(list(GARBLED.chunks())).flatmap(  # frames the ledger expects
    lambda c: st.binary(min_size=c.length, max_size=c.length).map(lambda p: data_frame(c.seq, p))
)


@given(
    st.lists(st.one_of(st.binary(max_size=64), frame_like(), planned_frames), max_size=8),
    st.integers(1, 700),
    st.booleans(),
)
def test_garbage_on_the_wire_raises_only_protocol_or_integrity_errors(
    pieces, piece_bytes, with_digests
):
    manifest = GARBLED.with_digests(["0" * 16, "1" * 16]) if with_digests else GARBLED
    ledger = ReceiveLedger(ChunkPlan(manifest))
    sink = bytearray(manifest.total_bytes)
    pending = []

    file = FileSink(Bytes(sink), ChunkPlan(manifest))

    def destination(header: FrameHeader) -> memoryview:  # as receive_model does
        chunk = ledger.expect(header)
        pending.append(chunk)
        return file.landing(chunk, 0, header.length)

    def on_frame(frame):
        if frame.header.kind is Kind.DATA:
            chunk = pending.pop()
            file.landed(chunk, 0, frame.landed, frame.checksum)
            ledger.commit(chunk, frame.checksum, frame.header.length)

    try:
        feed(FrameReader(destination), b"".join(pieces), piece_bytes, on_frame)
    except (RemoteProtocolError, IntegrityError):
        pass


class Bytes:
    """A model's data region held in memory, as a FileSink lands chunks in it."""

    def __init__(self, data: bytearray) -> None:
        self.data = memoryview(data)

    def chunk_view(self, chunk) -> memoryview:
        return self.data[chunk.offset : chunk.offset + chunk.length]


# ----- HELLO: the first frame of a data connection, and JSON from peers in general -------------


def test_hello_round_trips():
    frame = feed(FrameReader(), Hello("a" * 32, 5).encode())[0]
    assert Hello.decode(frame.header, frame.payload) == Hello("a" * 32, 5)


ID = b'"' + b"0123456789abcdef" * 2 + b'"'
HOSTILE_HELLOS = {
    "nested_deep": b'{"transfer": ' + ID + b', "lane": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "nested_a_little": b'{"transfer": ' + ID + b', "lane": [[1]]}',
    "not_an_object": b'["x", 0]',
    "not_json": b"\xff\xfe",
    "no_transfer": b'{"lane": 0}',
    "no_lane": b'{"transfer": ' + ID + b"}",
    "another_key": b'{"transfer": ' + ID + b', "lane": 0, "then": 1}',
    "long_transfer": b'{"transfer": "' + b"a" * 200 + b'", "lane": 0}',
    "short_transfer": b'{"transfer": "abc", "lane": 0}',
    "not_hex": b'{"transfer": "' + b"g" * 32 + b'", "lane": 0}',
    "lane_too_high": b'{"transfer": ' + ID + b', "lane": 64}',
    "lane_not_an_int": b'{"transfer": ' + ID + b', "lane": true}',
    "lane_a_float": b'{"transfer": ' + ID + b', "lane": 1.0}',
}


@pytest.mark.parametrize("payload", HOSTILE_HELLOS.values(), ids=HOSTILE_HELLOS.keys())
def test_a_hostile_hello_is_a_remote_protocol_error_and_nothing_else(payload):
    frame = feed(FrameReader(), control_frame(Kind.HELLO, payload))[0]
    with pytest.raises(RemoteProtocolError):
        Hello.decode(frame.header, frame.payload)


def test_a_first_frame_that_is_not_a_hello_is_refused():
    frame = feed(FrameReader(), ack_frame(3))[0]
    with pytest.raises(RemoteProtocolError, match="first frame must be HELLO"):
        Hello.decode(frame.header, frame.payload)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=3), children, max_size=3)
        ),
        max_leaves=30,
    )
)
def test_json_depth_is_measured_exactly(value):
    text = json.dumps({"v": value})
    expected = 1 + _depth(value)
    if expected <= 32:
        assert parse_object(text, what="test") == {"v": value}
    else:
        with pytest.raises(RemoteProtocolError):
            parse_object(text, what="test")
    assert untrusted_json.nesting(json.loads(text), limit=1000) == expected


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@pytest.mark.parametrize("levels", [33, 1000, 100_000])
def test_json_nested_past_the_limit_is_refused_however_deep(levels):
    with pytest.raises(RemoteProtocolError, match="nested"):
        parse_object('{"a": ' + "[" * levels + "]" * levels + "}", what="control message")
