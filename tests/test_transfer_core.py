"""The sans-I/O transfer core: a SendSchedule's lanes and a ReceiveLedger joined in memory by
links that hypothesis cuts, delays, corrupts and runs at different speeds. The model (raw, or
encoded chunks of any length) must arrive bit-identical, every tensor checked once, and each
resume may re-send at most one window (DESIGN.md invariant 5). No sockets, no sleeps."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import feed
from hypothesis import given
from hypothesis import strategies as st

from hauler.core.errors import DigestError, IntegrityError, RemoteProtocolError
from hauler.model import DTYPES, ChunkPlan, Manifest, chunk_checksum
from hauler.model.manifest import digest_of_checksums
from hauler.transfer import (
    DigestCheck,
    FrameHeader,
    FrameReader,
    Kind,
    ReceiveLedger,
    SendSchedule,
    control_frame,
)

MAX_STEPS = 100_000


def with_digests(manifest: Manifest, data: bytes) -> Manifest:
    """The manifest with digests over `data`, computed here the long way: a tensor's pieces are
    its parts between multiples of chunk_bytes."""
    digests = []
    for tensor in manifest.tensors:
        cuts = range(tensor.offset, tensor.end, 1)
        starts = [tensor.offset] + [c for c in cuts if c % manifest.chunk_bytes == 0 and c]
        starts = sorted(set(starts))
        ends = [*starts[1:], tensor.end]
        pieces = [memoryview(data)[a:b] for a, b in zip(starts, ends) if b > a]
        digests.append(digest_of_checksums([chunk_checksum(piece) for piece in pieces]))
    return manifest.with_digests(digests)


def encoded_payloads(plan: ChunkPlan, seed: int) -> list[bytes]:
    """A stand-in for an encoded model: each chunk's payload of its own length (none too)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, plan.total)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]


@dataclass(frozen=True)
class Fault:
    kind: str  # "cut": the link drops; "flip": one byte is corrupted in transit
    lane: int
    position: int  # byte of this connection's sender-to-receiver stream
    mask: int = 0xFF


class Link:
    """One connection of one lane (h11's ConnectionPair idea): bytes from sender to receiver
    not yet delivered, and ACKs the other way. The receiver speaks first (an ACK saying how
    much of the lane it holds); acks travel back only when the sender's turn comes, so the
    link also delays them."""

    def __init__(self, pair: Pair, lane: int, fault: Fault | None) -> None:
        self.pair, self.lane, self.fault = pair, lane, fault
        self.window = pair.schedule.windows[lane]
        self.reader = FrameReader(self._destination)
        self.pending: list = []
        self.wire = bytearray()
        self.acks: deque[int] = deque([pair.ledger.held(lane)])
        self.resumed = self.end_sent = self.ended = self.broken = False
        self.delivered = 0
        self.landing = bytearray(64)  # an encoded chunk lands in its lane's buffer

    def _destination(self, header: FrameHeader) -> memoryview:
        chunk = self.pair.ledger.expect(header, self.lane)
        self.pending.append(chunk)
        if self.pair.encoded is not None:
            return memoryview(self.landing)[: header.length]
        return memoryview(self.pair.sink)[chunk.offset : chunk.offset + chunk.length]

    def _on_frame(self, frame) -> None:
        if frame.header.kind is Kind.END:
            self.ended = True
            return
        if frame.header.kind is not Kind.DATA:
            raise RemoteProtocolError(f"receiver got {frame.header.kind.name}")
        chunk = self.pending.pop()
        if self.pair.encoded is not None:
            self.pair.received[chunk.seq] = bytes(frame.landed)
        else:
            self.pair.digests.landed(chunk, frame.landed, frame.checksum)
        self.pair.ledger.commit(chunk, frame.checksum, frame.header.length, self.lane)
        self.acks.append(self.pair.ledger.held(self.lane))

    def _sender_turn(self) -> None:
        while self.acks:
            held = self.acks.popleft()
            if not self.resumed:
                before = self.window.statistics().bytes_resent
                self.window.resume(held)
                self.pair.resent_per_resume.append(self.window.statistics().bytes_resent - before)
                self.resumed = True
            else:
                self.window.on_ack(held)
        if not self.resumed:
            return
        while self.window.has_room():
            chunk = self.window.take()
            payload = self.pair.payload(chunk)
            header = FrameHeader.data(chunk.seq, len(payload), chunk_checksum(memoryview(payload)))
            self.wire += header.encode() + payload
        if self.window.done and not self.end_sent:
            self.wire += control_frame(Kind.END)
            self.end_sent = True

    def step(self, piece_bytes: int) -> None:
        """The sender's turn, then up to `piece_bytes` reach the receiver (or the fault strikes)."""
        self._sender_turn()
        piece = bytearray(self.wire[:piece_bytes])
        del self.wire[:piece_bytes]
        fault = self.fault
        cut = (
            fault is not None
            and fault.kind == "cut"
            and self.delivered + len(piece) > fault.position
        )
        if cut:
            piece = piece[: fault.position - self.delivered]
        elif (
            fault is not None
            and fault.kind == "flip"
            and self.delivered <= fault.position < self.delivered + len(piece)
        ):
            piece[fault.position - self.delivered] ^= fault.mask
        try:
            feed(self.reader, bytes(piece), on_frame=self._on_frame)
        except (RemoteProtocolError, IntegrityError):
            self.broken = True  # the receiver drops a connection that broke the protocol
        self.delivered += len(piece)
        self.broken |= cut

    @property
    def idle(self) -> bool:
        return not self.wire and not self.acks


class Pair:
    """A sender's schedule and a receiver's ledger, joined by one link per lane."""

    def __init__(
        self,
        manifest: Manifest,
        source: bytes,
        window_bytes: int,
        lanes: int = 1,
        encoded: list[bytes] | None = None,
    ) -> None:
        self.manifest, self.source, self.encoded = manifest, source, encoded
        plan = ChunkPlan(manifest)
        self.schedule = SendSchedule(plan, window_bytes, lanes, lambda c: len(self.payload(c)))
        if encoded is None:
            self.ledger = ReceiveLedger(plan, lanes)
        else:
            digest = digest_of_checksums([chunk_checksum(memoryview(p)) for p in encoded])
            self.ledger = ReceiveLedger(
                plan, lanes, payload_limit=lambda c: 64, stream_digest=digest
            )
        assert self.ledger.lanes == len(self.schedule.windows)
        self.sink = bytearray(len(source))
        self.received: dict[int, bytes] = {}
        self.digests = DigestCheck(plan)
        self.resent_per_resume: list[int] = []
        self.connections = 0

    def payload(self, chunk) -> bytes:
        if self.encoded is not None:
            return self.encoded[chunk.seq]
        return self.source[chunk.offset : chunk.offset + chunk.length]

    def run(self, faults: list[Fault], speeds: list[int]) -> None:
        """Every lane moves `speeds[lane]` bytes a turn; a lane whose connection breaks reconnects
        and meets its next fault. Returns once every lane's receiver saw END."""
        lanes = self.ledger.lanes
        waiting = {
            lane: deque(f for f in faults if f.lane % lanes == lane) for lane in range(lanes)
        }
        links = [self._connect(lane, waiting[lane]) for lane in range(lanes)]
        for _ in range(MAX_STEPS):
            if all(link.ended for link in links):
                return
            for lane, link in enumerate(links):
                if not link.ended:
                    link.step(speeds[lane % len(speeds)])
                if link.broken:
                    links[lane] = self._connect(lane, waiting[lane])
        raise AssertionError("the transfer made no end")

    def _connect(self, lane: int, faults: deque[Fault]) -> Link:
        self.connections += 1
        return Link(self, lane, faults.popleft() if faults else None)


names = st.integers(0, 10**6).map(lambda k: f"t{k}")
tensor_layouts = st.lists(
    st.tuples(
        names,
        st.sampled_from(sorted(DTYPES)),
        st.sampled_from([(), (0,), (1,), (7,), (33,), (130,), (2, 45)]),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda t: t[0],
)
faults = st.builds(
    Fault,
    st.sampled_from(["cut", "flip"]),
    st.integers(0, 3),
    st.integers(0, 4000),
    st.integers(1, 255),
)


@given(
    layout=tensor_layouts,
    chunk_bytes=st.integers(1, 32).map(lambda k: 8 * k),
    window_bytes=st.integers(1, 300),
    lanes=st.integers(1, 4),
    fault_list=st.lists(faults, max_size=6),
    speeds=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    encoded=st.booleans(),
)
def test_model_arrives_bit_identical_resending_at_most_one_window_per_resume(
    layout, chunk_bytes, window_bytes, lanes, fault_list, speeds, seed, encoded
):
    manifest = Manifest.build(layout, chunk_bytes)
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, manifest.total_bytes, dtype=np.uint8).tobytes()
    payloads = encoded_payloads(ChunkPlan(manifest), seed) if encoded else None
    pair = Pair(with_digests(manifest, source), source, window_bytes, lanes, payloads)
    pair.run(fault_list, speeds)
    assert pair.schedule.done and pair.ledger.done
    if payloads is None:
        assert bytes(pair.sink) == source  # and every tensor matched its digest on the way
    else:
        assert [pair.received[seq] for seq in range(len(payloads))] == payloads
    wire = sum(map(len, payloads)) if payloads is not None else manifest.total_bytes
    largest = max(map(len, payloads), default=0) if payloads is not None else chunk_bytes
    assert all(resent <= window_bytes + largest for resent in pair.resent_per_resume)
    statistics = pair.schedule.statistics()
    assert statistics.bytes_acked == wire
    assert statistics.bytes_sent == wire + statistics.bytes_resent
    assert statistics.resumes <= pair.connections - pair.ledger.lanes
    assert pair.ledger.bytes_received >= wire
    assert pair.ledger.raw_bytes_received >= manifest.total_bytes


def test_a_faster_lane_carries_more_chunks_and_every_lane_ends_together():
    manifest = Manifest.build([("a", "U8", (64 * 100,))], 64)
    source = bytes(range(256)) * 25
    pair = Pair(with_digests(manifest, source), source, window_bytes=8 * 64, lanes=2)
    pair.run([], speeds=[400, 100])  # lane 0 moves four times the bytes of lane 1
    assert bytes(pair.sink) == source
    fast, slow = (window.statistics().bytes_acked // 64 for window in pair.schedule.windows)
    assert fast + slow == 100 and fast >= 3 * slow > 0


def test_a_corrupt_chunk_is_resent_not_kept():
    manifest = Manifest.build([("a", "U8", (64,))], 16)
    source = bytes(range(64))
    pair = Pair(with_digests(manifest, source), source, window_bytes=4 * 16 - 1)
    pair.run([Fault("flip", 0, 32 + 16 + 32 + 5)], speeds=[10_000])  # payload of chunk 1
    assert bytes(pair.sink) == source and pair.connections == 2
    assert pair.resent_per_resume[-1] == 3 * 16  # chunks 1..3 were in flight: one window at most


@given(st.integers(0, 20), st.integers(0, 20))
def test_ack_outside_the_window_is_a_remote_protocol_error(taken, ack):
    plan = ChunkPlan(Manifest.build([("a", "U8", (160,))], 8))
    window = SendSchedule(plan, window_bytes=20 * 8).windows[0]
    for _ in range(taken):
        window.take()
    if ack <= taken:
        window.on_ack(ack)
        assert window.acked == ack
        with pytest.raises(RemoteProtocolError):
            window.on_ack(ack - 1) if ack else window.on_ack(taken + 1)
    else:
        with pytest.raises(RemoteProtocolError):
            window.on_ack(ack)


@given(st.sampled_from(list(Kind)), st.integers(0, 3), st.integers(0, 100))
def test_ledger_accepts_only_a_planned_chunk_of_its_exact_length(kind, seq, length):
    manifest = Manifest.build([("a", "F32", (30,)), ("b", "U8", (20,))], 64)  # 140 bytes
    ledger = ReceiveLedger(ChunkPlan(manifest))
    header = FrameHeader(kind, seq, length)
    if (kind, seq, length) in ((Kind.DATA, 0, 64), (Kind.DATA, 1, 64), (Kind.DATA, 2, 12)):
        assert ledger.expect(header).seq == seq
    else:
        with pytest.raises(RemoteProtocolError):
            ledger.expect(header)


def test_an_encoded_chunk_may_be_any_length_up_to_its_limit():
    manifest = Manifest.build([("a", "F32", (30,))], 64)
    ledger = ReceiveLedger(ChunkPlan(manifest), payload_limit=lambda chunk: 10)
    assert ledger.expect(FrameHeader(Kind.DATA, 0, 10)).seq == 0
    with pytest.raises(RemoteProtocolError, match="at most 10"):
        ledger.expect(FrameHeader(Kind.DATA, 1, 11))


def test_an_encoded_stream_that_does_not_match_its_digest_is_refused_at_its_end():
    manifest = Manifest.build([("a", "U8", (16,))], 8)
    payloads = [b"first", b"second"]
    digest = digest_of_checksums([chunk_checksum(memoryview(p)) for p in payloads])
    ledger = ReceiveLedger(ChunkPlan(manifest), payload_limit=lambda c: 8, stream_digest=digest)
    chunk = ledger.expect(FrameHeader(Kind.DATA, 0, 5))
    ledger.commit(chunk, chunk_checksum(memoryview(b"first")), 5)
    chunk = ledger.expect(FrameHeader(Kind.DATA, 1, 6))
    with pytest.raises(DigestError, match="announced"):
        ledger.commit(chunk, chunk_checksum(memoryview(b"tamper")), 6)


def test_each_tensor_is_checked_once_when_its_last_piece_lands_and_empty_ones_at_once():
    layout = [("e0", "F32", (0,)), ("e1", "I64", (3, 0)), ("a", "U8", (9,)), ("b", "U8", (3,))]
    data = bytes(range(12))
    manifest = with_digests(Manifest.build(layout, 8), data)
    plan = ChunkPlan(manifest)
    digests = DigestCheck(plan)  # the empty tensors match their digests already
    first = plan.chunk(0)
    digests.landed(first, memoryview(data[:8]), chunk_checksum(memoryview(data[:8])))
    last = plan.chunk(1)  # the rest of "a" and all of "b": two pieces, hashed each
    digests.landed(last, memoryview(data[8:]), chunk_checksum(memoryview(data[8:])))
    checked = DigestCheck(plan)
    checked.landed(first, memoryview(data[:8]))
    with pytest.raises(DigestError, match="'b'"):  # "a" is whole and right; "b" is not
        checked.landed(last, memoryview(data[8:9] + b"xyz"))
    tampered = DigestCheck(plan)
    tampered.landed(last, memoryview(data[8:]))  # "b" complete and right, "a" still missing
    with pytest.raises(DigestError, match="'a'"):
        tampered.landed(first, memoryview(b"tampered"))


def test_a_corrupt_header_naming_another_chunk_is_refused_not_misplaced():
    manifest = Manifest.build([("a", "U8", (64,))], 16)
    source = bytes(range(64))
    pair = Pair(with_digests(manifest, source), source, window_bytes=4 * 16)
    pair.run([Fault("flip", 0, 16, 0x01)], speeds=[10_000])  # chunk 0's header now says seq 1
    assert bytes(pair.sink) == source and pair.connections == 2
