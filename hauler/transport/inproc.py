"""The in-process data plane: two `Connection`s joined back to back, with no socket and no TLS.

`connection_pair()` gives both ends at once; `listen_inproc(name, handler)` and
`connect_inproc(name)` mirror `listen` and `connect`, with a name known only inside the running
event loop in place of a port. Both ends are the real `Connection` over the real
`_FrameProtocol`, so every driver runs unchanged; only the transport under them is this module's.

Invariants:
- Bytes reach the peer as asyncio's `BufferedProtocol` machinery hands them over: ask its
  `get_buffer`, copy what fits, call `buffer_updated`, repeat. A DATA payload thus lands with
  one memcpy, from the written view into the buffer the peer's FrameReader names (typically a
  slice of the sink's file mapping).
- Delivery runs later (`loop.call_soon`), in write order, never inside `write`: a receiver
  acknowledges from its frame handler, and a sender must not handle that ACK inside its `write`.
- `write` keeps the caller's buffer, uncopied: its bytes must not change until delivered. The
  data plane guarantees it: a window keeps a chunk's source until the chunk is acknowledged.
- More than the high-water mark undelivered pauses the writer's protocol; delivery resumes it.
- `close` delivers what its end has queued, then ends both ends; `abort` drops what either end
  has queued and ends both at once. An end that has asked to close reads nothing more.
- There is no certificate: `Connection.identity` is None, as on plaintext TCP.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections import deque

from hauler.core.errors import ConnectionLost, HaulerError
from hauler.transport.connection import Connection, ConnectionHandler, _FrameProtocol, serve

DEFAULT_HIGH_WATER = 64 * 1024  # asyncio's default, until `Connection` sets WRITE_HIGH_WATER


class _Pipe(asyncio.Transport):
    """One end of an in-process link: what is written here goes to the peer end's protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: _FrameProtocol) -> None:
        super().__init__()  # no extra info: "socket" and "ssl_object" are None
        self._loop = loop
        self._protocol = protocol
        self._peer = self  # set by `connection_pair`
        self._queue: deque[memoryview] = deque()  # the writers' own buffers, not yet delivered
        self._queued_bytes = 0
        self._high_water, self._low_water = DEFAULT_HIGH_WATER, DEFAULT_HIGH_WATER // 4
        self._paused = False  # our protocol was told to pause writing
        self._scheduled = False  # a `_deliver` is waiting on the loop
        self._closing = False  # close or abort asked: this end reads nothing more
        self._dead = False  # aborted or lost: nothing moves either way
        self._lost = False  # our protocol has been told `connection_lost`

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` for the peer, by reference: it must not change until delivered."""
        view = memoryview(data).cast("B")
        if self._closing or not view.nbytes:
            return  # as on a closed socket transport: nothing more leaves
        self._queue.append(view)
        self._queued_bytes += view.nbytes
        self._schedule()
        if not self._paused and self._queued_bytes > self._high_water:
            self._paused = True
            self._protocol.pause_writing()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        """Hand the queue to the peer's protocol, in order; then finish a close, or resume."""
        self._scheduled = False
        try:
            while self._queue and not self._peer._closing:
                view = self._queue.popleft()
                self._queued_bytes -= view.nbytes
                self._feed(view)
        except Exception as error:  # a bug below the protocol's own handling: end the link
            self._loop.call_exception_handler(
                {"message": "in-process delivery failed", "exception": error, "transport": self}
            )
            self._lose(error, error)
            return
        if self._closing and not self._dead:
            self._lose(None, None)
        elif self._paused and self._queued_bytes <= self._low_water:
            self._paused = False
            self._protocol.resume_writing()

    def _feed(self, view: memoryview) -> None:
        """Copy `view` into the buffers the peer's protocol asks for, as asyncio's
        BufferedProtocol machinery does, until it is consumed or the peer stops reading."""
        protocol = self._peer._protocol
        while view.nbytes and not self._peer._closing:
            buffer = memoryview(protocol.get_buffer(view.nbytes)).cast("B")
            size = min(buffer.nbytes, view.nbytes)
            if not size:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buffer[:size] = view[:size]
            view = view[size:]
            protocol.buffer_updated(size)

    def close(self) -> None:
        """Deliver what this end has queued, then end both ends (`connection_lost(None)`)."""
        if not self._closing:
            self._closing = True
            self._schedule()

    def abort(self) -> None:
        """Drop what either end has queued; both protocols lose the connection on the next turn
        of the loop (the peer's with a reset, as a socket's would)."""
        if not self._dead:
            self._stop()
            self._peer._stop()
            reset = ConnectionResetError("the peer aborted the connection")
            self._loop.call_soon(self._lose, None, reset)

    def _stop(self) -> None:
        self._closing = self._dead = True
        self._queue.clear()  # releases the writers' buffers (a mapping cannot close while viewed)
        self._queued_bytes = 0
        self._paused = False

    def _lose(self, ours: Exception | None, theirs: Exception | None) -> None:
        self._stop()
        self._peer._stop()
        for end, exc in ((self, ours), (self._peer, theirs)):
            if not end._lost:
                end._lost = True
                end._protocol.connection_lost(exc)

    def is_closing(self) -> bool:
        return self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """asyncio's rule: `high` defaults to 64 KiB, `low` to a quarter of `high`."""
        high = DEFAULT_HIGH_WATER if high is None else high
        low = high // 4 if low is None else low
        if not high >= low >= 0:
            raise ValueError(f"high ({high}) must be >= low ({low}) must be >= 0")
        self._high_water, self._low_water = high, low


def connection_pair() -> tuple[Connection, Connection]:
    """Two connected ends without a listener, in the running event loop: what one writes, the
    other reads. Either end's `close` or `abort` ends both."""
    loop = asyncio.get_running_loop()
    protocols = _FrameProtocol(), _FrameProtocol()
    ends = _Pipe(loop, protocols[0]), _Pipe(loop, protocols[1])
    ends[0]._peer, ends[1]._peer = ends[1], ends[0]
    for end, protocol in zip(ends, protocols):
        protocol.connection_made(end)
    return protocols[0].made.result(), protocols[1].made.result()


class InprocListener:
    """A name in one event loop accepting in-process connections; each accepted connection runs
    `handler` in its own task."""

    def __init__(self, name: str, handler: ConnectionHandler) -> None:
        self.name = name
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()

    def _accept(self) -> Connection:
        """A new link: the dialler gets one end, the handler serves the other."""
        dialled, accepted = connection_pair()
        task = asyncio.get_running_loop().create_task(serve(accepted, self._handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dialled

    async def close(self) -> None:
        """Stop accepting; cancel the handlers (each closes its connection) and wait for them."""
        listeners = _listeners.get(asyncio.get_running_loop(), {})
        if listeners.get(self.name) is self:
            del listeners[self.name]
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# Listeners by name, per event loop: a name, like a port, means something only where it listens.
_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, InprocListener]] = (
    weakref.WeakKeyDictionary()
)
_fresh_names = (f"listener-{number}" for number in itertools.count(1))


async def listen_inproc(name: str, handler: ConnectionHandler) -> InprocListener:
    """Accept in-process data-plane connections at `name` in the running event loop ("" picks a
    free name, as port 0 does); a name another listener holds is refused."""
    listeners = _listeners.setdefault(asyncio.get_running_loop(), {})
    if not name:
        name = next(fresh for fresh in _fresh_names if fresh not in listeners)
    if name in listeners:
        raise HaulerError(
            f"cannot listen on inproc://{name}: another listener holds that name in "
            "this event loop; pick another name"
        )
    listeners[name] = listener = InprocListener(name, handler)
    return listener


async def connect_inproc(name: str) -> Connection:
    """Open an in-process data-plane connection to the listener at `name`."""
    listener = _listeners.get(asyncio.get_running_loop(), {}).get(name)
    if listener is None:
        raise ConnectionLost(
            f"cannot reach the data plane at inproc://{name}: nothing listens "
            "there in this event loop; is the listener started, or closed?"
        )
    return listener._accept()


__all__ = ["InprocListener", "connect_inproc", "connection_pair", "listen_inproc"]
