"""The sender's side of a transfer: which chunk goes next on which lane, what is in flight,
where to resume.

A transfer's chunks are handed out in plan order to whichever lane (parallel connection)
has room first, so a fast connection carries more and all of them finish together: fixed
runs per connection left the slowest one sending alone at the end, on a path its peers had
just given up. A lane's room is counted in payload bytes (`window_bytes`), since encoded
chunks differ in size; it always has room for one chunk. Each lane keeps its chunks in the
order it sent them. The receiver acknowledges a lane by how many of them it holds durably,
never by "written to the socket"; after a reconnect its first ACK says how many, and the
lane sends again, in order, only what was not acknowledged: at most one window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hauler.core.errors import RemoteProtocolError
from hauler.model.manifest import Chunk
from hauler.model.plan import ChunkPlan

PayloadBytes = Callable[[Chunk], int]  # what a chunk weighs on the wire


@dataclass(frozen=True)
class WindowStatistics:
    bytes_sent: int
    bytes_acked: int
    bytes_resent: int
    resumes: int

    def __add__(self, other: WindowStatistics) -> WindowStatistics:
        return WindowStatistics(
            self.bytes_sent + other.bytes_sent,
            self.bytes_acked + other.bytes_acked,
            self.bytes_resent + other.bytes_resent,
            self.resumes + other.resumes,
        )


class ChunkCursor:
    """The next chunk of a transfer no lane has taken yet, shared by its lanes' windows."""

    def __init__(self, plan: ChunkPlan, payload_bytes: PayloadBytes) -> None:
        self.plan = plan
        self.payload_bytes = payload_bytes
        self._next_seq = 0

    @property
    def exhausted(self) -> bool:
        """Every chunk has been given to a lane."""
        return self._next_seq == self.plan.total

    def next_chunk(self) -> Chunk:
        """The first chunk no lane has taken; the caller checked `exhausted`."""
        chunk = self.plan.chunk(self._next_seq)
        self._next_seq += 1
        return chunk


class SendSchedule:
    """One transfer's chunks, in plan order, for `lanes` windows to take as they have room.
    (The windows share a cursor rather than point back here: no reference cycle, so a finished
    transfer's state is freed at once.)"""

    def __init__(
        self,
        plan: ChunkPlan,
        window_bytes: int,
        lanes: int = 1,
        payload_bytes: PayloadBytes = lambda chunk: chunk.length,
    ) -> None:
        self.plan = plan
        self.cursor = ChunkCursor(plan, payload_bytes)
        count = max(1, min(lanes, plan.total))
        self.windows = [SendWindow(self.cursor, window_bytes) for _ in range(count)]

    @property
    def done(self) -> bool:
        """Every chunk has been given to a lane and acknowledged on it."""
        return all(window.done for window in self.windows)

    def statistics(self) -> WindowStatistics:
        return sum((w.statistics() for w in self.windows), WindowStatistics(0, 0, 0, 0))


class SendWindow:
    """One lane: at most `window_bytes` unacknowledged (and always room for one chunk); `take`
    the next, `on_ack` frees room."""

    def __init__(self, cursor: ChunkCursor, window_bytes: int) -> None:
        self.cursor = cursor
        self.window_bytes = window_bytes
        self.acked = 0  # chunks of this lane the receiver holds
        self._in_flight: deque[Chunk] = deque()  # sent, not yet acknowledged, in sending order
        self._in_flight_bytes = 0
        self._resend: deque[Chunk] = deque()  # in flight when a connection dropped; they go first
        self._started = False
        self._bytes_sent = self._bytes_acked = self._bytes_resent = self._resumes = 0

    @property
    def done(self) -> bool:
        """Nothing of this lane unacknowledged and nothing left for any lane."""
        return not self._in_flight and not self._resend and self.cursor.exhausted

    def has_room(self) -> bool:
        more = bool(self._resend) or not self.cursor.exhausted
        return more and (not self._in_flight or self._in_flight_bytes < self.window_bytes)

    def take(self) -> Chunk:
        """The next chunk to send on this lane; the caller checked `has_room()`."""
        chunk = self._resend.popleft() if self._resend else self.cursor.next_chunk()
        nbytes = self.cursor.payload_bytes(chunk)
        self._in_flight.append(chunk)
        self._in_flight_bytes += nbytes
        self._bytes_sent += nbytes
        return chunk

    def on_ack(self, held: int) -> int:
        """The receiver holds the first `held` chunks of this lane; returns the model bytes they
        stand for, newly acknowledged (their payload may have been smaller)."""
        if not self.acked <= held <= self.acked + len(self._in_flight):
            raise RemoteProtocolError(
                f"ack of {held} chunks on a lane that sent {self.acked + len(self._in_flight)}, "
                f"{self.acked} of them acknowledged before"
            )
        raw = 0
        for _ in range(held - self.acked):
            chunk = self._in_flight.popleft()
            payload = self.cursor.payload_bytes(chunk)
            self._in_flight_bytes -= payload
            self._bytes_acked += payload
            raw += chunk.length
        self.acked = held
        return raw

    def resume(self, held: int) -> None:
        """A connection begins: the receiver's first ACK says it holds `held` of this lane's
        chunks."""
        self.on_ack(held)
        if not self._started:
            self._started = True
            return
        self._bytes_resent += self._in_flight_bytes
        self._resend.extendleft(reversed(self._in_flight))
        self._in_flight.clear()
        self._in_flight_bytes = 0
        self._resumes += 1

    def statistics(self) -> WindowStatistics:
        return WindowStatistics(
            self._bytes_sent, self._bytes_acked, self._bytes_resent, self._resumes
        )
