"""Connected sites: one session per site process, kept across the control streams it
reconnects with, and the results it owes the server.

A site's control stream may drop while its process, its transfers and its training go on. The
session then waits `grace_s` (communication_timeout) for the same process (its `instance`, sent
in its HELLO) to come back: it is re-attached, the messages sent meanwhile go out, and every
request still open (a task to download, an upload to make) is sent again, which the site
answers idempotently. Only a site that stays away past the grace, or that comes back as a new
process (its state lost), closes the session: what it still owed fails, with `SiteRestarted`
in the second case, so the job can give the site its task again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hauler.core.errors import (
    ConnectionLost,
    HaulerError,
    JobCodeError,
    SiteRestarted,
    TaskRefused,
)
from hauler.core.messages import Evaluated, ResultReady, Task, TaskFailed, UploadReady, encode
from hauler.transport import MessageStream

Answer = ResultReady | Evaluated  # what a site says when a task went well
MAX_OUTBOX = 256  # messages kept for a site while it is away; requests are kept apart, all of them


class SiteSession:
    """A site process: send it messages, await the results of its tasks, across reconnections."""

    def __init__(
        self,
        name: str,
        instance: str,
        stream: MessageStream | None,
        *,
        grace_s: float,
        org: str = "",
    ) -> None:
        self.name, self.instance, self.org = name, instance, org
        self._stream = stream
        self._grace_s = grace_s
        self.connected_s = time.time()
        self.heartbeat_s = 0.0  # when it last said it was alive
        self.deployed_jobs: set[str] = set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._results: dict[str, asyncio.Future[Answer]] = {}
        self._requests: dict[str, Any] = {}  # task id -> what the site must act on now
        self._outbox: deque[Any] = deque(maxlen=MAX_OUTBOX)
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def attached(self) -> bool:
        """Whether a control stream of the site is up now."""
        return self._stream is not None and not self.closed.done()

    async def send(self, message: Any) -> None:
        """Send now, or as soon as the site is back; fails only once the session has closed."""
        if self.closed.done():
            raise ConnectionLost(f"site {self.name} is gone")
        if self._stream is None:
            self._outbox.append(message)
            return
        try:
            await self._stream.send(encode(message))
        except HaulerError:
            self._outbox.append(message)  # the stream is dying: sent again on the next one

    async def request(self, task_id: str, message: Any) -> None:
        """Send what task `task_id` asks of the site now; it is sent again after a reconnection."""
        self._requests[task_id] = message
        await self.send(message)

    def expect_result(self, task_id: str) -> asyncio.Future[Answer]:
        future = asyncio.get_running_loop().create_future()
        self._results[task_id] = future
        return future

    def forget(self, task_id: str) -> None:
        self._results.pop(task_id, None)
        self._requests.pop(task_id, None)

    def deliver(self, message: Answer | TaskFailed) -> None:
        future = self._results.pop(message.task_id, None)
        if future is None or future.done():
            return
        if isinstance(message, TaskFailed) and message.refused:
            future.set_exception(TaskRefused(f"site {self.name} declined: {message.error}"))
        elif isinstance(message, TaskFailed):
            future.set_exception(JobCodeError(f"site {self.name} failed the task: {message.error}"))
        else:
            future.set_result(message)

    async def attach(self, stream: MessageStream) -> None:
        """The same process is back on a new stream: flush what waited, ask again what is open."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._stream = stream
        waiting, self._outbox = list(self._outbox), deque(maxlen=MAX_OUTBOX)
        requests = list(self._requests.values())
        for message in [m for m in waiting if not any(m is r for r in requests)] + requests:
            await self.send(message)

    def detach(self, stream: MessageStream, reason: str) -> None:
        """`stream` ended; unless a newer one replaced it, close after the grace if nobody comes
        back."""
        if self._stream is not stream or self.closed.done():
            return
        self._stream = None
        error = ConnectionLost(
            f"site {self.name} disconnected ({reason}) and did not come back "
            f"within {self._grace_s:g} s (communication_timeout)"
        )
        self._expiry = asyncio.get_running_loop().call_later(self._grace_s, self.close, error)

    def close(self, error: HaulerError) -> None:
        """The session ended for good: every result still owed fails with `error`."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._stream = None
        for future in [self.closed, *self._results.values()]:
            if not future.done():
                future.set_exception(error)
                future.exception()  # seen: a site may leave while nobody waits on it
        self._results.clear()
        self._requests.clear()
        self._outbox.clear()

    def describe(self) -> dict[str, Any]:
        """What `hauler sites` shows of it: who, since when, alive when, doing what."""
        return {
            "name": self.name,
            "org": self.org,
            "connected_s": self.connected_s,
            "heartbeat_s": self.heartbeat_s,
            "attached": self.attached,
            "task": self.doing(),
        }

    def doing(self) -> str:
        """The task the server waits on it for, in a few words."""
        for message in self._requests.values():
            if isinstance(message, Task) and message.kind != "train":
                return f"job {message.job_id} {message.kind} {message.model_name}".rstrip()
            if isinstance(message, Task):
                return f"job {message.job_id} round {message.round}"
            if isinstance(message, UploadReady):
                return "uploading its update"
        return ""


class SiteRegistry:
    """Sites by name, one live session each; waiters are woken whenever one joins or leaves."""

    def __init__(self, grace_s: float = 0.0) -> None:
        self.grace_s = grace_s
        self.sites: dict[str, SiteSession] = {}
        self._changed = asyncio.Event()

    async def join(
        self, name: str, instance: str, stream: MessageStream | None, *, org: str = ""
    ) -> SiteSession:
        """The session of a site saying hello: its own, re-attached, if the same process is back
        (an empty `instance` never matches); else a new one, closing the old."""
        current = self.sites.get(name)
        if (
            current is not None
            and instance
            and current.instance == instance
            and not current.closed.done()
        ):
            assert stream is not None
            await current.attach(stream)
            self._notify()
            return current
        if current is not None:
            current.close(
                SiteRestarted(f"site {name} restarted; what it had under way starts again")
            )
        session = SiteSession(name, instance, stream, grace_s=self.grace_s, org=org)
        session.closed.add_done_callback(lambda _: self._remove(session))
        self.sites[name] = session
        self._notify()
        return session

    def leave(self, session: SiteSession, stream: MessageStream, reason: str) -> None:
        session.detach(stream, reason)
        self._notify()

    def _remove(self, session: SiteSession) -> None:
        if self.sites.get(session.name) is session:
            del self.sites[session.name]
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def get(self, name: str) -> SiteSession:
        session = self.sites.get(name)
        if session is None:
            raise ConnectionLost(f"site {name} is not connected")
        return session

    async def current(self, name: str, within_s: float) -> SiteSession:
        """The live session of `name`, waiting up to `within_s` for the site to (re)join."""
        deadline = asyncio.get_running_loop().time() + within_s
        while (session := self.sites.get(name)) is None:
            changed = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                raise ConnectionLost(
                    f"site {name} is not connected and did not join within "
                    f"{within_s:g} s (communication_timeout)"
                ) from None
        return session

    async def wait_for(
        self,
        count: int,
        wanted: list[str] | None,
        waiting: Callable[[list[str]], None] = lambda connected: None,
    ) -> list[str]:
        """Names of attached sites (among `wanted`, if given) once there are at least `count`;
        until then `waiting` is told who is there, each time that changes."""
        while len(eligible := self.attached(wanted)) < count:
            waiting(eligible)
            await self._changed.wait()
        return eligible

    def attached(self, wanted: list[str] | None = None) -> list[str]:
        return sorted(
            name
            for name, session in self.sites.items()
            if session.attached and (wanted is None or name in wanted)
        )
