"""The sender's window: what to send next, what is in flight, where to resume.

The window advances on acknowledgements, never on "written to the socket": an
ack means the receiver holds the chunk durably. After a reconnect the receiver's
first ACK names where to resume, and at most one window is sent again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hauler.core.errors import RemoteProtocolError
from hauler.model.manifest import Chunk
from hauler.model.plan import ChunkPlan


@dataclass(frozen=True)
class WindowStatistics:
    bytes_sent: int
    bytes_acked: int
    bytes_resent: int
    resumes: int


class SendWindow:
    """At most `window_chunks` unacknowledged chunks; `take` the next, `on_ack` frees room."""

    def __init__(self, plan: ChunkPlan, window_chunks: int, lane: range | None = None) -> None:
        self.plan = plan
        self.window_chunks = window_chunks
        self.lane = lane if lane is not None else range(plan.total)  # the chunks this window sends
        self.next_seq = self.lane.start
        self.acked_seq = self.lane.start
        self._in_flight: deque[Chunk] = deque()
        self._bytes_sent = self._bytes_acked = self._bytes_resent = self._resumes = 0

    @property
    def done(self) -> bool:
        return self.acked_seq == self.lane.stop

    def has_room(self) -> bool:
        return self.next_seq < self.lane.stop and len(self._in_flight) < self.window_chunks

    def take(self) -> Chunk:
        """The next chunk to send; the caller checked `has_room()`."""
        chunk = self.plan.chunk(self.next_seq)
        self._in_flight.append(chunk)
        self.next_seq += 1
        self._bytes_sent += chunk.length
        return chunk

    def on_ack(self, seq: int) -> int:
        """Every chunk before `seq` is durable at the receiver; returns bytes newly acknowledged."""
        if not self.acked_seq <= seq <= self.next_seq:
            raise RemoteProtocolError(f"ack for chunk {seq} outside the window {self.acked_seq}..{self.next_seq}")
        freed = 0
        while self._in_flight and self._in_flight[0].seq < seq:
            freed += self._in_flight.popleft().length
        self.acked_seq = seq
        self._bytes_acked += freed
        return freed

    def resume(self, seq: int) -> None:
        """Restart from the receiver's acknowledged position `seq` (its first ACK on a connection)."""
        if self.next_seq == self.lane.start == seq:
            return
        self.on_ack(seq)
        self._bytes_resent += sum(chunk.length for chunk in self._in_flight)
        self._in_flight.clear()
        self.next_seq = seq
        self._resumes += 1

    def statistics(self) -> WindowStatistics:
        return WindowStatistics(self._bytes_sent, self._bytes_acked, self._bytes_resent, self._resumes)
