"""Bounded retries with exponential backoff and jitter, for links that drop."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from hauler.core.config import DataPlane
from hauler.core.errors import ConnectionLost, IntegrityError, TransferTimeout

T = TypeVar("T")
RESUMABLE = (ConnectionLost, IntegrityError, TransferTimeout)
log = logging.getLogger("hauler.retry")


def resumable(error: BaseException) -> bool:
    """Whether trying again can help: a dropped, stalled or corrupted link, not data that
    contradicts its manifest nor an update the receiver refused."""
    return isinstance(error, RESUMABLE)


def backoff_s(attempt: int, policy: DataPlane) -> float:
    """Wait before reconnection `attempt` (1, 2, ...): doubling from retry_backoff_s, capped,
    jittered."""
    ceiling = min(policy.retry_backoff_max_s, policy.retry_backoff_s * 2 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


async def with_retries(attempt: Callable[[], Awaitable[T]], policy: DataPlane, what: str) -> T:
    """Run `attempt` until it succeeds; a dropped, stalled or corrupted link is retried up to
    `max_retries` times (each attempt resumes where the peer's acknowledgements say)."""
    failures = 0
    while True:
        try:
            return await attempt()
        except RESUMABLE as error:
            failures += 1
            if failures > policy.max_retries:
                raise
            log.info("retrying", extra={"what": what, "attempt": failures, "error": str(error)})
            await asyncio.sleep(backoff_s(failures, policy))
