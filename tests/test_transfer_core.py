"""The sans-I/O transfer core: a SendWindow and a ReceiveLedger joined in memory by a link
that hypothesis cuts, delays and corrupts. The model must arrive bit-identical, and each
resume may re-send at most one window (DESIGN.md invariant 5). No sockets, no sleeps."""

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
from hauler.transfer import FrameHeader, FrameReader, Kind, ReceiveLedger, SendWindow


def with_digests(manifest: Manifest, data: bytes) -> Manifest:
    digests = []
    for tensor in manifest.tensors:
        view = memoryview(data)[tensor.offset : tensor.offset + tensor.length]
        step = manifest.chunk_bytes
        digests.append(digest_of_checksums([chunk_checksum(view[o : o + step]) for o in range(0, tensor.length, step)]))
    return manifest.with_digests(digests)


@dataclass(frozen=True)
class Fault:
    kind: str  # "cut": the link drops; "flip": one byte is corrupted in transit
    position: int  # byte of this connection's sender-to-receiver stream
    mask: int = 0xFF


class Pair:
    """A sender core and a receiver core joined by an in-memory link (h11's ConnectionPair idea).

    The receiver speaks first on every connection (an ACK naming where to start); the
    sender resumes its window there. Acks travel back only when `deliver_acks` runs,
    so the link also delays them."""

    def __init__(self, manifest: Manifest, source: bytes, window_chunks: int) -> None:
        self.manifest, self.source = manifest, source
        self.window = SendWindow(ChunkPlan(manifest), window_chunks)
        self.ledger = ReceiveLedger(ChunkPlan(manifest))
        self.sink = bytearray(len(source))
        self.completed_tensors: list[int] = list(self.ledger.begin())
        self.resent_per_resume: list[int] = []
        self.connections = 0

    def connect(self) -> None:
        self.connections += 1
        self.reader = FrameReader(self._destination)
        self.pending: list = []
        self.wire = bytearray()  # sender -> receiver, not yet delivered
        self.acks: deque[int] = deque([self.ledger.next_seq])  # receiver -> sender
        self.resumed = False

    def _destination(self, header: FrameHeader) -> memoryview:
        chunk = self.ledger.expect(header)
        self.pending.append(chunk)
        start = self.manifest.tensors[chunk.tensor].offset + chunk.offset
        return memoryview(self.sink)[start : start + chunk.length]

    def _on_frame(self, frame) -> None:
        if frame.header.kind is not Kind.DATA:
            raise RemoteProtocolError(f"receiver got {frame.header.kind.name}")
        self.completed_tensors.extend(self.ledger.commit(self.pending.pop(), frame.header.checksum))
        self.acks.append(self.ledger.next_seq)

    def deliver_acks(self) -> None:
        while self.acks:
            seq = self.acks.popleft()
            if not self.resumed:
                before = self.window.statistics().bytes_resent
                self.window.resume(seq)
                self.resent_per_resume.append(self.window.statistics().bytes_resent - before)
                self.resumed = True
            else:
                self.window.on_ack(seq)

    def send(self) -> None:
        while self.window.has_room():
            chunk = self.window.take()
            assert self.window.next_seq - self.window.acked_seq <= self.window.window_chunks
            start = self.manifest.tensors[chunk.tensor].offset + chunk.offset
            payload = self.source[start : start + chunk.length]
            header = FrameHeader(Kind.DATA, chunk.tensor, chunk.offset, chunk.length,
                                 chunk_checksum(memoryview(payload)))
            self.wire += header.encode() + payload

    def run_connection(self, fault: Fault | None, piece_bytes: int) -> None:
        """Move bytes until the transfer is done or the fault ends this connection."""
        self.connect()
        delivered = 0
        while True:
            self.deliver_acks()
            if self.window.done:
                return
            self.send()
            assert self.wire, "deadlock: window full, nothing in flight, no ack coming"
            piece = bytearray(self.wire[:piece_bytes])
            del self.wire[:piece_bytes]
            cut = fault is not None and fault.kind == "cut" and delivered + len(piece) > fault.position
            if cut:
                piece = piece[: fault.position - delivered]
            elif fault is not None and fault.kind == "flip" and delivered <= fault.position < delivered + len(piece):
                piece[fault.position - delivered] ^= fault.mask
            try:
                feed(self.reader, bytes(piece), on_frame=self._on_frame)
            except (RemoteProtocolError, IntegrityError):
                return  # the receiver drops a connection that broke the protocol
            delivered += len(piece)
            if cut:
                return


names = st.integers(0, 10**6).map(lambda k: f"t{k}")
tensor_layouts = st.lists(
    st.tuples(names, st.sampled_from(sorted(DTYPES)), st.sampled_from([(), (0,), (1,), (7,), (33,), (130,), (2, 45)])),
    min_size=1, max_size=5, unique_by=lambda t: t[0],
)
faults = st.builds(Fault, st.sampled_from(["cut", "flip"]), st.integers(0, 4000), st.integers(1, 255))


@given(layout=tensor_layouts, chunk_bytes=st.integers(1, 32).map(lambda k: 8 * k), window_chunks=st.integers(1, 8),
       fault_list=st.lists(faults, max_size=4), piece_bytes=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_model_arrives_bit_identical_resending_at_most_one_window_per_resume(
        layout, chunk_bytes, window_chunks, fault_list, piece_bytes, seed):
    manifest = Manifest.build(layout, chunk_bytes)
    source = np.random.default_rng(seed).integers(0, 256, manifest.total_bytes, dtype=np.uint8).tobytes()
    pair = Pair(with_digests(manifest, source), source, window_chunks)
    for fault in [*fault_list, None]:
        pair.run_connection(fault, piece_bytes)
        if pair.window.done:
            break
    assert pair.window.done and pair.ledger.done
    assert bytes(pair.sink) == source
    assert sorted(pair.completed_tensors) == list(range(len(manifest.tensors)))  # each verified once
    assert all(resent <= window_chunks * chunk_bytes for resent in pair.resent_per_resume)
    statistics = pair.window.statistics()
    assert statistics.bytes_acked == manifest.total_bytes
    assert statistics.bytes_sent == manifest.total_bytes + statistics.bytes_resent
    assert statistics.resumes <= pair.connections - 1
    assert pair.ledger.bytes_received >= manifest.total_bytes


def test_a_corrupt_chunk_is_resent_not_kept():
    manifest = Manifest.build([("a", "U8", (64,))], 16)
    source = bytes(range(64))
    pair = Pair(with_digests(manifest, source), source, window_chunks=4)
    pair.run_connection(Fault("flip", 32 + 16 + 32 + 5), piece_bytes=10_000)  # payload of chunk 1
    assert pair.ledger.next_seq == 1 and not pair.window.done
    pair.run_connection(None, piece_bytes=10_000)
    assert pair.window.done and bytes(pair.sink) == source
    assert pair.resent_per_resume[-1] == 3 * 16  # chunks 1..3 were in flight: one window at most


@given(st.integers(0, 20), st.integers(0, 20))
def test_ack_outside_the_window_is_a_remote_protocol_error(taken, ack):
    plan = ChunkPlan(Manifest.build([("a", "U8", (160,))], 8))
    window = SendWindow(plan, window_chunks=20)
    for _ in range(taken):
        window.take()
    if ack <= taken:
        window.on_ack(ack)
        assert window.acked_seq == ack
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
    manifest = Manifest.build([("e0", "F32", (0,)), ("e1", "I64", (3, 0)), ("a", "U8", (9,)), ("e2", "F16", (0,))], 8)
    ledger = ReceiveLedger(ChunkPlan(manifest))
    reported = list(ledger.begin())
    assert {0, 1} <= set(reported) <= {0, 1, 3}  # the leading empty tensors at least, before any chunk
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
