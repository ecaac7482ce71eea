"""Connected sites: one control session each, with the results they owe the server."""

from __future__ import annotations

import asyncio
import time

from hauler.core.errors import ConnectionLost
from hauler.core.messages import ResultReady, TaskFailed, dump
from hauler.transport import MessageStream


class SiteSession:
    """A connected site: send it messages, await the results of its tasks."""

    def __init__(self, name: str, stream: MessageStream) -> None:
        self.name = name
        self._stream = stream
        self.connected_s = time.time()
        self.deployed_jobs: set[str] = set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._results: dict[str, asyncio.Future[ResultReady]] = {}

    async def send(self, message: object) -> None:
        await self._stream.send(dump(message))  # type: ignore[arg-type]

    def expect_result(self, task_id: str) -> asyncio.Future[ResultReady]:
        future = asyncio.get_running_loop().create_future()
        self._results[task_id] = future
        return future

    def forget(self, task_id: str) -> None:
        self._results.pop(task_id, None)

    def deliver(self, message: ResultReady | TaskFailed) -> None:
        future = self._results.pop(message.task_id, None)
        if future is None or future.done():
            return
        if isinstance(message, TaskFailed):
            future.set_exception(ConnectionLost(f"site {self.name} failed the task: {message.error}"))
        else:
            future.set_result(message)

    def close(self, reason: str) -> None:
        """The session ended: every result still owed fails with `reason`."""
        if not self.closed.done():
            self.closed.set_result(None)
        for future in self._results.values():
            if not future.done():
                future.set_exception(ConnectionLost(f"site {self.name} disconnected: {reason}"))
        self._results.clear()


class SiteRegistry:
    """Sites currently connected, by name; waiters are woken when one joins or leaves."""

    def __init__(self) -> None:
        self.sites: dict[str, SiteSession] = {}
        self._changed = asyncio.Condition()

    async def join(self, session: SiteSession) -> None:
        previous = self.sites.get(session.name)
        if previous is not None:
            previous.close("replaced by a new connection from the same site")
        self.sites[session.name] = session
        async with self._changed:
            self._changed.notify_all()

    async def leave(self, session: SiteSession, reason: str) -> None:
        session.close(reason)
        if self.sites.get(session.name) is session:
            del self.sites[session.name]
        async with self._changed:
            self._changed.notify_all()

    def get(self, name: str) -> SiteSession:
        session = self.sites.get(name)
        if session is None:
            raise ConnectionLost(f"site {name} is not connected")
        return session

    async def wait_for(self, count: int, wanted: list[str] | None) -> list[str]:
        """Names of connected sites (among `wanted`, if given) once there are at least `count`."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._eligible(wanted)) >= count)
            return self._eligible(wanted)

    def _eligible(self, wanted: list[str] | None) -> list[str]:
        return sorted(name for name in self.sites if wanted is None or name in wanted)
