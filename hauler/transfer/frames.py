"""The data-plane frame: a fixed 32-byte header, then `length` payload bytes.

    magic  4s  b"HLR2"
    kind   u8  HELLO | DATA | ACK | ERROR | END
    flags  u8  reserved, 0
    spare  u16 reserved, 0
    spare  u32 reserved, 0
    seq    u64 DATA: the chunk's sequence number; ACK: chunks of this lane landed
    length u32 payload bytes (DATA: the chunk, raw or encoded; HELLO/ERROR: UTF-8 JSON or
               text; ACK/END: none)
    check  u64 xxh3-64 of the payload; for DATA, XOR the xxh3-64 of (seq, length), so a
               corrupted header fails like a corrupted payload rather than landing a chunk
               in another's place; for an ACK, of its seq field (a corrupted acknowledgement
               must not move a window)

No transfer id per frame: a connection is bound to one lane of a transfer by its HELLO, a
JSON object `{"transfer": id, "lane": n}` with exactly those keys. The sender ends a lane with
END once every chunk it sent there is acknowledged and no chunk is left for any lane; only
then does the receiver's side of that lane return. Everything here is pure: bytes in, values
out, and every value from a peer is checked against the named limits below.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from hauler.core.errors import RemoteProtocolError
from hauler.core.untrusted_json import parse_object
from hauler.model.manifest import MAX_CHUNK_BYTES, chunk_checksum

MAGIC = b"HLR2"
HEADER = struct.Struct("<4sBBHIQIQ")
MAX_CONTROL_PAYLOAD = 64 << 10  # a HELLO or ERROR is a few hundred bytes; refuse more
MAX_ENCODED_CHUNK_BYTES = MAX_CHUNK_BYTES + (MAX_CHUNK_BYTES >> 3)  # a codec may expand a little
MAX_ERROR_TEXT = 1024  # what an ERROR frame says, at most
TRANSFER_ID = re.compile(r"[0-9a-f]{32}")  # 128 random bits, as the server draws them
MAX_LANES = 64  # as DataPlane.connections allows
HELLO_KEYS = {"transfer", "lane"}
_U64 = struct.Struct("<Q")
_PLACE = struct.Struct("<QI")


class Kind(IntEnum):
    HELLO = 1
    DATA = 2
    ACK = 3
    ERROR = 4
    END = 5


@dataclass(frozen=True)
class FrameHeader:
    kind: Kind
    seq: int = 0
    length: int = 0
    checksum: int = 0

    @classmethod
    def data(cls, seq: int, length: int, payload_checksum: int) -> FrameHeader:
        """The header of chunk `seq` whose payload has checksum `payload_checksum`."""
        return cls(Kind.DATA, seq, length, data_check(seq, length, payload_checksum))

    def check_for(self, payload_checksum: int) -> int:
        """The check this header must carry when its payload has checksum `payload_checksum`."""
        if self.kind is Kind.ACK:
            return ack_checksum(self.seq)
        if self.kind is Kind.DATA:
            return data_check(self.seq, self.length, payload_checksum)
        return payload_checksum

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC, self.kind, 0, 0, 0, self.seq, self.length, self.checksum)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> FrameHeader:
        """Parse and bound-check a header; anything malformed is a RemoteProtocolError."""
        if len(data) != HEADER.size:
            raise RemoteProtocolError(f"frame header of {len(data)} bytes, not {HEADER.size}")
        magic, kind, flags, spare, reserved, seq, length, checksum = HEADER.unpack(data)
        if magic != MAGIC or flags or spare or reserved:
            raise RemoteProtocolError("not a Hauler data-plane frame (bad magic or reserved bits)")
        try:
            kind = Kind(kind)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame kind {kind}") from None
        limit = MAX_ENCODED_CHUNK_BYTES if kind is Kind.DATA else MAX_CONTROL_PAYLOAD
        if length > limit or (kind in (Kind.ACK, Kind.END) and length):
            raise RemoteProtocolError(f"{kind.name} frame of {length} bytes exceeds {limit}")
        return cls(kind, seq, length, checksum)


@dataclass(frozen=True)
class Hello:
    """A data connection's first frame: which lane of which transfer it serves."""

    transfer: str
    lane: int

    def encode(self) -> bytes:
        payload = json.dumps({"transfer": self.transfer, "lane": self.lane}).encode()
        return control_frame(Kind.HELLO, payload)

    @classmethod
    def decode(cls, header: FrameHeader, payload: bytes) -> Hello:
        """The HELLO a connection opened with; anything else is a RemoteProtocolError."""
        if header.kind is not Kind.HELLO:
            raise RemoteProtocolError(f"first frame must be HELLO, got {header.kind.name}")
        hello = parse_object(payload, what="HELLO", max_depth=1)
        if set(hello) != HELLO_KEYS:
            raise RemoteProtocolError(f"HELLO must hold exactly {sorted(HELLO_KEYS)}")
        transfer, lane = hello["transfer"], hello["lane"]
        if not isinstance(transfer, str) or not TRANSFER_ID.fullmatch(transfer):
            raise RemoteProtocolError("HELLO names no valid transfer id (32 hex digits)")
        if type(lane) is not int or not 0 <= lane < MAX_LANES:
            raise RemoteProtocolError(f"HELLO names no valid lane (0..{MAX_LANES - 1})")
        return cls(transfer, lane)


def control_frame(kind: Kind, payload: bytes = b"") -> bytes:
    """A HELLO, ERROR or END frame with its payload."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("control payload too large")
    checksum = chunk_checksum(memoryview(payload))
    return FrameHeader(kind, length=len(payload), checksum=checksum).encode() + payload


def error_frame(reason: str) -> bytes:
    """An ERROR frame: why the sender is dropping the connection."""
    return control_frame(Kind.ERROR, reason.encode()[:MAX_ERROR_TEXT])


def data_check(seq: int, length: int, payload_checksum: int) -> int:
    """A DATA frame's check: its payload's checksum bound to the chunk its header names."""
    return payload_checksum ^ chunk_checksum(memoryview(_PLACE.pack(seq, length)))


def ack_checksum(held: int) -> int:
    return chunk_checksum(memoryview(_U64.pack(held)))


def ack_frame(held: int) -> bytes:
    """Acknowledge the first `held` chunks sent on this lane: they are where they belong."""
    return FrameHeader(Kind.ACK, seq=held, checksum=ack_checksum(held)).encode()
