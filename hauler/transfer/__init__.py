"""The tensor-stream protocol, sans I/O: frames, the sender's window, the receiver's ledger,
digests checked as chunks land, and the sinks they land in.

Nothing here imports asyncio, socket, ssl or grpc; `hauler.transport` moves the bytes.
"""

from hauler.transfer.digests import DigestCheck
from hauler.transfer.frames import (
    FrameHeader,
    Hello,
    Kind,
    ack_frame,
    control_frame,
    error_frame,
)
from hauler.transfer.ledger import ReceiveLedger
from hauler.transfer.reader import Frame, FrameReader
from hauler.transfer.sinks import FileSink, LaneBuffers
from hauler.transfer.window import PayloadBytes, SendSchedule, SendWindow, WindowStatistics

__all__ = [
    "DigestCheck",
    "FileSink",
    "Frame",
    "FrameHeader",
    "FrameReader",
    "Hello",
    "Kind",
    "LaneBuffers",
    "PayloadBytes",
    "ReceiveLedger",
    "SendSchedule",
    "SendWindow",
    "WindowStatistics",
    "ack_frame",
    "control_frame",
    "error_frame",
]
