"""The server's open transfers, and the data-plane handler that serves them.

Each transfer is bound to one site and one direction when the control plane
creates it; a data-plane connection names it in its HELLO. Ids are random 128-bit
tokens, so a transfer cannot be guessed.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from hauler.core.config import DataPlane, Timeouts
from hauler.core.errors import HaulerError, JobError, SecurityError
from hauler.core.timeouts import SilenceTimer
from hauler.model import Chunk, ChunkPlan, Manifest
from hauler.server.access import AccessPolicy
from hauler.transfer import ReceiveLedger, WindowStatistics
from hauler.transport import Connection, read_hello, receive_model, refuse, send_model
from hauler.transport.streams import ChunkSink, ChunkSource


@dataclass
class Transfer:
    """One model moving between the server and a site (or admin)."""

    id: str
    peer: str
    direction: Literal["download", "upload"]  # as seen by the peer: download = server sends
    manifest: Manifest
    file: ChunkSource
    done: asyncio.Future[None]
    ledger: ReceiveLedger | None = None
    on_chunk: Callable[[Chunk], None] | None = None
    bytes_done: int = 0
    statistics: WindowStatistics | None = None
    connection: Connection | None = None
    listeners: list[Callable[[int], None]] = field(default_factory=list)

    def progressed(self, nbytes: int) -> None:
        self.bytes_done += nbytes
        for listener in list(self.listeners):
            listener(nbytes)

    async def wait(self, seconds: float | None, what: str) -> None:
        """Wait for the transfer to finish; fail after `seconds` (communication_timeout) of no progress."""
        async with SilenceTimer(seconds, "communication_timeout", what) as timer:
            self.listeners.append(timer.touch)
            try:
                await asyncio.shield(self.done)
            finally:
                self.listeners.remove(timer.touch)


class TransferRegistry:
    """Creates transfers and serves them on the data plane."""

    def __init__(self, dataplane: DataPlane, timeouts: Timeouts, access: AccessPolicy) -> None:
        self.dataplane = dataplane
        self.timeouts = timeouts
        self.access = access
        self._transfers: dict[str, Transfer] = {}

    def offer(self, peer: str, manifest: Manifest, source: ChunkSource) -> Transfer:
        """A model the server will send to `peer` when it connects."""
        return self._add(Transfer(secrets.token_hex(16), peer, "download", manifest, source, _future()))

    def expect(self, peer: str, manifest: Manifest, sink: ChunkSink, on_chunk: Callable[[Chunk], None]) -> Transfer:
        """A model the server will receive from `peer`: chunks land in `sink`, then go to `on_chunk`."""
        ledger = ReceiveLedger(ChunkPlan(manifest))
        return self._add(Transfer(secrets.token_hex(16), peer, "upload", manifest, sink, _future(), ledger, on_chunk))

    def _add(self, transfer: Transfer) -> Transfer:
        self._transfers[transfer.id] = transfer
        return transfer

    def discard(self, *transfers: Transfer | None) -> None:
        """Forget transfers; a peer still connected to one is refused from now on."""
        for transfer in transfers:
            if transfer is not None:
                self._transfers.pop(transfer.id, None)
                if transfer.connection is not None:
                    transfer.connection.abort()  # no byte may land after a discard
                if not transfer.done.done():
                    transfer.done.set_exception(JobError("transfer discarded"))
                    transfer.done.exception()  # retrieved: nobody may be waiting any more

    async def handle(self, connection: Connection) -> None:
        """Data-plane entry point: bind the connection to its transfer and run it."""
        transfer_id = await read_hello(connection, self.timeouts)
        transfer = self._transfers.get(transfer_id)
        if transfer is None or transfer.done.done() or transfer.connection is not None:
            refuse(connection, "unknown, busy or finished transfer")
            return
        try:
            self.access.check_transfer(connection.identity, transfer.peer)
        except SecurityError as error:
            refuse(connection, str(error))
            raise
        transfer.connection = connection
        try:
            await self._run(connection, transfer)
        except HaulerError as error:
            if not transfer.done.done():
                transfer.done.set_exception(error)
            raise
        finally:
            transfer.connection = None
        if not transfer.done.done():
            transfer.done.set_result(None)

    async def _run(self, connection: Connection, transfer: Transfer) -> None:
        if transfer.direction == "download":
            transfer.statistics = await send_model(
                connection, transfer.manifest, transfer.file, window_chunks=self.dataplane.window_chunks,
                timeouts=self.timeouts, on_progress=transfer.progressed,
            )
        else:
            assert transfer.ledger is not None and transfer.on_chunk is not None
            await receive_model(connection, transfer.ledger, transfer.file, timeouts=self.timeouts,
                                on_chunk=transfer.on_chunk, on_progress=transfer.progressed)


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()
