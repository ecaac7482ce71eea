"""The data-plane frame: a fixed 32-byte header, then `length` payload bytes.

    magic  4s  b"HLR1"
    kind   u8  HELLO | DATA | ACK | ERROR
    flags  u8  reserved, 0
    spare  u16 reserved, 0
    tensor u32 DATA: tensor index in the manifest
    offset u64 DATA: byte offset within the tensor; ACK: next chunk seq expected
    length u32 payload bytes (DATA: the chunk; HELLO/ERROR: UTF-8 JSON or text)
    check  u64 xxh3-64 of the payload; for an ACK, of its offset field (a corrupted
               acknowledgement must not move a window)

No transfer id per frame: a connection is bound to one transfer by its HELLO.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from hauler.core.errors import RemoteProtocolError
from hauler.model.manifest import MAX_CHUNK_BYTES, chunk_checksum

MAGIC = b"HLR1"
HEADER = struct.Struct("<4sBBHIQIQ")
MAX_CONTROL_PAYLOAD = 64 << 10  # a HELLO or ERROR is a few hundred bytes; refuse more
_U64 = struct.Struct("<Q")


class Kind(IntEnum):
    HELLO = 1
    DATA = 2
    ACK = 3
    ERROR = 4


@dataclass(frozen=True)
class FrameHeader:
    kind: Kind
    tensor: int = 0
    offset: int = 0
    length: int = 0
    checksum: int = 0

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC, self.kind, 0, 0, self.tensor, self.offset, self.length, self.checksum)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> FrameHeader:
        """Parse and bound-check a header; anything malformed is a RemoteProtocolError."""
        if len(data) != HEADER.size:
            raise RemoteProtocolError(f"frame header of {len(data)} bytes, not {HEADER.size}")
        magic, kind, flags, spare, tensor, offset, length, checksum = HEADER.unpack(data)
        if magic != MAGIC or flags or spare:
            raise RemoteProtocolError("not a Hauler data-plane frame (bad magic or reserved bits)")
        try:
            kind = Kind(kind)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame kind {kind}") from None
        limit = MAX_CHUNK_BYTES if kind is Kind.DATA else MAX_CONTROL_PAYLOAD
        if length > limit or (kind is Kind.ACK and length):
            raise RemoteProtocolError(f"{kind.name} frame of {length} bytes exceeds {limit}")
        return cls(kind, tensor, offset, length, checksum)


def control_frame(kind: Kind, payload: bytes) -> bytes:
    """A HELLO or ERROR frame with its payload."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("control payload too large")
    return FrameHeader(kind, length=len(payload), checksum=chunk_checksum(memoryview(payload))).encode() + payload


def ack_checksum(next_seq: int) -> int:
    return chunk_checksum(memoryview(_U64.pack(next_seq)))


def ack_frame(next_seq: int) -> bytes:
    """Acknowledge every chunk before `next_seq`: they are written where they belong."""
    return FrameHeader(Kind.ACK, offset=next_seq, checksum=ack_checksum(next_seq)).encode()
