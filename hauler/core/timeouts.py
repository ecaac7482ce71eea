"""Timeouts that measure silence: a scope whose deadline moves forward on every progress."""

from __future__ import annotations

import asyncio
from types import TracebackType

from hauler.core.errors import TransferTimeout


class SilenceTimer:
    """`async with SilenceTimer(300, "communication_timeout", "upload from site-1") as timer:`
    then `timer.touch()` on progress; raises TransferTimeout after `seconds` without a touch.
    `seconds=None` means never."""

    def __init__(self, seconds: float | None, name: str, what: str) -> None:
        self.seconds, self.name, self.what = seconds, name, what
        self._scope: asyncio.Timeout | None = None

    def touch(self, *_: object) -> None:
        """Progress: push the deadline to `seconds` from now. Called on every socket read, so the
        timer is moved only once it has fallen a tenth of `seconds` (at most 1 s) behind: expiry
        then comes after between 0.9 x `seconds` and `seconds` of silence, without a new timer
        handle per read."""
        if self._scope is None or self.seconds is None or self._scope.expired():
            return
        now, deadline = asyncio.get_running_loop().time(), self._scope.when()
        if deadline is None or deadline - now < self.seconds - min(1.0, self.seconds / 10):
            self._scope.reschedule(now + self.seconds)

    def switch(self, seconds: float | None, name: str) -> None:
        """Measure a different silence from now on (the next stage of an exchange)."""
        self.seconds, self.name = seconds, name
        if self._scope is not None and not self._scope.expired():
            self._scope.reschedule(
                None if seconds is None else asyncio.get_running_loop().time() + seconds
            )

    async def __aenter__(self) -> SilenceTimer:
        deadline = (
            None if self.seconds is None else asyncio.get_running_loop().time() + self.seconds
        )
        self._scope = asyncio.timeout_at(deadline)
        await self._scope.__aenter__()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._scope is not None
        try:
            await self._scope.__aexit__(kind, error, traceback)
        except TimeoutError:
            raise TransferTimeout(self.name, self.seconds or 0, self.what) from None
