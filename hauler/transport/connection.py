"""Data-plane connections: asyncio sockets (TCP, TLS when given a context) carrying frames.

`listen` and `connect` hand out `Connection`s. Incoming bytes go through a
`FrameReader` straight into the buffer it names (`BufferedProtocol`), and each
complete frame goes to the connection's frame handler, synchronously, so an
acknowledgement can be written the moment a chunk lands. Nothing above this
module sees `ssl`, `socket` or asyncio transports.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

from hauler.core.config import TlsFiles
from hauler.core.errors import ConnectionLost, HaulerError
from hauler.core.waiting import unless_ended
from hauler.security import (
    Identity,
    client_ssl_context,
    identity_from_ssl_object,
    server_ssl_context,
    tls_failure,
)
from hauler.transfer import Frame, FrameReader
from hauler.transfer.reader import Destination

FrameHandler = Callable[[Frame], None]
T = TypeVar("T")


def _discard(frame: Frame) -> None:
    """The handler of a connection that has ended."""


WRITE_HIGH_WATER = 2 << 20  # bytes queued in the transport before writers wait (per connection)


def tune_socket(sock: socket.socket, congestion_control: str = "") -> None:
    """Every socket option Hauler sets, in one place: no Nagle delay, keepalive probes, and
    the congestion control asked for where the kernel offers it (BBR keeps a lossy long path
    full where loss-based control backs off). Buffers are left to the kernel's autotuning."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if congestion_control:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion_control.encode())
        except OSError:
            pass  # not offered here: the system default is the documented fallback


class _FrameProtocol(asyncio.BufferedProtocol):
    def __init__(self, congestion_control: str = "") -> None:
        self.connection: Connection | None = None
        self.congestion_control = congestion_control
        self.made = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock, self.congestion_control)
        self.connection = Connection(transport, self)  # type: ignore[arg-type]
        self.made.set_result(self.connection)

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self.connection is not None
        return self.connection._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        assert self.connection is not None
        self.connection._received(nbytes)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        assert self.connection is not None
        self.connection._can_write.clear()

    def resume_writing(self) -> None:
        assert self.connection is not None
        self.connection._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None:
            self.connection._lost(exc)
        # asyncio's TLS protocol keeps our bound methods after the end: hold nothing that leads
        # back to it, or its buffers would wait for the cyclic GC.
        self.connection = None
        self.made = asyncio.get_running_loop().create_future()


class Connection:
    """One data-plane connection: `write` frames, get frames through a handler (or
    `next_frame`), wait on events unless it ends first, `close` or `fail` to end."""

    def __init__(self, transport: asyncio.Transport, protocol: _FrameProtocol) -> None:
        self._transport = transport
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._reader = FrameReader()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closed = asyncio.get_running_loop().create_future()
        self._inbox: asyncio.Queue[Frame] = asyncio.Queue()
        self._handler: FrameHandler = self._inbox.put_nowait
        self._on_bytes: Callable[[int], None] | None = None
        self._ssl_object = transport.get_extra_info("ssl_object")

    @functools.cached_property
    def identity(self) -> Identity | None:
        """Who the peer is, by its certificate; None on a plaintext connection."""
        return None if self._ssl_object is None else identity_from_ssl_object(self._ssl_object)

    @property
    def partial_payload_bytes(self) -> int:
        """Bytes of a DATA payload that had begun to arrive but was not complete."""
        return self._reader.partial_payload_bytes

    def set_handler(
        self,
        handler: FrameHandler | None,
        destination: Destination | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Route frames to `handler` (None: back to `next_frame`); DATA payloads land in
        `destination`; `on_bytes` is told of every read, even mid-frame.

        Frames that arrived before the handler was set (a peer may send its first frame
        right behind the HELLO) are handed to it now, in order."""
        self._handler = handler or self._inbox.put_nowait
        self._reader.destination = destination
        self._on_bytes = on_bytes
        try:
            while handler is not None and not self._inbox.empty():
                handler(self._inbox.get_nowait())
        except HaulerError as error:
            self.fail(error)

    def _received(self, nbytes: int) -> None:
        try:
            if self._on_bytes is not None:
                self._on_bytes(nbytes)
            frame = self._reader.buffer_updated(nbytes)
            if frame is not None:
                self._handler(frame)
        except HaulerError as error:
            self.fail(error)

    async def next_frame(self) -> Frame:
        """The next frame, for the handshake phase before a handler is set."""
        return await self._unless_closed(self._inbox.get())

    async def wait(self, event: asyncio.Event) -> None:
        """Wait for `event`; if the connection ends first, raise why."""
        if not event.is_set():
            await self._unless_closed(event.wait())

    def write(self, data: bytes | memoryview) -> None:
        if self._closed.done():
            self._closed.result()
            raise ConnectionLost("write on a closed connection")
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's buffer has room (or raise why the connection ended)."""
        await self.wait(self._can_write)

    async def _unless_closed(self, work: Awaitable[T]) -> T:
        """The result of `work`, unless the connection ends first: then why it ended."""
        return await unless_ended(work, self._closed, lambda: ConnectionLost("connection closed"))

    async def wait_closed(self) -> None:
        """Return once the connection has ended, however it ended."""
        await asyncio.wait([self._closed])

    def fail(self, error: BaseException) -> None:
        """End the connection because of `error`; its waiters see it."""
        self._end(error)
        self._transport.abort()

    def _lost(self, exc: Exception | None) -> None:
        """The transport is gone (asyncio's connection_lost): nothing more can arrive or leave."""
        reason = "connection closed by the peer" if exc is None else f"connection lost: {exc}"
        self._end(ConnectionLost(reason))
        self._can_write.set()
        self._release()

    def _end(self, error: BaseException) -> None:
        if not self._closed.done():
            self._closed.set_exception(error.with_traceback(None))  # keeps no frames alive
            self._closed.exception()  # mark it seen: nobody need be waiting on a closed connection

    def _release(self) -> None:
        """Drop what the drivers handed in: their closures refer back to this connection, and
        such cycles would keep its TLS state (megabytes of buffers) until the cyclic GC runs."""
        self._handler = _discard
        self._on_bytes = None
        self._reader.destination = None

    def close(self) -> None:
        """Close after queued bytes are sent."""
        if not self._closed.done():
            self._closed.set_result(None)
        self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent bytes."""
        if not self._closed.done():
            self._closed.set_result(None)
        self._transport.abort()


@functools.cache
def _client_context(tls: TlsFiles) -> ssl.SSLContext:
    return client_ssl_context(tls)


@functools.cache
def _server_context(tls: TlsFiles) -> ssl.SSLContext:
    return server_ssl_context(tls)


async def connect(
    host: str, port: int, *, tls: TlsFiles | None = None, congestion_control: str = ""
) -> Connection:
    """Open a data-plane connection to `host:port`, with mutual TLS when `tls` is given."""
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await loop.create_connection(
            lambda: _FrameProtocol(congestion_control),
            host,
            port,
            ssl=_client_context(tls) if tls else None,
        )
    except ssl.SSLError as error:
        raise tls_failure(error, peer=f"{host}:{port}") from None
    except OSError as error:
        raise ConnectionLost(
            f"cannot reach the data plane at {host}:{port}: {error.strerror or error}"
        ) from None
    return await protocol.made


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class Listener:
    """A listening data-plane socket; each accepted connection runs `handler` in its own task."""

    def __init__(self, server: asyncio.Server, tasks: set[asyncio.Task]) -> None:
        self._server = server
        self._tasks = tasks
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def serve(connection: Connection, handler: ConnectionHandler) -> None:
    """Run a listener's handler on an accepted connection: a Hauler or OS error fails the
    connection; it is closed after, whatever happened."""
    try:
        await handler(connection)
    except (HaulerError, OSError) as error:
        connection.fail(error)
    finally:
        connection.close()


async def listen(
    host: str,
    port: int,
    handler: ConnectionHandler,
    *,
    tls: TlsFiles | None = None,
    congestion_control: str = "",
    handshake_timeout_s: float = 60.0,
) -> Listener:
    """Accept data-plane connections on `host:port` (0 picks a free port); mutual TLS when `tls` is
    given, its handshake done within `handshake_timeout_s` or the connection dropped."""
    tasks: set[asyncio.Task] = set()

    def factory() -> _FrameProtocol:
        protocol = _FrameProtocol(congestion_control)

        async def run() -> None:
            await serve(await protocol.made, handler)

        task = asyncio.get_running_loop().create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return protocol

    try:
        server = await asyncio.get_running_loop().create_server(
            factory,
            host,
            port,
            ssl=_server_context(tls) if tls else None,
            ssl_handshake_timeout=handshake_timeout_s if tls else None,
        )
    except OSError as error:
        raise HaulerError(
            f"cannot listen on {host}:{port}: {error.strerror}; pick another data_port"
        ) from None
    return Listener(server, tasks)


__all__ = ["Connection", "Listener", "connect", "listen", "tune_socket"]
