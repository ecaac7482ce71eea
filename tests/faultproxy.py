"""A TCP proxy for tests that cuts, slows and corrupts what it forwards, on loopback.

Byte offsets count everything forwarded, both directions, across all connections, so a
test can scatter faults over a whole job. It runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

PIECE = 64 << 10


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        *,
        cuts: Iterable[int] = (),
        flips: Iterable[int] = (),
        rate_bytes_per_s: float | None = None,
    ) -> None:
        self.target_port = target_port
        self.cuts, self.flips = sorted(cuts), sorted(flips)
        self.rate_bytes_per_s = rate_bytes_per_s
        self.forwarded = self.cuts_done = self.flips_done = 0
        self.port = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def clear_faults(self) -> None:
        """Forward faithfully from now on."""
        self._loop.call_soon_threadsafe(self._clear)

    def cut_all(self) -> None:
        """Drop every connection open now, as a link that fails does; new ones are forwarded."""

        def cut() -> None:
            for writer in list(self._open):
                writer.transport.abort()
            self.cuts_done += 1

        self._loop.call_soon_threadsafe(cut)

    def _clear(self) -> None:
        self.cuts, self.flips, self.rate_bytes_per_s = [], [], None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            client_writer.transport.abort()
            return
        writers = (client_writer, server_writer)
        self._open.update(writers)
        await asyncio.gather(
            self._pump(client_reader, server_writer, writers),
            self._pump(server_reader, client_writer, writers),
            return_exceptions=True,
        )
        self._open.difference_update(writers)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        both: tuple[asyncio.StreamWriter, ...],
    ) -> None:
        while data := await reader.read(PIECE):
            piece = bytearray(data)
            start, self.forwarded = self.forwarded, self.forwarded + len(piece)
            while self.flips and self.flips[0] < self.forwarded:
                piece[self.flips.pop(0) - start] ^= 0x10
                self.flips_done += 1
            if self.cuts and self.cuts[0] < self.forwarded:
                while self.cuts and self.cuts[0] < self.forwarded:
                    self.cuts.pop(0)
                self.cuts_done += 1
                for each in both:
                    each.transport.abort()
                return
            writer.write(piece)
            await writer.drain()
            if self.rate_bytes_per_s:
                await asyncio.sleep(len(piece) / self.rate_bytes_per_s)
        writer.close()
