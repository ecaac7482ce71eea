"""The sans-I/O transfer core: a SendSchedule's lanes and a ReceiveLedger joined in memory by
links that hypothesis cuts, delays, corrupts and runs at different speeds. The model must
arrive bit-identical, and each resume may re-send at most one window (DESIGN.md invariant 5).
No sockets, no sleeps."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import feed
from hypothesis import given
from hypothesis import strategies as st

from hauler.core.errors import IntegrityError, RemoteProtocolError
from hauler.model import DTYPES, ChunkPlan, Manifest, chunk_checksum
from hauler.model.manifest import digest_of_checksums
from hauler.transfer import (
    FrameHeader,
    FrameReader,
    Kind,
    ReceiveLedger,
    SendSchedule,
    control_frame,
)

MAX_STEPS = 100_000


def with_digests(manifest: Manifest, data: bytes) -> Manifest:
    digests = []
    for tensor in manifest.tensors:
        view = memoryview(data)[tensor.offset : tensor.offset + tensor.length]
        step = manifest.chunk_bytes
        digests.append(
            digest_of_checksums(
                [chunk_checksum(view[o : o + step]) for o in range(0, tensor.length, step)]
            )
        )
    return manifest.with_digests(digests)


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

    def _destination(self, header: FrameHeader) -> memoryview:
        chunk = self.pair.ledger.expect(header, self.lane)
        self.pending.append(chunk)
        start = self.pair.manifest.tensors[chunk.tensor].offset + chunk.offset
        return memoryview(self.pair.sink)[start : start + chunk.length]

    def _on_frame(self, frame) -> None:
        if frame.header.kind is Kind.END:
            self.ended = True
            return
        if frame.header.kind is not Kind.DATA:
            raise RemoteProtocolError(f"receiver got {frame.header.kind.name}")
        completed = self.pair.ledger.commit(self.pending.pop(), frame.checksum, self.lane)
        self.pair.completed_tensors.extend(completed)
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
            assert self.window.in_flight <= self.window.window_chunks
            start = self.pair.manifest.tensors[chunk.tensor].offset + chunk.offset
            payload = self.pair.source[start : start + chunk.length]
            header = FrameHeader.data(
                chunk.tensor, chunk.offset, chunk.length, chunk_checksum(memoryview(payload))
            )
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
        self, manifest: Manifest, source: bytes, window_chunks: int, lanes: int = 1
    ) -> None:
        self.manifest, self.source = manifest, source
        self.schedule = SendSchedule(ChunkPlan(manifest), window_chunks, lanes)
        self.ledger = ReceiveLedger(ChunkPlan(manifest), lanes)
        assert self.ledger.lanes == len(self.schedule.windows)
        self.sink = bytearray(len(source))
        self.completed_tensors: list[int] = list(self.ledger.begin())
        self.resent_per_resume: list[int] = []
        self.connections = 0

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
    window_chunks=st.integers(1, 8),
    lanes=st.integers(1, 4),
    fault_list=st.lists(faults, max_size=6),
    speeds=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_model_arrives_bit_identical_resending_at_most_one_window_per_resume(
    layout, chunk_bytes, window_chunks, lanes, fault_list, speeds, seed
):
    manifest = Manifest.build(layout, chunk_bytes)
    source = (
        np.random.default_rng(seed).integers(0, 256, manifest.total_bytes, dtype=np.uint8).tobytes()
    )
    pair = Pair(with_digests(manifest, source), source, window_chunks, lanes)
    pair.run(fault_list, speeds)
    assert pair.schedule.done and pair.ledger.done
    assert bytes(pair.sink) == source
    assert sorted(pair.completed_tensors) == list(
        range(len(manifest.tensors))
    )  # each verified once
    assert all(resent <= window_chunks * chunk_bytes for resent in pair.resent_per_resume)
    statistics = pair.schedule.statistics()
    assert statistics.bytes_acked == manifest.total_bytes
    assert statistics.bytes_sent == manifest.total_bytes + statistics.bytes_resent
    assert statistics.resumes <= pair.connections - pair.ledger.lanes
    assert pair.ledger.bytes_received >= manifest.total_bytes


def test_a_faster_lane_carries_more_chunks_and_every_lane_ends_together():
    manifest = Manifest.build([("a", "U8", (64 * 100,))], 64)
    source = bytes(range(256)) * 25
    pair = Pair(with_digests(manifest, source), source, window_chunks=8, lanes=2)
    pair.run([], speeds=[400, 100])  # lane 0 moves four times the bytes of lane 1
    assert bytes(pair.sink) == source
    fast, slow = (window.statistics().bytes_acked // 64 for window in pair.schedule.windows)
    assert fast + slow == 100 and fast >= 3 * slow > 0


def test_a_corrupt_chunk_is_resent_not_kept():
    manifest = Manifest.build([("a", "U8", (64,))], 16)
    source = bytes(range(64))
    pair = Pair(with_digests(manifest, source), source, window_chunks=4)
    pair.run([Fault("flip", 0, 32 + 16 + 32 + 5)], speeds=[10_000])  # payload of chunk 1
    assert bytes(pair.sink) == source and pair.connections == 2
    assert pair.resent_per_resume[-1] == 3 * 16  # chunks 1..3 were in flight: one window at most


@given(st.integers(0, 20), st.integers(0, 20))
def test_ack_outside_the_window_is_a_remote_protocol_error(taken, ack):
    plan = ChunkPlan(Manifest.build([("a", "U8", (160,))], 8))
    window = SendSchedule(plan, window_chunks=20).windows[0]
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


@given(st.sampled_from(list(Kind)), st.integers(0, 3), st.integers(0, 200), st.integers(0, 100))
def test_ledger_accepts_only_the_next_planned_chunk(kind, tensor, offset, length):
    manifest = Manifest.build([("a", "F32", (30,)), ("b", "U8", (20,))], 64)
    ledger = ReceiveLedger(ChunkPlan(manifest))
    header = FrameHeader(kind, tensor, offset, length)
    if (kind, tensor, offset, length) == (Kind.DATA, 0, 0, 64):
        assert ledger.expect(header).seq == 0
    else:
        with pytest.raises(RemoteProtocolError):
            ledger.expect(header)


def test_ledger_reports_each_tensor_complete_once_and_empty_ones_without_a_chunk():
    manifest = Manifest.build(
        [("e0", "F32", (0,)), ("e1", "I64", (3, 0)), ("a", "U8", (9,)), ("e2", "F16", (0,))], 8
    )
    ledger = ReceiveLedger(ChunkPlan(manifest))
    reported = list(ledger.begin())
    assert (
        {0, 1} <= set(reported) <= {0, 1, 3}
    )  # the leading empty tensors at least, before any chunk
    first = ledger.expect(FrameHeader(Kind.DATA, 2, 0, 8))
    reported += ledger.commit(first, 0)
    assert 2 not in reported  # half of it has landed
    last = ledger.expect(FrameHeader(Kind.DATA, 2, 8, 1))
    reported += ledger.commit(last, 0)
    assert sorted(reported) == [0, 1, 2, 3] and ledger.done
    with pytest.raises(RemoteProtocolError):
        ledger.expect(FrameHeader(Kind.DATA, 2, 8, 1))  # nothing more is expected


def test_ledger_refuses_a_tensor_whose_digest_does_not_match():
    data = bytes(range(24))
    manifest = with_digests(Manifest.build([("a", "U8", (16,)), ("b", "U8", (8,))], 8), data)
    ledger = ReceiveLedger(ChunkPlan(manifest))
    chunk = ledger.expect(FrameHeader(Kind.DATA, 0, 0, 8))
    ledger.commit(chunk, chunk_checksum(memoryview(data[:8])))
    chunk = ledger.expect(FrameHeader(Kind.DATA, 0, 8, 8))
    with pytest.raises(IntegrityError, match="'a'"):
        ledger.commit(chunk, chunk_checksum(memoryview(b"tampered")))


def test_a_corrupt_header_naming_another_chunk_is_refused_not_misplaced():
    manifest = Manifest.build([("a", "U8", (64,))], 16)
    source = bytes(range(64))
    pair = Pair(with_digests(manifest, source), source, window_chunks=4)
    pair.run([Fault("flip", 0, 12, 0x10)], speeds=[10_000])  # chunk 0's header now says offset 16
    assert bytes(pair.sink) == source and pair.connections == 2
