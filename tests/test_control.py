"""The control plane's session stream over real gRPC on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hauler.transport import ControlChannel
from hauler.transport.control import ControlServer, MessageStream, Peer

WRITES = 30


async def echo(stream: MessageStream, peer: Peer) -> None:
    while (message := await stream.receive()) is not None:
        await stream.send({"echo": message["n"]})


async def refuse(message: dict, peer: Peer) -> dict:
    raise AssertionError("not used")


async def nothing(message: dict, peer: Peer) -> AsyncIterator[dict]:
    return
    yield {}


async def test_tasks_cancelled_while_writing_leave_the_session_working():
    """A site's task aborted while it reports on the shared stream must not end the session:
    grpc.aio cancels the whole call when a write is interrupted, so writes run to their end."""
    server = ControlServer(session=echo, call=refuse, watch=nothing)
    port = await server.start("127.0.0.1", 0)
    channel = ControlChannel("127.0.0.1", port)
    stream = channel.session()
    try:
        for n in range(WRITES):
            writer = asyncio.create_task(stream.send({"n": n}))
            await asyncio.sleep(0)  # the write has begun
            writer.cancel()
        await stream.send({"n": WRITES})
        echoed = []
        while not echoed or echoed[-1] != WRITES:
            echoed.append((await asyncio.wait_for(stream.receive(), 10))["echo"])
        assert echoed == list(range(WRITES + 1))  # every write went out, in order, on a live stream
    finally:
        stream.cancel()
        await channel.close()
        await server.stop()
