"""The server's open transfers, and the data-plane handler that serves them.

Each transfer is bound to one site and one direction when the control plane
creates it; a data-plane connection names it in its HELLO. Ids are random 128-bit
tokens, so a transfer cannot be guessed.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from hauler.core.config import DataPlane, Timeouts
from hauler.core.errors import (
    HaulerError,
    JobError,
    SecurityError,
    TransferTimeout,
)
from hauler.core.retry import resumable
from hauler.core.timeouts import SilenceTimer
from hauler.model import Chunk, ChunkPlan, Manifest
from hauler.server.access import AccessPolicy
from hauler.server.refusals import RefusalLog
from hauler.transfer import ReceiveLedger, SendSchedule
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
    lanes: int = 1  # parallel connections, sharing out the chunks
    ledger: ReceiveLedger | None = None  # uploads: what has landed, across lanes and reconnects
    schedule: SendSchedule | None = None  # downloads: what each lane sent, across reconnects
    on_chunk: Callable[[Chunk], None] | None = None
    bytes_done: int = 0
    bytes_discarded: int = 0
    interruption: str = ""  # why the last connection ended early, for the error a waiter sees
    connections: int = 0
    serving: dict[int, Connection] = field(default_factory=dict)
    locks: dict[int, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    listeners: list[Callable[[int], None]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return (
            self.ledger.done
            if self.ledger is not None
            else self.schedule is not None and self.schedule.done
        )

    @property
    def failed(self) -> bool:
        """Ended without its model (discarded, or data that contradicts its manifest)."""
        return self.done.done() and self.done.exception() is not None

    def statistics(self) -> dict[str, int]:
        """Bytes moved and re-sent, and reconnections, for the job's metrics."""
        # A sender knows what it sent twice; a receiver, the part-chunks a dropped link wasted
        # (chunks it acknowledged are never re-sent).
        resent = (
            self.schedule.statistics().bytes_resent
            if self.schedule is not None
            else self.bytes_discarded
        )
        return {
            "bytes": self.bytes_done,
            "bytes_resent": resent,
            "lanes": self.lanes,
            "reconnects": max(0, self.connections - self.lanes),
        }

    def progressed(self, nbytes: int) -> None:
        self.bytes_done += nbytes
        for listener in list(self.listeners):
            listener(nbytes)

    async def wait(self, seconds: float | None, what: str) -> None:
        """Wait for the transfer to finish; fail after `seconds` (communication_timeout) of no
        progress."""
        try:
            async with SilenceTimer(seconds, "communication_timeout", what) as timer:
                self.listeners.append(timer.touch)
                try:
                    await asyncio.shield(self.done)
                finally:
                    self.listeners.remove(timer.touch)
        except TransferTimeout as error:
            if self.interruption:
                raise TransferTimeout(
                    error.timeout_name,
                    error.seconds,
                    f"{what} (its last connection ended: {self.interruption})",
                ) from None
            raise


class TransferRegistry:
    """Creates transfers and serves them on the data plane."""

    def __init__(
        self,
        dataplane: DataPlane,
        timeouts: Timeouts,
        access: AccessPolicy,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.timeouts = timeouts
        self.access = access
        self.refusals = refusals or RefusalLog()
        self._transfers: dict[str, Transfer] = {}
        self._open: defaultdict[str, int] = defaultdict(int)  # peer -> data connections open

    def offer(self, peer: str, manifest: Manifest, source: ChunkSource) -> Transfer:
        """A model the server will send to `peer` when it connects, on one connection per lane."""
        schedule = SendSchedule(
            ChunkPlan(manifest), self.dataplane.window_chunks, self.dataplane.connections
        )
        return self._add(
            Transfer(
                secrets.token_hex(16),
                peer,
                "download",
                manifest,
                source,
                _future(),
                lanes=len(schedule.windows),
                schedule=schedule,
            )
        )

    def expect(
        self, peer: str, manifest: Manifest, sink: ChunkSink, on_chunk: Callable[[Chunk], None]
    ) -> Transfer:
        """A model the server will receive from `peer`: chunks land in `sink`, then go to
        `on_chunk`."""
        ledger = ReceiveLedger(ChunkPlan(manifest), self.dataplane.connections)
        return self._add(
            Transfer(
                secrets.token_hex(16),
                peer,
                "upload",
                manifest,
                sink,
                _future(),
                lanes=ledger.lanes,
                ledger=ledger,
                on_chunk=on_chunk,
            )
        )

    def _add(self, transfer: Transfer) -> Transfer:
        self._transfers[transfer.id] = transfer
        return transfer

    def discard(self, *transfers: Transfer | None) -> None:
        """Forget transfers; a peer still connected to one is refused from now on."""
        for transfer in transfers:
            if transfer is not None:
                self._transfers.pop(transfer.id, None)
                for connection in list(transfer.serving.values()):
                    connection.abort()  # no byte may land after a discard
                if not transfer.done.done():
                    transfer.done.set_exception(JobError("transfer discarded"))
                    transfer.done.exception()  # retrieved: nobody may be waiting any more

    async def handle(self, connection: Connection) -> None:
        """Data-plane entry point: bind the connection to its transfer and run it.

        A connection that drops leaves the transfer open: the peer reconnects and resumes
        where the acknowledgements say. A newer connection to the same lane replaces an
        older one the server has not yet seen die. A transfer is done once every chunk is
        acknowledged (downloads) or has landed (uploads) and no lane is still being served, so
        a discard never cuts a lane's END; until the discard it is still served (a lane whose
        END or last ACK was lost ends at once). Only silence
        (the waiter's communication_timeout) or a discard ends a transfer unfinished.
        A peer holds at most `max_connections_per_peer` connections; refusals are logged."""
        peer = _peer_name(connection)
        if self._open[peer] >= self.dataplane.max_connections_per_peer:
            self._refuse(
                connection,
                peer,
                "connections",
                f"more than {self.dataplane.max_connections_per_peer} "
                "data connections open at once (max_connections_per_peer)",
            )
            return
        self._open[peer] += 1
        try:
            bound = await self._bind(connection, peer)
            if bound is not None:
                await self._serve(connection, *bound)
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]

    async def _bind(self, connection: Connection, peer: str) -> tuple[Transfer, int] | None:
        """The transfer and lane a connection's HELLO names, if it may serve them."""
        try:
            transfer_id, lane = await read_hello(connection, self.dataplane.hello_timeout_s)
        except HaulerError as error:
            self.refusals.refused(peer, "hello", str(error))
            raise
        transfer = self._transfers.get(transfer_id)
        if transfer is None or transfer.failed or lane >= transfer.lanes:
            self._refuse(
                connection, peer, "transfer", "unknown or failed transfer, or no such lane"
            )
            return None
        try:
            self.access.check_transfer(connection.identity, transfer.peer)
        except SecurityError as error:
            self._refuse(connection, peer, "security", str(error))
            raise
        return transfer, lane

    def _refuse(self, connection: Connection, peer: str, kind: str, reason: str) -> None:
        self.refusals.refused(peer, kind, reason)
        refuse(connection, reason)

    async def _serve(self, connection: Connection, transfer: Transfer, lane: int) -> None:
        if lane in transfer.serving:
            transfer.serving[lane].abort()
        async with transfer.locks[lane]:
            if transfer.failed:
                refuse(connection, "failed transfer")
                return
            transfer.serving[lane], transfer.connections = connection, transfer.connections + 1
            try:
                await self._run(connection, transfer, lane)
            except HaulerError as error:
                transfer.interruption = str(error)
                if not resumable(error) and not transfer.done.done():
                    transfer.done.set_exception(
                        error
                    )  # a refused update, or data and manifest disagree
                raise
            finally:
                del transfer.serving[lane]
                transfer.bytes_discarded += connection.reader.partial_payload_bytes
                if transfer.complete and not transfer.serving and not transfer.done.done():
                    transfer.done.set_result(None)  # once no lane is still sending its END

    async def _run(self, connection: Connection, transfer: Transfer, lane: int) -> None:
        if transfer.direction == "download":
            assert transfer.schedule is not None
            await send_model(
                connection,
                transfer.manifest,
                transfer.file,
                window_chunks=self.dataplane.window_chunks,
                timeouts=self.timeouts,
                on_progress=transfer.progressed,
                window=transfer.schedule.windows[lane],
            )
        else:
            assert transfer.ledger is not None and transfer.on_chunk is not None
            await receive_model(
                connection,
                transfer.ledger,
                transfer.file,
                timeouts=self.timeouts,
                lane=lane,
                on_chunk=transfer.on_chunk,
                on_progress=transfer.progressed,
            )


def _peer_name(connection: Connection) -> str:
    """Whom a connection's limits and refusals are counted against: its certificate's name."""
    try:
        identity = connection.identity
    except SecurityError:
        return "(a certificate not issued by `hauler provision`)"
    return "(plaintext peers)" if identity is None else identity.name


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()
