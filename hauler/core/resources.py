"""A process's CPU and memory, read one way everywhere: psutil for CPU and RSS, /proc for RssAnon.

RssAnon (anonymous resident memory) is what makes a machine swap; RSS also counts the
file pages of memory-mapped models, which the kernel may drop and re-read at will.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import time

import psutil
from pydantic import BaseModel, ConfigDict, Field

SAMPLE_INTERVAL_S = 1.0


def rss_anon_bytes(pid: int | None = None) -> int:
    """Anonymous resident memory of a process (this one if `pid` is None), from /proc/PID/status."""
    with open(f"/proc/{'self' if pid is None else pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def release_free_memory() -> None:
    """Give the heap's free pages back to the kernel (glibc's malloc_trim; a no-op elsewhere).

    A server's rounds allocate and free large transient buffers (a TLS record stream per
    connection, megabytes each); glibc keeps what was freed mapped, fragmented by small
    long-lived objects, so without this the anonymous memory creeps up with every round."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


class ResourceSample(BaseModel):
    """One reading of a process: unix time, CPU percent since the previous reading (100 = one core),
    resident and anonymous resident bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t: float
    cpu_percent: float = Field(ge=0)
    rss_bytes: int = Field(ge=0)
    rss_anon_bytes: int = Field(ge=0)

    def record(self, process: str) -> dict[str, object]:
        """The job metrics record of this sample, taken in `process` (`server` or a site's name)."""
        return {"kind": "resources", "process": process, **self.model_dump()}


class ProcessMeter:
    """Reads this process every SAMPLE_INTERVAL_S; its CPU percent covers the time since the last
    reading.

    With `children`, a reading also adds up the processes this one started (a site's training
    code run as child processes), so a site's figures show everything it runs."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S, *, children: bool = False) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the CPU clock
        self._children: dict[int, psutil.Process] | None = {} if children else None
        self._next = time.monotonic() + interval_s

    def read(self) -> ResourceSample:
        processes = [self._process, *self._current_children()]
        cpu = rss = anon = 0.0
        for process in processes:
            try:
                cpu += process.cpu_percent(None)
                rss += process.memory_info().rss
                anon += rss_anon_bytes(process.pid)
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue  # a child that just ended
        return ResourceSample(
            t=round(time.time(), 3), cpu_percent=cpu, rss_bytes=int(rss), rss_anon_bytes=int(anon)
        )

    def _current_children(self) -> list[psutil.Process]:
        """Children alive now; one kept Process object each, so their CPU clocks run between
        readings."""
        if self._children is None:
            return []
        alive = {child.pid: child for child in self._process.children(recursive=True)}
        for pid in set(self._children) - set(alive):
            del self._children[pid]
        for pid, child in alive.items():
            if pid not in self._children:
                child.cpu_percent(None)  # starts its clock: its first reading counts from now
                self._children[pid] = child
        return list(self._children.values())

    async def collect(self, duration_s: float) -> list[ResourceSample]:
        """Read on every interval tick falling in the next `duration_s` seconds; returns those
        readings.

        Ticks keep their pace across calls, so sampling stays every interval whatever `duration_s`
        is."""
        end = time.monotonic() + duration_s
        samples = []
        while (now := time.monotonic()) < end:
            if now >= self._next:
                samples.append(self.read())
                self._next += self.interval_s
                if (
                    self._next <= now
                ):  # fell behind (a busy loop): the next tick is one interval away
                    self._next = now + self.interval_s
            await asyncio.sleep(max(0.0, min(self._next, end) - now))
        return samples
