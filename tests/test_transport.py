"""The data plane's contract, run over every backend (plain TCP and mutual TLS on loopback
sockets, and the in-process pipe): models arrive bit-identical whatever their layout, and a
peer that breaks the protocol is refused before a byte of its payload is placed, and
disconnected. Then what only the in-process pipe promises: one copy per payload, bounded
queues, and `close` / `abort` semantics a socket would have."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import pytest
from helpers import MIXED_LAYOUT, SMALL_CHUNK, create_model, tensor_bytes

from hauler.core.config import DataPlane, Timeouts, TlsFiles
from hauler.core.errors import (
    ConnectionLost,
    HaulerError,
    IntegrityError,
    RemoteProtocolError,
    TransferTimeout,
)
from hauler.model import ChunkPlan, Manifest, ModelFile, chunk_checksum
from hauler.security import Role
from hauler.security.ca import (
    cert_pem,
    create_authority,
    issue,
    write_file,
    write_issued,
)
from hauler.server.access import AccessPolicy
from hauler.server.transfers import TransferRegistry
from hauler.transfer import (
    FileSink,
    FrameHeader,
    Hello,
    Kind,
    LaneBuffers,
    ReceiveLedger,
    SendSchedule,
    ack_frame,
    control_frame,
)
from hauler.transfer.frames import HEADER, MAX_ENCODED_CHUNK_BYTES
from hauler.transport import (
    Connection,
    DataAddress,
    InprocListener,
    Listener,
    connect,
    connect_inproc,
    connection_pair,
    fetch_model,
    listen,
    listen_inproc,
    open_transfer,
    push_model,
    receive_model,
    send_model,
)
from hauler.transport.connection import WRITE_HIGH_WATER, ConnectionHandler

HOST = "127.0.0.1"
TIMEOUTS = Timeouts(streaming_read_timeout=10, streaming_ack_wait=10, communication_timeout=10)
SHORT = Timeouts(streaming_read_timeout=0.2, streaming_ack_wait=0.2, communication_timeout=0.2)


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, TlsFiles]:
    """Kits of one project CA: the server's and a site's."""
    root, authority = tmp_path_factory.mktemp("kits"), create_authority("transport-test")
    kits = {}
    for name, role in [("server", Role.SERVER), ("site-1", Role.SITE)]:
        folder = root / name
        folder.mkdir()
        write_file(folder / "ca.pem", cert_pem(authority.cert), mode=0o644)
        write_issued(
            issue(authority, name, org="test", role=role), folder / "cert.pem", folder / "key.pem"
        )
        kits[name] = TlsFiles(
            ca_cert=folder / "ca.pem", cert=folder / "cert.pem", key=folder / "key.pem"
        )
    return kits


@dataclass(frozen=True)
class Backend:
    """One way the data plane runs, as a test reaches it: `listen`, then `connect` to the
    listener."""

    name: str
    server_tls: TlsFiles | None = None
    site_tls: TlsFiles | None = None

    async def listen(self, handler: ConnectionHandler) -> Listener | InprocListener:
        if self.name == "inproc":
            return await listen_inproc("", handler)
        return await listen(HOST, 0, handler, tls=self.server_tls)

    async def connect(self, listener: Listener | InprocListener) -> Connection:
        if self.name == "inproc":
            return await connect_inproc(listener.name)
        return await connect(HOST, listener.port, tls=self.site_tls)

    async def open_transfer(
        self, listener: Listener | InprocListener, transfer_id: str, lane: int = 0
    ) -> Connection:
        """Dial and bind the connection to one lane of `transfer_id` (`open_transfer` on
        sockets)."""
        if self.name == "inproc":
            connection = await connect_inproc(listener.name)
            connection.write(Hello(transfer_id, lane).encode())
            return connection
        return await open_transfer(HOST, listener.port, transfer_id, lane=lane, tls=self.site_tls)


SOCKETS = ["tcp", "tls"]  # for tests of what only a socket has: `DataAddress` dials host and port


@pytest.fixture(params=[*SOCKETS, "inproc"])
def backend(request, kits) -> Backend:
    """Every way the data plane runs: plaintext TCP, mutual TLS, in process."""
    if request.param == "tls":
        return Backend("tls", kits["server"], kits["site-1"])
    return Backend(request.param)


def registry(
    *, lanes: int = 1, timeouts: Timeouts = TIMEOUTS, hello_timeout_s: float = 1.0
) -> TransferRegistry:
    """The server's transfers: chunks of SMALL_CHUNK, `lanes` parallel connections per transfer."""
    dataplane = DataPlane(
        chunk_bytes=SMALL_CHUNK,
        window_bytes=4 * SMALL_CHUNK,
        connections=lanes,
        retry_backoff_s=0.05,
        hello_timeout_s=hello_timeout_s,
    )
    return TransferRegistry(dataplane, timeouts, AccessPolicy([]))


@pytest.fixture
def source(tmp_path):
    with create_model(tmp_path / "source.safetensors", MIXED_LAYOUT, seed=11) as model:
        yield model


@pytest.fixture
def sink(tmp_path, source):
    with ModelFile.create(tmp_path / "sink.safetensors", source.manifest) as model:
        yield model


def data_frame(model: ModelFile, chunk) -> bytes:
    payload = bytes(model.chunk_view(chunk))
    checksum = chunk_checksum(memoryview(payload))
    return FrameHeader.data(chunk.seq, len(payload), checksum).encode() + payload


def window(manifest: Manifest, window_bytes: int = 4 * SMALL_CHUNK):
    """A sender's one lane of a transfer of `manifest`."""
    return SendSchedule(ChunkPlan(manifest), window_bytes).windows[0]


class Recorder:
    """A sink that lands each lane's chunk in a buffer of its own (as the server's upload sink
    does) and records where it was asked to place what, and what it was handed, whole."""

    def __init__(self, manifest: Manifest, lanes: int = 1) -> None:
        self.buffers = LaneBuffers(lanes, manifest.chunk_bytes)
        self.asked: list[tuple[int, int]] = []  # (seq, lane)
        self.handed: list[tuple[int, bytes]] = []  # (seq, its payload once whole and checked)

    def landing(self, chunk, lane: int, nbytes: int) -> memoryview:
        self.asked.append((chunk.seq, lane))
        return self.buffers.landing(lane, nbytes)

    def landed(self, chunk, lane: int, view: memoryview, checksum: int) -> None:
        self.handed.append((chunk.seq, bytes(view)))


async def serve_once(backend: Backend, handler):
    """Listen for one connection; returns the listener and a future with the handler's result."""
    result = asyncio.get_running_loop().create_future()

    async def run(connection: Connection) -> None:
        try:
            result.set_result(await handler(connection))
        except asyncio.CancelledError:
            result.cancel()
            raise
        except Exception as error:
            result.set_exception(error)
            raise

    return await backend.listen(run), result


@pytest.mark.parametrize("window_bytes", [1, 16 * SMALL_CHUNK])
@pytest.mark.parametrize("direction", ["server_sends", "site_sends"])
async def test_model_arrives_bit_identical(backend, source, sink, direction, window_bytes):
    plan = ChunkPlan(source.manifest)
    ledger, landing = ReceiveLedger(plan), FileSink(sink, plan)

    async def send(connection):
        return await send_model(
            connection, source, window(source.manifest, window_bytes), timeouts=TIMEOUTS
        )

    async def receive(connection):
        await receive_model(connection, ledger, landing, timeouts=TIMEOUTS)

    listener, served = await serve_once(backend, send if direction == "server_sends" else receive)
    connection = await backend.connect(listener)
    try:
        dialled = await (receive if direction == "server_sends" else send)(connection)
        statistics = await served if direction == "server_sends" else dialled
        await served
    finally:
        connection.close()
        await listener.close()
    assert tensor_bytes(sink) == tensor_bytes(source)
    assert landing.digests.complete  # every tensor checked against its digest as it completed
    assert statistics.bytes_sent == statistics.bytes_acked == source.manifest.total_bytes
    assert statistics.bytes_resent == 0
    assert ledger.plan.total > 5  # several chunks, most of them across tensors


@pytest.mark.parametrize(
    "backend", SOCKETS, indirect=True
)  # fetch_model and push_model dial a DataAddress
@pytest.mark.parametrize("lanes", [1, 3])
async def test_registry_serves_a_download_and_takes_an_upload_chunk_by_chunk(
    backend, source, sink, lanes
):
    transfers = registry(lanes=lanes)
    listener = await backend.listen(transfers.handle)
    address = DataAddress(HOST, listener.port, backend.site_tls, transfers.dataplane)
    plan = ChunkPlan(source.manifest)
    landing = Recorder(source.manifest, lanes)
    try:
        download = transfers.offer("site-1", plan, source)
        assert download.lanes == lanes
        ledger = ReceiveLedger(plan, download.lanes)
        await fetch_model(address, download.id, ledger, FileSink(sink, plan), timeouts=TIMEOUTS)
        await download.wait(10, "download")
        assert tensor_bytes(sink) == tensor_bytes(source)
        assert download.bytes_done == source.manifest.total_bytes

        upload = transfers.expect("site-1", transfers.ledger_for(plan), landing)
        statistics = await push_model(
            address, upload.id, plan, source, upload.lanes, timeouts=TIMEOUTS
        )
        await upload.wait(10, "upload")
    finally:
        await listener.close()
    assert sorted(seq for seq, _ in landing.handed) == [
        chunk.seq for chunk in source.manifest.chunks()
    ]
    for seq, payload in landing.handed:  # each chunk was whole when it was handed on, exactly once
        assert payload == bytes(source.chunk_view(plan.chunk(seq)))
    assert statistics.bytes_resent == 0  # a clean link: nothing sent twice
    assert upload.statistics()["wire_bytes"] == source.manifest.total_bytes


async def test_a_download_is_done_only_once_every_connected_lane_has_had_its_end(
    backend, source, sink
):
    """Done is when the server may forget a transfer; a lane still owed its END would be cut
    off and, reconnecting, find no transfer."""
    transfers = registry(lanes=2)
    listener = await backend.listen(transfers.handle)
    plan = ChunkPlan(source.manifest)
    ledger, landing = ReceiveLedger(plan, 2), FileSink(sink, plan)
    try:
        download = transfers.offer("site-1", plan, source)
        late = await backend.open_transfer(listener, download.id, lane=1)  # connected, silent
        while download.connections < 1:
            await asyncio.sleep(0.001)
        first = await backend.open_transfer(listener, download.id, lane=0)
        await receive_model(first, ledger, landing, timeouts=TIMEOUTS, lane=0)  # all, then END
        assert ledger.done and ledger.held(0) == plan.total
        await asyncio.sleep(0.1)
        assert not download.done.done()  # lane 1 has not been told yet
        await receive_model(late, ledger, landing, timeouts=TIMEOUTS, lane=1)  # ACK, then END
        await download.wait(5, "download")
    finally:
        await listener.close()
    assert tensor_bytes(sink) == tensor_bytes(source)


def landed_at_server(recorder: Recorder, lane: int, prefix: bytes) -> bool:
    """Whether a chunk's first bytes are in its lane's buffer (False until its header is read)."""
    if not recorder.asked:
        return False
    return bytes(recorder.buffers.landing(lane, len(prefix))) == prefix


async def test_a_chunk_half_landed_on_one_lane_survives_a_chunk_on_another(backend, source):
    transfers = registry(lanes=2)
    listener = await backend.listen(transfers.handle)
    plan = ChunkPlan(source.manifest)
    landing = Recorder(source.manifest, 2)  # where the server lands upload chunks before folding
    try:
        upload = transfers.expect("site-1", transfers.ledger_for(plan), landing)
        first = [plan.chunk(0), plan.chunk(1)]  # lane 0 carries chunk 0, lane 1 chunk 1
        connections = [await backend.open_transfer(listener, upload.id, lane=k) for k in range(2)]
        for connection in connections:
            await connection.next_frame()  # each lane's receiver says where to start
        frames = [data_frame(source, chunk) for chunk in first]
        half = len(frames[0]) // 2
        connections[0].write(frames[0][:half])  # lane 0: header and part of its chunk...
        while not landed_at_server(landing, 0, frames[0][32:half]):
            await asyncio.sleep(0.001)  # ...until those bytes have landed at the server
        connections[1].write(frames[1])  # lane 1: a whole chunk
        assert (await connections[1].next_frame()).header.kind is Kind.ACK
        connections[0].write(frames[0][half:])  # lane 0: the rest of its chunk
        ack = await connections[0].next_frame()
        assert ack.header.kind is Kind.ACK and ack.header.seq == 1  # one chunk of lane 0 held
    finally:
        await listener.close()
    assert sorted(seq for seq, _ in landing.handed) == [0, 1]
    assert dict(landing.handed)[0] == frames[0][32:]  # lane 1's chunk did not overwrite it


async def test_a_chunk_arriving_on_one_lane_is_refused_on_another(backend, source):
    transfers = registry(lanes=2)
    listener = await backend.listen(transfers.handle)
    plan = ChunkPlan(source.manifest)
    landing = Recorder(source.manifest, 2)
    try:
        upload = transfers.expect("site-1", transfers.ledger_for(plan), landing)
        connections = [await backend.open_transfer(listener, upload.id, lane=k) for k in range(2)]
        for connection in connections:
            await connection.next_frame()
        frame = data_frame(source, plan.chunk(0))
        connections[0].write(frame[:40])  # chunk 0 begins on lane 0
        await asyncio.sleep(0.05)
        connections[1].write(frame)  # and again, whole, on lane 1
        with pytest.raises((RemoteProtocolError, ConnectionLost)):
            await connections[1].next_frame()
        connections[0].write(frame[40:])
        ack = await connections[0].next_frame()
        assert ack.header.kind is Kind.ACK and ack.header.seq == 1
    finally:
        await listener.close()
    assert [seq for seq, _ in landing.handed] == [0]


async def test_unknown_transfer_is_refused_with_a_reason(backend):
    listener = await backend.listen(registry().handle)
    try:
        connection = await backend.open_transfer(listener, secrets.token_hex(16))
        frame = await connection.next_frame()
        assert frame.header.kind is Kind.ERROR and b"unknown" in frame.payload
        with pytest.raises(ConnectionLost):
            await connection.next_frame()
    finally:
        await listener.close()


def bad_frames(manifest: Manifest) -> dict[str, tuple[bytes, str]]:
    """Frames a receiver must refuse before placing a byte, and what its refusal says."""
    plan = ChunkPlan(manifest)
    first = plan.chunk(0)
    payload = bytes(first.length)
    checksum = chunk_checksum(memoryview(payload))

    def header(seq: int, length: int, check: int = checksum) -> bytes:
        return FrameHeader(Kind.DATA, seq, length, check).encode()

    allows = "where this transfer allows"
    return {
        "seq_past_the_end": (header(plan.total, first.length) + payload, "not one of the model's"),
        "seq_far_out": (header(2**64 - 1, first.length) + payload, "not one of the model's"),
        "shorter_than_planned": (header(0, first.length - 8) + payload[:-8], allows),
        "longer_than_planned": (header(0, first.length + 8) + payload + bytes(8), allows),
        "past_max_frame_bytes": (header(0, MAX_ENCODED_CHUNK_BYTES + 1), "exceeds"),
    }


BAD = list(bad_frames(Manifest.build(MIXED_LAYOUT, SMALL_CHUNK)))


@pytest.mark.parametrize(
    "backend", ["tcp", "inproc"], indirect=True
)  # TLS moves the same bytes: 6 x 0.2 s saved
@pytest.mark.parametrize("bad", BAD)
async def test_data_frame_off_the_plan_is_refused_and_the_connection_closed(backend, source, bad):
    transfers = registry()
    listener = await backend.listen(transfers.handle)
    landing = Recorder(source.manifest)
    try:
        upload = transfers.expect(
            "site-1", transfers.ledger_for(ChunkPlan(source.manifest)), landing
        )
        connection = await backend.open_transfer(listener, upload.id)
        first = await connection.next_frame()
        assert (first.header.kind, first.header.seq) == (Kind.ACK, 0)  # where to start
        frame, reason = bad_frames(source.manifest)[bad]
        connection.write(frame)
        with pytest.raises((RemoteProtocolError, ConnectionLost)):  # the server hangs up on us
            await connection.next_frame()
        with pytest.raises(HaulerError) as raised:  # nobody comes back: the transfer fails
            await upload.wait(0.2, "upload")  # the server has hung up already: it knows why
        assert reason in str(raised.value)
    finally:
        await listener.close()
    assert landing.asked == [] and landing.handed == []  # no byte placed, nothing folded


@pytest.mark.parametrize(
    "frame", [ack_frame(0), control_frame(Kind.HELLO, b"{}")], ids=["ack", "hello"]
)
async def test_control_frame_sent_to_a_receiver_is_a_remote_protocol_error(
    backend, source, sink, frame
):
    plan = ChunkPlan(source.manifest)
    listener, served = await serve_once(
        backend,
        lambda connection: receive_model(
            connection, ReceiveLedger(plan), FileSink(sink, plan), timeouts=TIMEOUTS
        ),
    )
    connection = await backend.connect(listener)
    try:
        await connection.next_frame()
        connection.write(frame)
        with pytest.raises(RemoteProtocolError):
            await served
    finally:
        connection.close()
        await listener.close()


async def test_corrupt_chunk_is_never_consumed_and_is_resent_on_reconnect(backend, source):
    transfers = registry()
    listener = await backend.listen(transfers.handle)
    plan = ChunkPlan(source.manifest)
    landing = Recorder(source.manifest)
    try:
        upload = transfers.expect("site-1", transfers.ledger_for(plan), landing)
        connection = await backend.open_transfer(listener, upload.id)
        await connection.next_frame()
        chunk = plan.chunk(0)
        payload = bytes(source.chunk_view(chunk))
        header = FrameHeader.data(chunk.seq, chunk.length, chunk_checksum(memoryview(payload)))
        connection.write(header.encode() + payload[:-1] + bytes([payload[-1] ^ 1]))
        with pytest.raises((IntegrityError, ConnectionLost)):  # the server hangs up on us
            await connection.next_frame()
        assert landing.handed == []  # the corrupt chunk reached nothing
        again = await backend.open_transfer(listener, upload.id)  # the site reconnects, resumes
        await send_model(again, source, window(source.manifest), timeouts=TIMEOUTS)
        await upload.wait(10, "upload")
        again.close()
    finally:
        await listener.close()
    assert [seq for seq, _ in landing.handed] == list(range(plan.total))  # each once, in order


async def test_connection_that_never_says_hello_is_dropped(backend):
    listener = await backend.listen(registry(timeouts=SHORT, hello_timeout_s=0.2).handle)
    try:
        connection = await backend.connect(listener)
        async with asyncio.timeout(10):
            with pytest.raises((ConnectionLost, TransferTimeout)):
                await connection.next_frame()
    finally:
        await listener.close()


@pytest.mark.parametrize("side", ["receiver", "sender"])
async def test_silent_peer_times_out(backend, source, sink, side):
    listener, _ = await serve_once(
        backend, lambda connection: asyncio.sleep(30)
    )  # accepts, then says nothing
    connection = await backend.connect(listener)
    plan = ChunkPlan(source.manifest)
    try:
        async with asyncio.timeout(3):  # 15 x the configured silence
            with pytest.raises(TransferTimeout) as raised:
                if side == "receiver":
                    landing = FileSink(sink, plan)
                    await receive_model(connection, ReceiveLedger(plan), landing, timeouts=SHORT)
                else:
                    await send_model(connection, source, window(source.manifest), timeouts=SHORT)
        names = (
            {"streaming_read_timeout"}
            if side == "receiver"
            else {"communication_timeout", "streaming_ack_wait"}
        )
        assert raised.value.timeout_name in names
    finally:
        connection.close()
        await listener.close()


async def test_transfer_resumes_on_a_new_connection_resending_at_most_one_window(
    backend, source, sink
):
    plan = ChunkPlan(source.manifest)
    ledger, landing = ReceiveLedger(plan), FileSink(sink, plan)
    lane = window(source.manifest, 2 * SMALL_CHUNK)  # the sender's, kept across connections

    async def send(connection):
        await send_model(connection, source, lane, timeouts=TIMEOUTS)

    listener = await backend.listen(send)
    try:
        first = await backend.connect(listener)
        landed = []

        def drop_after_two(nbytes: int) -> None:
            landed.append(nbytes)
            if len(landed) == 2:
                first.fail(ConnectionLost("cut"))

        with pytest.raises((RemoteProtocolError, ConnectionLost)):
            await receive_model(
                first, ledger, landing, timeouts=TIMEOUTS, on_progress=drop_after_two
            )
        assert ledger.held(0) == 2
        second = await backend.connect(listener)
        await receive_model(second, ledger, landing, timeouts=TIMEOUTS)
        second.close()
    finally:
        await listener.close()
    assert tensor_bytes(sink) == tensor_bytes(source) and landing.digests.complete
    statistics = lane.statistics()
    assert statistics.resumes == 1 and statistics.bytes_resent <= 3 * SMALL_CHUNK
    assert statistics.bytes_sent == source.manifest.total_bytes + statistics.bytes_resent


async def test_each_end_knows_its_peer_by_certificate_or_not_at_all(backend):
    listener, served = await serve_once(
        backend, lambda connection: asyncio.sleep(0, connection.identity)
    )
    connection = await backend.connect(listener)
    try:
        seen_by_server, seen_by_site = await served, connection.identity
    finally:
        connection.close()
        await listener.close()
    if backend.name == "tls":
        assert (seen_by_server.name, seen_by_site.name) == ("site-1", "server")
    else:
        assert seen_by_server is seen_by_site is None  # plaintext and in-process: no certificate


# What only the in-process pipe promises: it stands where a socket would, with one copy per payload.


async def test_a_connection_pair_carries_a_model_without_a_listener(source, sink):
    """How the simulator runs a transfer: two ends, a sender on one and a receiver on the other."""
    sending, receiving = connection_pair()
    plan = ChunkPlan(source.manifest)
    ledger = ReceiveLedger(plan)
    async with asyncio.TaskGroup() as group:
        sent = group.create_task(
            send_model(sending, source, window(source.manifest), timeouts=TIMEOUTS)
        )
        group.create_task(receive_model(receiving, ledger, FileSink(sink, plan), timeouts=TIMEOUTS))
    assert tensor_bytes(sink) == tensor_bytes(source) and ledger.done
    assert sent.result().bytes_resent == 0
    assert sending.identity is receiving.identity is None
    sending.close()


async def test_inproc_payload_from_a_mapping_lands_in_a_mapping_in_one_copy(source, sink):
    sending, receiving = connection_pair()
    chunk = max(source.manifest.chunks(), key=lambda chunk: chunk.length)
    frames, reads = [], []
    receiving.set_handler(frames.append, lambda header: sink.chunk_view(chunk), reads.append)
    view = source.chunk_view(chunk)  # a view of the source's mapping
    sending.write(FrameHeader.data(chunk.seq, chunk.length, chunk_checksum(view)).encode())
    sending.write(view)
    assert reads == []  # nothing is delivered inside `write`
    while not frames:
        await asyncio.sleep(0)
    assert reads == [HEADER.size, chunk.length]  # the payload in one piece, into the mapping
    assert bytes(sink.chunk_view(chunk)) == bytes(view)
    sending.close()


async def test_inproc_writer_pauses_past_the_high_water_mark_until_delivered():
    sending, receiving = connection_pair()
    payload = memoryview(secrets.token_bytes(WRITE_HIGH_WATER + (1 << 20)))
    landing, frames = bytearray(len(payload)), []
    receiving.set_handler(frames.append, lambda header: memoryview(landing))
    sending.write(FrameHeader.data(0, len(payload), chunk_checksum(payload)).encode())
    sending.write(payload[: WRITE_HIGH_WATER - HEADER.size])
    assert sending._can_write.is_set()  # exactly at the mark: still writable
    sending.write(payload[WRITE_HIGH_WATER - HEADER.size :])
    assert not sending._can_write.is_set()  # past it: `drain` waits
    await sending.drain()
    assert len(frames) == 1 and landing == payload  # resumed once all of it was delivered
    sending.close()


@pytest.mark.parametrize("side", ["writer", "reader"])
async def test_inproc_abort_drops_undelivered_bytes_and_ends_both_sides(side):
    writer, reader = connection_pair()
    writer.write(control_frame(Kind.ERROR, b"never delivered"))
    aborting, other = (writer, reader) if side == "writer" else (reader, writer)
    aborting.abort()
    with pytest.raises(
        ConnectionLost, match="aborted"
    ):  # the other side sees a reset, as on a socket
        await other.next_frame()
    with pytest.raises(ConnectionLost):  # the reader has nothing: the frame was dropped
        await reader.next_frame()
    for end in (writer, reader):
        with pytest.raises(ConnectionLost):
            end.write(ack_frame(0))


async def test_inproc_close_delivers_what_was_queued_first():
    writer, reader = connection_pair()
    for text in [b"first", b"second"]:
        writer.write(control_frame(Kind.ERROR, text))
    writer.close()
    assert [(await reader.next_frame()).payload for _ in range(2)] == [b"first", b"second"]
    with pytest.raises(ConnectionLost, match="closed by the peer"):
        await reader.next_frame()


async def test_inproc_listener_names_are_unique_while_they_listen():
    async def handler(connection: Connection) -> None:
        await connection.next_frame()

    first, fresh = await listen_inproc("server", handler), await listen_inproc("", handler)
    assert fresh.name not in ("", "server")
    with pytest.raises(HaulerError, match="another listener holds"):
        await listen_inproc("server", handler)
    await first.close()
    await fresh.close()
    with pytest.raises(ConnectionLost, match="nothing listens"):
        await connect_inproc("server")
    again = await listen_inproc("server", handler)  # a closed listener's name is free
    await again.close()
