"""Sample RSS and anonymous RSS (RssAnon) of each role's process tree, every 0.2 s."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Self

import psutil

from hauler.core.resources import rss_anon_bytes


@dataclass
class RoleSeries:
    peak_rss_bytes: int = 0
    peak_rss_anon_bytes: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t_s, rss, rss_anon)


class Periodic:
    """A background thread calling `sample()` every `interval_s` while in its `with` block."""

    interval_s: float = 0.2

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)


class Sampler(Periodic):
    """Samples every role (name -> root PID) until stopped."""

    def __init__(self, roles: dict[str, int], interval_s: float = 0.2) -> None:
        self.roles = roles
        self.interval_s = interval_s
        self.series = {role: RoleSeries() for role in roles}
        self._started = time.monotonic()

    def sample(self) -> None:
        for role, pid in self.roles.items():
            self._sample(role, pid)

    def _sample(self, role: str, pid: int) -> None:
        rss = anon = 0
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                rss += process.memory_info().rss
                anon += rss_anon_bytes(process.pid)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            return
        series = self.series[role]
        series.samples.append((round(time.monotonic() - self._started, 3), rss, anon))
        series.peak_rss_bytes = max(series.peak_rss_bytes, rss)
        series.peak_rss_anon_bytes = max(series.peak_rss_anon_bytes, anon)
