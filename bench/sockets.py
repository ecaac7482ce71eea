"""The yardstick: plain blocking sockets moving the same bytes between two processes.

The sender `sendall`s a reused 64 MiB buffer, the receiver `recv_into`s a reused
one: no framing, no files, no checksums. What a transport could do at best here.
"""

from __future__ import annotations

import multiprocessing
import socket
import ssl
import time

BUFFER_BYTES = 64 << 20


def _receive(listener: socket.socket, total_bytes: int, context: ssl.SSLContext | None) -> None:
    connection, _ = listener.accept()
    if context is not None:
        connection = context.wrap_socket(connection, server_side=True)
    buffer = memoryview(bytearray(BUFFER_BYTES))
    remaining = total_bytes
    while remaining:
        received = connection.recv_into(buffer[: min(BUFFER_BYTES, remaining)])
        if not received:
            raise ConnectionError("sender closed early")
        remaining -= received
    connection.sendall(b"k")
    connection.close()


def blocking_socket_seconds(
    total_bytes: int,
    *,
    server_context: ssl.SSLContext | None = None,
    client_context: ssl.SSLContext | None = None,
) -> float:
    """Seconds for one connection between two processes to move `total_bytes` on loopback
    (through TLS when given the two contexts)."""
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = multiprocessing.get_context("fork").Process(
        target=_receive, args=(listener, total_bytes, server_context)
    )
    receiver.start()
    payload = memoryview(bytearray(b"\x01" * BUFFER_BYTES))
    plain = socket.create_connection(listener.getsockname())
    with (
        client_context.wrap_socket(plain, server_hostname="127.0.0.1")
        if client_context
        else plain as sender
    ):
        started = time.perf_counter()
        remaining = total_bytes
        while remaining:
            piece = payload[: min(BUFFER_BYTES, remaining)]
            sender.sendall(piece)
            remaining -= len(piece)
        sender.recv(1)
        elapsed = time.perf_counter() - started
    receiver.join()
    listener.close()
    return elapsed
