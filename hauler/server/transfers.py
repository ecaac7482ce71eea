"""The server's open transfers, and the data-plane handler that serves them.

A transfer is a `Download` (the server sends a model from a source) or an `Upload` (the server
receives one into a sink), bound to one peer when the control plane creates it; a data-plane
connection names it in its HELLO. Ids are random 128-bit tokens, so a transfer cannot be
guessed. A transfer outlives its connections: its schedule (downloads) or ledger (uploads)
says where each lane resumes.
"""

from __future__ import annotations

import abc
import asyncio
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TypeVar

from hauler.core.config import DataPlane, Timeouts
from hauler.core.errors import (
    HaulerError,
    JobError,
    SecurityError,
    TransferTimeout,
)
from hauler.core.retry import resumable
from hauler.core.timeouts import SilenceTimer
from hauler.model import ChunkPlan
from hauler.server.access import AccessPolicy
from hauler.server.refusals import RefusalLog
from hauler.transfer import PayloadBytes, ReceiveLedger, SendSchedule
from hauler.transport import Connection, read_hello, receive_model, refuse, send_model
from hauler.transport.streams import ChunkSink, ChunkSource

T = TypeVar("T", bound="Transfer")


class Transfer(abc.ABC):
    """One model moving between the server and a peer, on `lanes` connections at once."""

    def __init__(self, peer: str, lanes: int) -> None:
        self.id = secrets.token_hex(16)
        self.peer, self.lanes = peer, lanes
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_done = 0  # model bytes moved (their payload may have been encoded smaller)
        self.connections = 0
        self.interruption = ""  # why the last connection ended early, for a waiter's error
        self.serving: dict[int, Connection] = {}
        self.locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.listeners: list[Callable[[int], None]] = []

    @property
    @abc.abstractmethod
    def complete(self) -> bool:
        """Every chunk acknowledged (a download) or landed (an upload)."""

    @abc.abstractmethod
    async def run(self, connection: Connection, lane: int, timeouts: Timeouts) -> None:
        """Serve one lane on one connection, until that lane ends or the connection drops."""

    @abc.abstractmethod
    def wire_statistics(self) -> dict[str, int]:
        """Payload bytes on the wire and re-sent, as this side knows them."""

    def fail(self, error: BaseException) -> None:
        """End without the model, unless already ended; a waiter sees `error`, and nobody need
        be waiting any more."""
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()  # retrieved: asyncio would otherwise log it at collection

    @property
    def failed(self) -> bool:
        """Ended without its model (discarded, or data that contradicts its manifest)."""
        return self.done.done() and self.done.exception() is not None

    @abc.abstractmethod
    def connection_ended(self, connection: Connection) -> None:
        """A connection of this transfer is over: count what it wasted."""

    def statistics(self) -> dict[str, int]:
        """Model and wire bytes, bytes re-sent, lanes and reconnections, for the job's metrics."""
        return {
            "bytes": self.bytes_done,
            **self.wire_statistics(),
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
        await wait_any([self], seconds, what)


class Download(Transfer):
    """A model the server sends from `source`; its lanes share out the schedule's chunks."""

    def __init__(self, peer: str, source: ChunkSource, schedule: SendSchedule) -> None:
        super().__init__(peer, len(schedule.windows))
        self.source, self.schedule = source, schedule

    @property
    def complete(self) -> bool:
        return self.schedule.done

    async def run(self, connection: Connection, lane: int, timeouts: Timeouts) -> None:
        window = self.schedule.windows[lane]
        await send_model(
            connection, self.source, window, timeouts=timeouts, on_progress=self.progressed
        )

    def connection_ended(self, connection: Connection) -> None:
        """Nothing to count: the windows know what they send again."""

    def wire_statistics(self) -> dict[str, int]:
        """What the lanes sent that was acknowledged, and what a dropped link made them send
        again."""
        sent = self.schedule.statistics()
        return {"wire_bytes": sent.bytes_acked, "bytes_resent": sent.bytes_resent}


class Upload(Transfer):
    """A model the server receives into `sink`, as `ledger` allows; the ledger says what each
    lane holds across reconnections."""

    def __init__(self, peer: str, ledger: ReceiveLedger, sink: ChunkSink) -> None:
        super().__init__(peer, ledger.lanes)
        self.ledger, self.sink = ledger, sink
        self.bytes_discarded = 0

    @property
    def complete(self) -> bool:
        return self.ledger.done

    async def run(self, connection: Connection, lane: int, timeouts: Timeouts) -> None:
        await receive_model(
            connection,
            self.ledger,
            self.sink,
            timeouts=timeouts,
            lane=lane,
            on_progress=self.progressed,
        )

    def connection_ended(self, connection: Connection) -> None:
        """A receiver re-gets only the part-chunk a dropped link cut (acknowledged chunks are
        never re-sent)."""
        self.bytes_discarded += connection.partial_payload_bytes

    def wire_statistics(self) -> dict[str, int]:
        return {"wire_bytes": self.ledger.bytes_received, "bytes_resent": self.bytes_discarded}


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

    def offer(
        self,
        peer: str,
        plan: ChunkPlan,
        source: ChunkSource,
        payload_bytes: PayloadBytes | None = None,
    ) -> Download:
        """A model the server will send to `peer` when it connects, on one connection per lane;
        `payload_bytes` weighs encoded chunks (raw ones weigh their length)."""
        weigh = payload_bytes or (lambda chunk: chunk.length)
        schedule = SendSchedule(
            plan, self.dataplane.window_bytes, self.dataplane.connections, weigh
        )
        return self._add(Download(peer, source, schedule))

    def expect(self, peer: str, ledger: ReceiveLedger, sink: ChunkSink) -> Upload:
        """A model the server will receive from `peer`: chunks land where `sink` says, as
        `ledger` (made with `ledger_for`) allows."""
        return self._add(Upload(peer, ledger, sink))

    def ledger_for(self, plan: ChunkPlan, **options: object) -> ReceiveLedger:
        """A ledger for an upload on the server's number of lanes."""
        return ReceiveLedger(plan, self.dataplane.connections, **options)  # type: ignore[arg-type]

    def _add(self, transfer: T) -> T:
        self._transfers[transfer.id] = transfer
        return transfer

    def discard(self, *transfers: Transfer | None) -> None:
        """Forget transfers; a peer still connected to one is refused from now on."""
        for transfer in transfers:
            if transfer is not None:
                self._transfers.pop(transfer.id, None)
                for connection in list(transfer.serving.values()):
                    connection.abort()  # no byte may land after a discard
                transfer.fail(JobError("transfer discarded"))

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
            hello = await read_hello(connection, self.dataplane.hello_timeout_s)
        except HaulerError as error:
            self.refusals.refused(peer, "hello", str(error))
            raise
        transfer, lane = self._transfers.get(hello.transfer), hello.lane
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
                await transfer.run(connection, lane, self.timeouts)
            except HaulerError as error:
                transfer.interruption = str(error)
                if not resumable(error):  # a refused update, or data and manifest disagree
                    transfer.fail(error)
                raise
            finally:
                del transfer.serving[lane]
                transfer.connection_ended(connection)
                if transfer.complete and not transfer.serving and not transfer.done.done():
                    transfer.done.set_result(None)  # once no lane is still sending its END


def _peer_name(connection: Connection) -> str:
    """Whom a connection's limits and refusals are counted against: its certificate's name."""
    try:
        identity = connection.identity
    except SecurityError:
        return "(a certificate not issued by `hauler provision`)"
    return "(plaintext peers)" if identity is None else identity.name


async def wait_any(transfers: Sequence[T], seconds: float | None, what: str) -> T:
    """The first of `transfers` to finish (a peer offered several ways to get one model takes
    one); fails once all have failed, or after `seconds` (communication_timeout) without
    progress on any."""
    try:
        async with SilenceTimer(seconds, "communication_timeout", what) as timer:
            for transfer in transfers:
                transfer.listeners.append(timer.touch)
            try:
                return await _first_done(transfers)
            finally:
                for transfer in transfers:
                    transfer.listeners.remove(timer.touch)
    except TransferTimeout as error:
        interruptions = [t.interruption for t in transfers if t.interruption]
        if not interruptions:
            raise
        raise TransferTimeout(
            error.timeout_name,
            error.seconds,
            f"{what} (its last connection ended: {interruptions[-1]})",
        ) from None


async def _first_done(transfers: Sequence[T]) -> T:
    waiting = {asyncio.ensure_future(asyncio.shield(t.done)): t for t in transfers}
    failure: BaseException | None = None
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                transfer = waiting.pop(future)
                if future.exception() is None:
                    return transfer
                failure = future.exception()
        assert failure is not None
        raise failure
    finally:
        for future in waiting:
            future.cancel()
