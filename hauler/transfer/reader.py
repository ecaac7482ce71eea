"""Incremental frame reader for `BufferedProtocol`: bytes land where they belong.

`get_buffer()` hands out exactly the memory the next bytes must fill: the header
buffer, the chunk's final destination (asked of `destination` once the header is
validated), or a small bounded buffer for control payloads. It never over-reads,
so a payload is never copied between buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hauler.core.errors import IntegrityError, RemoteProtocolError
from hauler.model.manifest import chunk_checksum
from hauler.transfer.frames import HEADER, FrameHeader, Kind


@dataclass(frozen=True)
class Frame:
    """A complete frame: a DATA payload is already in its destination (`landed`, the view it
    filled), with its `checksum`; others carry `payload`."""

    header: FrameHeader
    payload: bytes = b""
    checksum: int = 0
    landed: memoryview = memoryview(b"")


Destination = Callable[[FrameHeader], memoryview]


class FrameReader:
    """Turns a byte stream into frames; `destination` places DATA payloads."""

    def __init__(self, destination: Destination | None = None) -> None:
        self.destination = destination
        self._header = bytearray(HEADER.size)
        self._current: FrameHeader | None = None
        self._target = memoryview(self._header)
        self._filled = 0

    @property
    def partial_payload_bytes(self) -> int:
        """Bytes of a DATA payload that has begun to arrive but is not complete."""
        if self._current is None or self._current.kind is not Kind.DATA:
            return 0
        return self._filled

    def get_buffer(self) -> memoryview:
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> Frame | None:
        """Account for `nbytes` written into the last buffer; return a frame when one completes."""
        self._filled += nbytes
        if self._filled < len(self._target):
            return None
        if self._current is None:
            self._current = FrameHeader.decode(self._header)
            self._start_payload(self._current)
            if self._current.length:
                return None
        return self._finish_frame()

    def _start_payload(self, header: FrameHeader) -> None:
        if header.kind is Kind.DATA:
            if self.destination is None:
                raise RemoteProtocolError("DATA frame on a connection that is not receiving")
            self._target = self.destination(header)
        else:
            self._target = memoryview(bytearray(header.length))
        self._filled = 0

    def _finish_frame(self) -> Frame:
        header, payload = self._current, self._target
        assert header is not None
        checksum = chunk_checksum(payload)
        if header.check_for(checksum) != header.checksum:
            raise IntegrityError(
                f"{header.kind.name} frame (seq {header.seq}): checksum mismatch; the chunk must "
                "be re-sent"
            )
        frame = (
            Frame(header, checksum=checksum, landed=payload)
            if header.kind is Kind.DATA
            else Frame(header, bytes(payload))
        )
        self._current, self._target, self._filled = None, memoryview(self._header), 0
        return frame
