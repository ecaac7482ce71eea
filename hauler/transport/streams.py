"""Drive a transfer over one connection: the sans-I/O window and ledger meet real bytes here.

`send_model` writes chunks from memoryviews of the source as the window allows;
`receive_model` lands chunks in the sink and acknowledges each. Each enforces the
seed's timeout for its side as a scope rescheduled on every sign of progress:
`streaming_ack_wait` (sender: no acknowledgement) and `streaming_read_timeout`
(receiver: no chunk). A transfer that keeps moving never times out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Protocol

from hauler.core.config import Timeouts, TlsFiles
from hauler.core.errors import RemoteProtocolError
from hauler.core.timeouts import SilenceTimer
from hauler.model import ChunkPlan
from hauler.model.manifest import Chunk, Manifest, chunk_checksum
from hauler.transfer import (
    Frame,
    FrameHeader,
    Kind,
    ReceiveLedger,
    SendWindow,
    ack_frame,
    control_frame,
)
from hauler.transfer.window import WindowStatistics
from hauler.transport.connection import Connection, connect

WRITE_SLICE = 1 << 20  # memoryview slices handed to the transport; bounds its copy of a remainder

Progress = Callable[[int], None]


class ChunkSource(Protocol):
    def chunk_bytes(self, tensor: int, offset: int, length: int) -> memoryview: ...


class ChunkSink(Protocol):
    def chunk_bytes(self, tensor: int, offset: int, length: int) -> memoryview: ...


def _no_progress(nbytes: int) -> None:
    return None


def _peer_error(frame: Frame) -> RemoteProtocolError:
    return RemoteProtocolError(f"peer reported: {frame.payload.decode(errors='replace')}")


async def send_model(
    connection: Connection,
    manifest: Manifest,
    source: ChunkSource,
    *,
    window_chunks: int,
    timeouts: Timeouts,
    on_progress: Progress = _no_progress,
    window: SendWindow | None = None,
) -> WindowStatistics:
    """Send every chunk the receiver does not yet hold; returns when all are acknowledged.

    Pass the same `window` to every connection of one transfer: the receiver's first ACK
    on each says where to resume, and the window counts what had to be sent again."""
    window = window or SendWindow(ChunkPlan(manifest), window_chunks)
    acked = asyncio.Event()
    started = False
    async with SilenceTimer(timeouts.communication_timeout, "communication_timeout", "sending a model") as silence:

        def on_frame(frame: Frame) -> None:
            nonlocal started
            if frame.header.kind is Kind.ERROR:
                raise _peer_error(frame)
            if frame.header.kind is not Kind.ACK:
                raise RemoteProtocolError(f"sender got a {frame.header.kind.name} frame")
            if not started:  # the receiver's first ACK says where to start
                window.resume(frame.header.offset)
                started = True
                silence.switch(timeouts.streaming_ack_wait, "streaming_ack_wait")
            else:
                on_progress(window.on_ack(frame.header.offset))
                silence.touch()
            acked.set()

        connection.set_handler(on_frame)
        await _wait(connection, acked)
        while not window.done:
            while window.has_room():
                await _write_chunk(connection, window.take(), source)
            if not window.done:
                acked.clear()
                await _wait(connection, acked)
    return window.statistics()


async def _write_chunk(connection: Connection, chunk: Chunk, source: ChunkSource) -> None:
    view = source.chunk_bytes(chunk.tensor, chunk.offset, chunk.length)
    header = FrameHeader(Kind.DATA, chunk.tensor, chunk.offset, chunk.length, chunk_checksum(view))
    connection.write(header.encode())
    for start in range(0, chunk.length, WRITE_SLICE):
        connection.write(view[start : start + WRITE_SLICE])
        await connection.drain()


async def _wait(connection: Connection, event: asyncio.Event) -> None:
    """Wait for `event`, or re-raise why the connection closed."""
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter, connection.closed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not event.is_set():
        connection.closed.result()
        raise RemoteProtocolError("peer closed the connection before the transfer finished")


async def receive_model(
    connection: Connection,
    ledger: ReceiveLedger,
    sink: ChunkSink,
    *,
    timeouts: Timeouts,
    on_chunk: Callable[[Chunk], None] = lambda chunk: None,
    on_tensor: Callable[[int], None] = lambda index: None,
    on_progress: Progress = _no_progress,
) -> None:
    """Land every remaining chunk in `sink`, acknowledging each once `on_chunk` has consumed it;
    `on_tensor` runs for each tensor whose chunks all arrived and matched its digest."""
    finished = asyncio.Event()
    pending: list[Chunk] = []

    def destination(header: FrameHeader) -> memoryview:
        chunk = ledger.expect(header)
        pending.append(chunk)
        return sink.chunk_bytes(chunk.tensor, chunk.offset, chunk.length)

    async with SilenceTimer(timeouts.streaming_read_timeout, "streaming_read_timeout", "receiving a model") as silence:

        def on_frame(frame: Frame) -> None:
            if frame.header.kind is Kind.ERROR:
                raise _peer_error(frame)
            chunk = pending.pop()
            on_chunk(chunk)
            for index in ledger.commit(chunk, frame.header.checksum):
                on_tensor(index)
            connection.write(ack_frame(ledger.next_seq))
            on_progress(frame.header.length)
            silence.touch()
            if ledger.done:
                finished.set()

        connection.set_handler(on_frame, destination)
        if ledger.next_seq == 0:
            for index in ledger.begin():  # leading empty tensors complete at once
                on_tensor(index)
        connection.write(ack_frame(ledger.next_seq))  # where the sender should start
        if not ledger.done:
            await _wait(connection, finished)


async def open_transfer(host: str, port: int, transfer_id: str, *, tls: TlsFiles | None = None) -> Connection:
    """Dial the data plane and bind the connection to `transfer_id` with a HELLO frame."""
    connection = await connect(host, port, tls=tls)
    connection.write(control_frame(Kind.HELLO, json.dumps({"transfer": transfer_id}).encode()))
    return connection


async def read_hello(connection: Connection, timeouts: Timeouts) -> str:
    """The transfer id a freshly accepted connection asks for (its first frame)."""
    async with SilenceTimer(timeouts.communication_timeout, "communication_timeout", "waiting for a HELLO"):
        frame = await connection.next_frame()
    if frame.header.kind is not Kind.HELLO:
        raise RemoteProtocolError(f"first frame must be HELLO, got {frame.header.kind.name}")
    try:
        transfer_id = json.loads(frame.payload)["transfer"]
    except (ValueError, KeyError, TypeError):
        raise RemoteProtocolError("HELLO payload must be {\"transfer\": id}") from None
    if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= 128:
        raise RemoteProtocolError("HELLO names no valid transfer id")
    return transfer_id


def refuse(connection: Connection, reason: str) -> None:
    """Tell the peer why, then drop the connection."""
    connection.write(control_frame(Kind.ERROR, reason.encode()[:1024]))
    connection.close()
