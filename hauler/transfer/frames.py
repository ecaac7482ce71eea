"""The data-plane frame: a fixed 32-byte header, then `length` payload bytes.

    magic  4s  b"HLR1"
    kind   u8  HELLO | DATA | ACK | ERROR | END
    flags  u8  reserved, 0
    spare  u16 reserved, 0
    tensor u32 DATA: tensor index in the manifest
    offset u64 DATA: byte offset within the tensor; ACK: chunks of this lane landed
    length u32 payload bytes (DATA: the chunk; HELLO/ERROR: UTF-8 JSON or text; END: none)
    check  u64 xxh3-64 of the payload; for DATA, XOR the xxh3-64 of (tensor, offset, length),
               so a corrupted header fails like a corrupted payload rather than landing a
               chunk in another's place; for an ACK, of its offset field (a corrupted
               acknowledgement must not move a window)

No transfer id per frame: a connection is bound to one lane of a transfer by its HELLO. The
sender ends a lane with END once every chunk it sent there is acknowledged and no chunk is
left for any lane; only then does the receiver's side of that lane return.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

from hauler.core.errors import RemoteProtocolError
from hauler.core.untrusted_json import parse_object
from hauler.model.manifest import MAX_CHUNK_BYTES, chunk_checksum

MAGIC = b"HLR1"
HEADER = struct.Struct("<4sBBHIQIQ")
MAX_CONTROL_PAYLOAD = 64 << 10  # a HELLO or ERROR is a few hundred bytes; refuse more
MAX_TRANSFER_ID = 128  # ids are 32 hex digits
MAX_LANES = 64  # as DataPlane.connections allows
_U64 = struct.Struct("<Q")
_PLACE = struct.Struct("<IQI")


class Kind(IntEnum):
    HELLO = 1
    DATA = 2
    ACK = 3
    ERROR = 4
    END = 5


@dataclass(frozen=True)
class FrameHeader:
    kind: Kind
    tensor: int = 0
    offset: int = 0
    length: int = 0
    checksum: int = 0

    @classmethod
    def data(cls, tensor: int, offset: int, length: int, payload_checksum: int) -> FrameHeader:
        """The header of a chunk whose payload has checksum `payload_checksum`."""
        return cls(
            Kind.DATA, tensor, offset, length, data_check(tensor, offset, length, payload_checksum)
        )

    def check_for(self, payload_checksum: int) -> int:
        """The check this header must carry when its payload has checksum `payload_checksum`."""
        if self.kind is Kind.ACK:
            return ack_checksum(self.offset)
        if self.kind is Kind.DATA:
            return data_check(self.tensor, self.offset, self.length, payload_checksum)
        return payload_checksum

    def encode(self) -> bytes:
        return HEADER.pack(
            MAGIC, self.kind, 0, 0, self.tensor, self.offset, self.length, self.checksum
        )

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
        if length > limit or (kind in (Kind.ACK, Kind.END) and length):
            raise RemoteProtocolError(f"{kind.name} frame of {length} bytes exceeds {limit}")
        return cls(kind, tensor, offset, length, checksum)


def control_frame(kind: Kind, payload: bytes = b"") -> bytes:
    """A HELLO, ERROR or END frame with its payload."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("control payload too large")
    return (
        FrameHeader(
            kind, length=len(payload), checksum=chunk_checksum(memoryview(payload))
        ).encode()
        + payload
    )


def hello_frame(transfer_id: str, lane: int) -> bytes:
    """The first frame of a data connection: which lane of which transfer it serves."""
    return control_frame(Kind.HELLO, json.dumps({"transfer": transfer_id, "lane": lane}).encode())


def parse_hello(frame_header: FrameHeader, payload: bytes) -> tuple[str, int]:
    """The (transfer id, lane) of a connection's first frame, which must be a valid HELLO."""
    if frame_header.kind is not Kind.HELLO:
        raise RemoteProtocolError(f"first frame must be HELLO, got {frame_header.kind.name}")
    hello = parse_object(payload, what="HELLO", max_depth=1)
    transfer_id, lane = hello.get("transfer"), hello.get("lane", 0)
    if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= MAX_TRANSFER_ID:
        raise RemoteProtocolError("HELLO names no valid transfer id")
    if type(lane) is not int or not 0 <= lane < MAX_LANES:
        raise RemoteProtocolError("HELLO names no valid lane")
    return transfer_id, lane


def data_check(tensor: int, offset: int, length: int, payload_checksum: int) -> int:
    """A DATA frame's check: its payload's checksum bound to the place its header names."""
    return payload_checksum ^ chunk_checksum(memoryview(_PLACE.pack(tensor, offset, length)))


def ack_checksum(held: int) -> int:
    return chunk_checksum(memoryview(_U64.pack(held)))


def ack_frame(held: int) -> bytes:
    """Acknowledge the first `held` chunks sent on this lane: they are written where they belong."""
    return FrameHeader(Kind.ACK, offset=held, checksum=ack_checksum(held)).encode()
