"""The tensor-stream protocol, sans I/O: frames, the sender's window, the receiver's ledger.

Nothing here imports asyncio, socket, ssl or grpc; `hauler.transport` moves the bytes.
"""

from hauler.transfer.frames import (
    FrameHeader,
    Kind,
    ack_frame,
    control_frame,
    hello_frame,
    parse_hello,
)
from hauler.transfer.ledger import ReceiveLedger
from hauler.transfer.reader import Frame, FrameReader
from hauler.transfer.window import SendSchedule, SendWindow, WindowStatistics

__all__ = [
    "Frame",
    "FrameHeader",
    "FrameReader",
    "Kind",
    "ReceiveLedger",
    "SendSchedule",
    "SendWindow",
    "WindowStatistics",
    "ack_frame",
    "control_frame",
    "hello_frame",
    "parse_hello",
]
