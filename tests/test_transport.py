"""The data plane on real loopback sockets (plain TCP and mutual TLS): models arrive
bit-identical whatever their layout, and a peer that breaks the protocol is refused
before a byte of its payload is placed, and disconnected."""

from __future__ import annotations

import asyncio
import secrets

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
from hauler.model.manifest import MAX_CHUNK_BYTES
from hauler.security import Role
from hauler.security.ca import (
    cert_pem,
    create_authority,
    issue,
    write_file,
    write_issued,
)
from hauler.server.access import AccessPolicy
from hauler.server.federation import UploadBuffers
from hauler.server.transfers import TransferRegistry
from hauler.transfer import (
    FrameHeader,
    Kind,
    ReceiveLedger,
    SendSchedule,
    ack_frame,
    control_frame,
)
from hauler.transport import (
    Connection,
    DataAddress,
    connect,
    fetch_model,
    listen,
    open_transfer,
    push_model,
    receive_model,
    send_model,
)

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
        write_issued(issue(authority, name, org="test", role=role), folder / "cert.pem", folder / "key.pem")
        kits[name] = TlsFiles(ca_cert=folder / "ca.pem", cert=folder / "cert.pem", key=folder / "key.pem")
    return kits


@pytest.fixture(params=["tcp", "tls"])
def scheme(request, kits) -> tuple[TlsFiles | None, TlsFiles | None]:
    """(server kit, site kit) for each way the data plane runs: plaintext, or mutual TLS."""
    return (None, None) if request.param == "tcp" else (kits["server"], kits["site-1"])


def registry(*, lanes: int = 1, timeouts: Timeouts = TIMEOUTS) -> TransferRegistry:
    """The server's transfers: chunks of SMALL_CHUNK, `lanes` parallel connections per transfer."""
    dataplane = DataPlane(chunk_bytes=SMALL_CHUNK, window_chunks=4, connections=lanes, retry_backoff_s=0.05,
                          hello_timeout_s=1.0)
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
    payload = bytes(model.chunk_bytes(chunk.tensor, chunk.offset, chunk.length))
    return FrameHeader.data(chunk.tensor, chunk.offset, chunk.length, chunk_checksum(memoryview(payload))).encode() + payload


class Recorder:
    """A sink that records which chunks it was asked to place."""

    def __init__(self, manifest: Manifest) -> None:
        self.buffer = bytearray(manifest.chunk_bytes)
        self.asked: list[tuple[int, int, int]] = []

    def chunk_bytes(self, tensor: int, offset: int, length: int) -> memoryview:
        self.asked.append((tensor, offset, length))
        return memoryview(self.buffer)[:length]


async def serve_once(handler, *, tls=None):
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

    return await listen(HOST, 0, run, tls=tls), result


@pytest.mark.parametrize("window_chunks", [1, 16])
@pytest.mark.parametrize("direction", ["server_sends", "site_sends"])
async def test_model_arrives_bit_identical(scheme, source, sink, direction, window_chunks):
    server_tls, site_tls = scheme
    ledger, completed = ReceiveLedger(ChunkPlan(source.manifest)), []

    async def send(connection):
        return await send_model(connection, source.manifest, source, window_chunks=window_chunks, timeouts=TIMEOUTS)

    async def receive(connection):
        await receive_model(connection, ledger, sink, timeouts=TIMEOUTS, on_tensor=completed.append)

    listener, served = await serve_once(send if direction == "server_sends" else receive, tls=server_tls)
    connection = await connect(HOST, listener.port, tls=site_tls)
    try:
        dialled = await (receive if direction == "server_sends" else send)(connection)
        statistics = await served if direction == "server_sends" else dialled
        await served
    finally:
        connection.close()
        await listener.close()
    assert tensor_bytes(sink) == tensor_bytes(source)
    assert sorted(completed) == list(range(len(source.manifest.tensors)))  # each tensor checked, once
    assert statistics.bytes_sent == statistics.bytes_acked == source.manifest.total_bytes
    assert statistics.bytes_resent == 0
    assert ledger.plan.total > 20  # many chunks, several per tensor


@pytest.mark.parametrize("lanes", [1, 3])
async def test_registry_serves_a_download_and_takes_an_upload_chunk_by_chunk(scheme, tmp_path, source, sink, lanes):
    server_tls, site_tls = scheme
    transfers = registry(lanes=lanes)
    listener = await listen(HOST, 0, transfers.handle, tls=server_tls)
    address = DataAddress(HOST, listener.port, site_tls, transfers.dataplane)
    landing = ModelFile.create(tmp_path / "landing.safetensors", source.manifest)
    landed = []
    try:
        download = transfers.offer("site-1", source.manifest, source)
        assert download.lanes == lanes
        await fetch_model(address, download.id, ReceiveLedger(ChunkPlan(source.manifest), download.lanes), sink,
                          timeouts=TIMEOUTS)
        await download.wait(10, "download")
        assert tensor_bytes(sink) == tensor_bytes(source)
        assert download.bytes_done == source.manifest.total_bytes

        upload = transfers.expect("site-1", source.manifest, landing, on_chunk=lambda chunk: landed.append(
            (chunk, bytes(landing.chunk_bytes(chunk.tensor, chunk.offset, chunk.length)))))
        statistics = await push_model(address, upload.id, source.manifest, source, upload.lanes, timeouts=TIMEOUTS)
        await upload.wait(10, "upload")
    finally:
        await listener.close()
        landing.close()
    assert sorted(chunk.seq for chunk, _ in landed) == [chunk.seq for chunk in source.manifest.chunks()]
    for chunk, payload in landed:  # each chunk was whole when it was handed on, exactly once
        assert payload == bytes(source.chunk_bytes(chunk.tensor, chunk.offset, chunk.length))
    assert statistics.bytes_resent == 0  # a clean link: nothing sent twice


async def test_a_download_is_done_only_once_every_connected_lane_has_had_its_end(source, sink):
    """Done is when the server may forget a transfer; a lane still owed its END would be cut
    off and, reconnecting, find no transfer."""
    transfers = registry(lanes=2)
    listener = await listen(HOST, 0, transfers.handle)
    ledger = ReceiveLedger(ChunkPlan(source.manifest), 2)
    try:
        download = transfers.offer("site-1", source.manifest, source)
        late = await open_transfer(HOST, listener.port, download.id, lane=1)  # connected, silent for now
        while download.connections < 1:
            await asyncio.sleep(0.001)
        first = await open_transfer(HOST, listener.port, download.id, lane=0)
        await receive_model(first, ledger, sink, timeouts=TIMEOUTS, lane=0)  # every chunk, then END
        assert ledger.done and ledger.held(0) == ChunkPlan(source.manifest).total
        await asyncio.sleep(0.1)
        assert not download.done.done()  # lane 1 has not been told yet
        await receive_model(late, ledger, sink, timeouts=TIMEOUTS, lane=1)  # its first ACK, then END at once
        await download.wait(5, "download")
    finally:
        await listener.close()
    assert tensor_bytes(sink) == tensor_bytes(source)


def landed_at_server(buffers: UploadBuffers, chunk, prefix: bytes) -> bool:
    """Whether the chunk's first bytes are in its upload buffer (False until its header is read)."""
    try:
        landing = buffers.chunk_bytes(chunk.tensor, chunk.offset, chunk.length)
    except ValueError:  # the server has not read the chunk's header yet
        return False
    return bytes(landing[: len(prefix)]) == prefix


async def test_a_chunk_half_landed_on_one_lane_survives_a_chunk_on_another(source):
    transfers = registry(lanes=2)
    listener = await listen(HOST, 0, transfers.handle)
    plan = ChunkPlan(source.manifest)
    buffers = UploadBuffers(source.manifest.chunk_bytes, 2)  # where the server lands upload chunks before folding
    landed = []
    try:
        upload = transfers.expect("site-1", source.manifest, buffers, on_chunk=landed.append)
        buffers.ledger = upload.ledger
        first = [plan.chunk(0), plan.chunk(1)]  # lane 0 carries chunk 0, lane 1 chunk 1
        connections = [await open_transfer(HOST, listener.port, upload.id, lane=k) for k in range(2)]
        for connection in connections:
            await connection.next_frame()  # each lane's receiver says where to start
        frames = [data_frame(source, chunk) for chunk in first]
        half = len(frames[0]) // 2
        connections[0].write(frames[0][:half])  # lane 0: header and part of its chunk...
        while not landed_at_server(buffers, first[0], frames[0][32:half]):
            await asyncio.sleep(0.001)  # ...until those bytes have landed at the server
        connections[1].write(frames[1])  # lane 1: a whole chunk
        assert (await connections[1].next_frame()).header.kind is Kind.ACK
        connections[0].write(frames[0][half:])  # lane 0: the rest of its chunk
        ack = await connections[0].next_frame()
        assert ack.header.kind is Kind.ACK and ack.header.offset == 1  # one chunk of lane 0 held
    finally:
        await listener.close()
    assert sorted(chunk.seq for chunk in landed) == [0, 1]


async def test_a_chunk_arriving_on_one_lane_is_refused_on_another(source):
    transfers = registry(lanes=2)
    listener = await listen(HOST, 0, transfers.handle)
    landed = []
    try:
        upload = transfers.expect("site-1", source.manifest, Recorder(source.manifest), on_chunk=landed.append)
        connections = [await open_transfer(HOST, listener.port, upload.id, lane=k) for k in range(2)]
        for connection in connections:
            await connection.next_frame()
        frame = data_frame(source, ChunkPlan(source.manifest).chunk(0))
        connections[0].write(frame[:40])  # chunk 0 begins on lane 0
        await asyncio.sleep(0.05)
        connections[1].write(frame)  # and again, whole, on lane 1
        with pytest.raises((RemoteProtocolError, ConnectionLost)):
            await connections[1].next_frame()
        connections[0].write(frame[40:])
        ack = await connections[0].next_frame()
        assert ack.header.kind is Kind.ACK and ack.header.offset == 1
    finally:
        await listener.close()
    assert [chunk.seq for chunk in landed] == [0]


async def test_unknown_transfer_is_refused_with_a_reason():
    listener = await listen(HOST, 0, registry().handle)
    try:
        connection = await open_transfer(HOST, listener.port, secrets.token_hex(16))
        frame = await connection.next_frame()
        assert frame.header.kind is Kind.ERROR and b"unknown" in frame.payload
        with pytest.raises(ConnectionLost):
            await connection.next_frame()
    finally:
        await listener.close()


def bad_frames(manifest: Manifest) -> dict[str, tuple[bytes, str]]:
    """Frames a receiver must refuse before placing a byte, and what its refusal says."""
    first = next(manifest.chunks())
    payload = bytes(first.length)
    checksum = chunk_checksum(memoryview(payload))

    def header(tensor: int, offset: int, length: int, check: int = checksum) -> bytes:
        return FrameHeader(Kind.DATA, tensor, offset, length, check).encode()

    off_plan = "is not one of the manifest's"
    return {
        "wrong_tensor": (header(first.tensor + 1, first.offset, first.length) + payload, off_plan),
        "wrong_offset": (header(first.tensor, first.offset + 8, first.length) + payload, off_plan),
        "shorter_than_planned": (header(first.tensor, first.offset, first.length - 8) + payload[:-8], off_plan),
        "longer_than_planned": (header(first.tensor, first.offset, first.length + 8) + payload + bytes(8), off_plan),
        "past_max_chunk_bytes": (header(first.tensor, first.offset, MAX_CHUNK_BYTES + 1), "exceeds"),
        "tensor_out_of_range": (header(2**32 - 1, 0, first.length) + payload, off_plan),
    }


BAD = list(bad_frames(Manifest.build(MIXED_LAYOUT, SMALL_CHUNK)))


@pytest.mark.parametrize("bad", BAD)
async def test_data_frame_off_the_plan_is_refused_and_the_connection_closed(source, bad):
    transfers = registry()
    listener = await listen(HOST, 0, transfers.handle)
    sink, landed = Recorder(source.manifest), []
    try:
        upload = transfers.expect("site-1", source.manifest, sink, on_chunk=landed.append)
        connection = await open_transfer(HOST, listener.port, upload.id)
        first = await connection.next_frame()
        assert (first.header.kind, first.header.offset) == (Kind.ACK, 0)  # the receiver says where to start
        frame, reason = bad_frames(source.manifest)[bad]
        connection.write(frame)
        with pytest.raises((RemoteProtocolError, ConnectionLost)):  # the server hangs up on us
            await connection.next_frame()
        with pytest.raises(HaulerError) as raised:  # nobody comes back: the transfer fails, saying why
            await upload.wait(0.5, "upload")
        assert reason in str(raised.value)
    finally:
        await listener.close()
    assert sink.asked == [] and landed == []  # no byte of the bad frame was placed, nothing folded


@pytest.mark.parametrize("frame", [ack_frame(0), control_frame(Kind.HELLO, b"{}")], ids=["ack", "hello"])
async def test_control_frame_sent_to_a_receiver_is_a_remote_protocol_error(source, sink, frame):
    listener, served = await serve_once(lambda connection: receive_model(
        connection, ReceiveLedger(ChunkPlan(source.manifest)), sink, timeouts=TIMEOUTS))
    connection = await connect(HOST, listener.port)
    try:
        await connection.next_frame()
        connection.write(frame)
        with pytest.raises(RemoteProtocolError):
            await served
    finally:
        connection.close()
        await listener.close()


async def test_corrupt_chunk_is_never_consumed_and_is_resent_on_reconnect(source):
    transfers = registry()
    listener = await listen(HOST, 0, transfers.handle)
    landed = []
    try:
        upload = transfers.expect("site-1", source.manifest, Recorder(source.manifest), on_chunk=landed.append)
        connection = await open_transfer(HOST, listener.port, upload.id)
        await connection.next_frame()
        chunk = next(source.manifest.chunks())
        payload = bytes(source.chunk_bytes(chunk.tensor, chunk.offset, chunk.length))
        header = FrameHeader.data(chunk.tensor, chunk.offset, chunk.length, chunk_checksum(memoryview(payload)))
        connection.write(header.encode() + payload[:-1] + bytes([payload[-1] ^ 1]))
        with pytest.raises((IntegrityError, ConnectionLost)):  # the server hangs up on us
            await connection.next_frame()
        assert landed == []  # the corrupt chunk reached nothing
        again = await open_transfer(HOST, listener.port, upload.id)  # the site reconnects and resumes
        await send_model(again, source.manifest, source, window_chunks=4, timeouts=TIMEOUTS)
        await upload.wait(10, "upload")
        again.close()
    finally:
        await listener.close()
    assert landed == list(source.manifest.chunks())  # every chunk consumed exactly once, in order


async def test_connection_that_never_says_hello_is_dropped():
    listener = await listen(HOST, 0, registry(timeouts=SHORT).handle)
    try:
        connection = await connect(HOST, listener.port)
        async with asyncio.timeout(10):
            with pytest.raises((ConnectionLost, TransferTimeout)):
                await connection.next_frame()
    finally:
        await listener.close()


@pytest.mark.parametrize("side", ["receiver", "sender"])
async def test_silent_peer_times_out(source, sink, side):
    listener, _ = await serve_once(lambda connection: asyncio.sleep(30))  # accepts, then says nothing
    connection = await connect(HOST, listener.port)
    try:
        async with asyncio.timeout(3):  # 15 x the configured silence
            with pytest.raises(TransferTimeout) as raised:
                if side == "receiver":
                    await receive_model(connection, ReceiveLedger(ChunkPlan(source.manifest)), sink, timeouts=SHORT)
                else:
                    await send_model(connection, source.manifest, source, window_chunks=4, timeouts=SHORT)
        names = {"streaming_read_timeout"} if side == "receiver" else {"communication_timeout", "streaming_ack_wait"}
        assert raised.value.timeout_name in names
    finally:
        connection.close()
        await listener.close()


async def test_transfer_resumes_on_a_new_connection_resending_at_most_one_window(source, sink):
    ledger = ReceiveLedger(ChunkPlan(source.manifest))
    window = SendSchedule(ChunkPlan(source.manifest), window_chunks=2).windows[0]  # the sender's, kept across connections

    async def send(connection):
        await send_model(connection, source.manifest, source, window=window, window_chunks=2, timeouts=TIMEOUTS)

    listener = await listen(HOST, 0, send)
    try:
        first = await connect(HOST, listener.port)
        landed = []

        def drop_after_five(nbytes: int) -> None:
            landed.append(nbytes)
            if len(landed) == 5:
                first.abort()

        with pytest.raises((RemoteProtocolError, ConnectionLost)):
            await receive_model(first, ledger, sink, timeouts=TIMEOUTS, on_progress=drop_after_five)
        assert ledger.held(0) == 5
        second = await connect(HOST, listener.port)
        await receive_model(second, ledger, sink, timeouts=TIMEOUTS)
        second.close()
    finally:
        await listener.close()
    assert tensor_bytes(sink) == tensor_bytes(source)
    statistics = window.statistics()
    assert statistics.resumes == 1 and statistics.bytes_resent <= 2 * source.manifest.chunk_bytes
    assert statistics.bytes_sent == source.manifest.total_bytes + statistics.bytes_resent

