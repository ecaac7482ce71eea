"""A synchronous face for asyncio code: an event loop in a thread of its own.

The Python API (`hauler.connect`, `hauler.simulate`) is synchronous, so it works in scripts,
notebooks (where a loop already runs) and the CLI alike; its gRPC channel and transfers live
in this loop, which every call hands its coroutine to. Ctrl-C in the calling thread cancels
the coroutine it was waiting for, and is raised again there.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


class Portal:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="hauler-api", daemon=True
        )
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` in the portal's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """The items of an async iterator of the portal's loop, one by one, as they come."""
        handoff: queue.SimpleQueue[Any] = queue.SimpleQueue()  # thread-safe, never blocks the loop

        async def pump() -> None:
            try:
                async for item in items:
                    handoff.put(item)
            except BaseException as error:  # raised again in the caller's thread
                handoff.put(error)
            finally:
                handoff.put(_END)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := handoff.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
