"""One way to wait for something unless something else ends first (a connection, a session)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def unless_ended(
    work: Awaitable[T], ended: asyncio.Future, gone: Callable[[], BaseException]
) -> T:
    """The result of `work`, unless `ended` completes first: then `work` is cancelled and what
    ended it is raised (its exception, or `gone()` if it ended quietly). If both are done,
    `work`'s result wins."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait([task, ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    reason = ended.exception() if ended.done() and not ended.cancelled() else None
    raise reason or gone()
