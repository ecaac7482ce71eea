"""Connections: the data plane's framed sockets and the gRPC control plane.

Other layers import only what is listed here; nothing above sees ssl, socket or grpc types.
"""

from hauler.transport.connection import Connection, Listener, connect, listen
from hauler.transport.control import (
    ControlChannel,
    ControlServer,
    Message,
    MessageStream,
    Peer,
)
from hauler.transport.inproc import (
    InprocListener,
    connect_inproc,
    connection_pair,
    listen_inproc,
)
from hauler.transport.streams import (
    DataAddress,
    fetch_model,
    open_transfer,
    push_model,
    read_hello,
    receive_model,
    refuse,
    send_model,
)

__all__ = [
    "DataAddress",
    "fetch_model",
    "push_model",
    "Connection",
    "ControlChannel",
    "ControlServer",
    "Listener",
    "Message",
    "MessageStream",
    "Peer",
    "InprocListener",
    "connect_inproc",
    "connection_pair",
    "listen_inproc",
    "connect",
    "listen",
    "open_transfer",
    "read_hello",
    "receive_model",
    "refuse",
    "send_model",
]
