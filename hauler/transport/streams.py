"""Drive a transfer over one connection: the sans-I/O window and ledger meet real bytes here.

`send_model` writes chunks from memoryviews of the source as the window allows;
`receive_model` lands each chunk where the sink says, hands it to the sink once it matched
its checksum, then acknowledges it. Each enforces the seed's timeout for its side as a scope
rescheduled on every sign of progress: `streaming_ack_wait` (sender: no acknowledgement) and
`streaming_read_timeout` (receiver: no chunk). A transfer that keeps moving never times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import xxhash

from hauler.core.config import DataPlane, Timeouts, TlsFiles
from hauler.core.errors import ConnectionLost, HaulerError, RemoteProtocolError, TransferTimeout
from hauler.core.retry import with_retries
from hauler.core.timeouts import SilenceTimer
from hauler.model import Chunk, ChunkPlan
from hauler.transfer import (
    Frame,
    FrameHeader,
    Hello,
    Kind,
    ReceiveLedger,
    SendSchedule,
    SendWindow,
    WindowStatistics,
    ack_frame,
    control_frame,
    error_frame,
)
from hauler.transport.connection import Connection, connect

WRITE_SLICE = 1 << 20  # memoryview slices handed to the transport; bounds its copy of a remainder
GATHER_VIEWS = 16  # a chunk sent as more views than this is gathered into one first
KEEPALIVE_ACK_S = 1.0  # while a chunk is still arriving, repeat the last ACK this often: on a slow
# link one chunk can take longer than streaming_ack_wait, and bytes flowing are progress

Progress = Callable[[int], None]  # bytes newly landed; 0 is a sign of life mid-chunk


class ChunkSource(Protocol):
    """What a sender reads: a chunk's payload as views (one per piece, or one in all), and
    what it weighs on the wire."""

    def chunk_views(self, chunk: Chunk) -> Sequence[memoryview]: ...
    def payload_bytes(self, chunk: Chunk) -> int: ...


class ChunkSink(Protocol):
    """What a receiver writes into: where a chunk's payload lands (a file region, a lane's
    buffer), and what to do with it once it has landed and matched its checksum (check its
    tensors, decode it, fold it); raising refuses the chunk."""

    def landing(self, chunk: Chunk, lane: int, nbytes: int) -> memoryview: ...
    def landed(self, chunk: Chunk, lane: int, view: memoryview, checksum: int) -> None: ...


def _no_progress(nbytes: int) -> None:
    return None


def _peer_error(frame: Frame) -> RemoteProtocolError:
    return RemoteProtocolError(f"peer reported: {frame.payload.decode(errors='replace')}")


async def send_model(
    connection: Connection,
    source: ChunkSource,
    window: SendWindow,
    *,
    timeouts: Timeouts,
    on_progress: Progress = _no_progress,
) -> WindowStatistics:
    """Send chunks on one lane as its window has room, until no chunk is left for any lane and
    every one sent here is acknowledged; then END the lane.

    Pass the same `window` to every connection of one lane: the receiver's first ACK on each
    says how much of the lane it holds, and the window counts what had to be sent again."""
    acked = asyncio.Event()
    started = False
    what = "sending a model"
    async with SilenceTimer(
        timeouts.communication_timeout, "communication_timeout", what
    ) as silence:

        def on_frame(frame: Frame) -> None:
            nonlocal started
            if frame.header.kind is Kind.ERROR:
                raise _peer_error(frame)
            if frame.header.kind is not Kind.ACK:
                raise RemoteProtocolError(f"sender got a {frame.header.kind.name} frame")
            if not started:  # the receiver's first ACK says where to start
                window.resume(frame.header.seq)
                started = True
                silence.switch(timeouts.streaming_ack_wait, "streaming_ack_wait")
            else:
                on_progress(window.on_ack(frame.header.seq))
                silence.touch()
            acked.set()

        connection.set_handler(on_frame)
        await connection.wait(acked)
        while not window.done:
            while window.has_room():
                await _write_chunk(connection, window.take(), source)
            if not window.done:
                acked.clear()
                await connection.wait(acked)
    connection.write(control_frame(Kind.END))
    return window.statistics()


async def _write_chunk(connection: Connection, chunk: Chunk, source: ChunkSource) -> None:
    """A DATA header, then the chunk's views as they are: nothing is copied into a message,
    except a chunk of many small tensors sent from a script's arrays, gathered in one piece
    (one copy costs less than a write per tensor)."""
    views = source.chunk_views(chunk)
    if len(views) > GATHER_VIEWS:
        views = [memoryview(b"".join(views))]
    hasher = xxhash.xxh3_64()
    for view in views:
        hasher.update(view)
    length = sum(len(view) for view in views)
    connection.write(FrameHeader.data(chunk.seq, length, hasher.intdigest()).encode())
    for view in views:
        for start in range(0, len(view), WRITE_SLICE):
            connection.write(view[start : start + WRITE_SLICE])
            await connection.drain()


async def receive_model(
    connection: Connection,
    ledger: ReceiveLedger,
    sink: ChunkSink,
    *,
    timeouts: Timeouts,
    lane: int = 0,
    on_progress: Progress = _no_progress,
) -> None:
    """Land the chunks the sender puts on this lane where `sink` says, hand each to the sink
    once it matched its checksum, and acknowledge it, until the sender ENDs the lane."""
    ended = asyncio.Event()
    pending: list[Chunk] = []

    def destination(header: FrameHeader) -> memoryview:
        chunk = ledger.expect(header, lane)
        pending.append(chunk)
        return sink.landing(chunk, lane, header.length)

    what = "receiving a model"
    timeout = timeouts.streaming_read_timeout
    async with SilenceTimer(timeout, "streaming_read_timeout", what) as silence:

        def on_frame(frame: Frame) -> None:
            if frame.header.kind is Kind.ERROR:
                raise _peer_error(frame)
            if frame.header.kind is Kind.END:
                ended.set()
                return
            if frame.header.kind is not Kind.DATA:
                raise RemoteProtocolError(f"receiver got a {frame.header.kind.name} frame")
            chunk = pending.pop()
            sink.landed(chunk, lane, frame.landed, frame.checksum)
            ledger.commit(chunk, frame.checksum, frame.header.length, lane)
            connection.write(ack_frame(ledger.held(lane)))
            on_progress(chunk.length)
            silence.touch()

        last_ack = time.monotonic()

        def on_bytes(nbytes: int) -> None:
            nonlocal last_ack
            silence.touch()
            if time.monotonic() - last_ack >= KEEPALIVE_ACK_S:  # a sign of life for both ends
                last_ack = time.monotonic()
                connection.write(ack_frame(ledger.held(lane)))
                on_progress(0)

        connection.set_handler(on_frame, destination, on_bytes)
        connection.write(ack_frame(ledger.held(lane)))  # where the sender should resume
        await connection.wait(ended)


async def open_transfer(
    host: str,
    port: int,
    transfer_id: str,
    *,
    lane: int = 0,
    tls: TlsFiles | None = None,
    congestion_control: str = "",
) -> Connection:
    """Dial the data plane and bind the connection to one lane of `transfer_id` with a HELLO."""
    connection = await connect(host, port, tls=tls, congestion_control=congestion_control)
    connection.write(Hello(transfer_id, lane).encode())
    return connection


async def read_hello(connection: Connection, seconds: float) -> Hello:
    """The transfer and lane a freshly accepted connection asks for in its first frame, which
    must come within `seconds` (a connection that says nothing is dropped, not kept)."""
    try:
        async with asyncio.timeout(seconds):
            frame = await connection.next_frame()
    except TimeoutError:
        raise TransferTimeout(
            "hello_timeout_s", seconds, "waiting for a data connection's HELLO"
        ) from None
    return Hello.decode(frame.header, frame.payload)


def refuse(connection: Connection, reason: str) -> None:
    """Tell the peer why, then drop the connection."""
    connection.write(error_frame(reason))
    connection.close()


@dataclass(frozen=True)
class DataAddress:
    """Where a peer dials the data plane, and how."""

    host: str
    port: int
    tls: TlsFiles | None
    policy: DataPlane


async def fetch_model(
    address: DataAddress,
    transfer_id: str,
    ledger: ReceiveLedger,
    sink: ChunkSink,
    *,
    timeouts: Timeouts,
    on_progress: Progress = _no_progress,
) -> None:
    """Receive a transfer on one connection per lane of `ledger`, each reconnecting and resuming."""

    async def lane(index: int) -> None:
        async with _lane_connection(address, transfer_id, index) as connection:
            await receive_model(
                connection, ledger, sink, timeouts=timeouts, lane=index, on_progress=on_progress
            )

    await _all_lanes(lane, ledger.lanes, address.policy, f"receiving transfer {transfer_id[:8]}")
    if not ledger.done:
        raise ConnectionLost(f"the sender ended transfer {transfer_id[:8]} with chunks missing")


async def push_model(
    address: DataAddress,
    transfer_id: str,
    plan: ChunkPlan,
    source: ChunkSource,
    lanes: int,
    *,
    timeouts: Timeouts,
    on_progress: Progress = _no_progress,
) -> WindowStatistics:
    """Send a transfer on `lanes` connections that share out its chunks, each reconnecting and
    resuming from its acknowledgements."""
    schedule = SendSchedule(plan, address.policy.window_bytes, lanes, source.payload_bytes)

    async def lane(index: int) -> None:
        async with _lane_connection(address, transfer_id, index) as connection:
            window = schedule.windows[index]
            await send_model(connection, source, window, timeouts=timeouts, on_progress=on_progress)

    await _all_lanes(
        lane, len(schedule.windows), address.policy, f"sending transfer {transfer_id[:8]}"
    )
    return schedule.statistics()


async def _all_lanes(
    run: Callable[[int], Awaitable[None]], lanes: int, policy: DataPlane, what: str
) -> None:
    try:
        async with asyncio.TaskGroup() as group:
            for index in range(lanes):
                attempt = lambda index=index: run(index)  # noqa: E731
                group.create_task(with_retries(attempt, policy, f"{what}, lane {index}"))
    except* HaulerError as errors:
        raise errors.exceptions[0] from None


@contextlib.asynccontextmanager
async def _lane_connection(
    address: DataAddress, transfer_id: str, lane: int
) -> AsyncIterator[Connection]:
    connection = await open_transfer(
        address.host,
        address.port,
        transfer_id,
        lane=lane,
        tls=address.tls,
        congestion_control=address.policy.congestion_control,
    )
    try:
        yield connection
    finally:
        connection.close()
