"""CPU and memory samples into job metrics: the server's own, and those of every site in the job.

The server samples itself every second. A site's samples arrive with its heartbeats, up to one
heartbeat interval late, so a job that has ended keeps taking the samples taken before its end
for `grace_s` more, then its metrics file is closed. A site's clock and samples are its word:
a sample is kept only within the job's span, not later than the server's own clock (plus
MAX_CLOCK_SKEW_S), and in a later second of that clock than the process's previous one, so a
site cannot flood a job's metrics: at most one sample per second per process, in real time.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from hauler.core.events import JsonLines
from hauler.core.resources import ProcessMeter, ResourceSample
from hauler.server.sites import SiteRegistry

SERVER = "server"
MAX_CLOCK_SKEW_S = 5.0  # a site's clock may run this far ahead of the server's


@dataclass
class _Window:
    """A job's time span, the sites that took part in it, and each process's last sample time."""

    metrics: JsonLines
    started_s: float
    ended_s: float = math.inf
    sites: set[str] = field(default_factory=set)
    last_t: dict[str, float] = field(default_factory=dict)


class ResourceRecorder:
    """Writes each process's samples into the metrics of the running (or just ended) jobs it is part
    of."""

    def __init__(self, sites: SiteRegistry, grace_s: float) -> None:
        self.sites, self.grace_s = sites, grace_s
        self._jobs: dict[str, _Window] = {}

    def open(self, job_id: str, metrics: JsonLines) -> None:
        """A job started: from now on, samples of the server and of the job's sites go to `metrics`,
        the job's one writer of its metrics file, which this recorder closes once the job is
        over."""
        self._jobs[job_id] = _Window(metrics, time.time())

    def close(self, job_id: str, *, late: bool = True) -> None:
        """The job ended: samples taken until now are still written for `grace_s` if `late`."""
        window = self._jobs.get(job_id)
        if window is None:
            return
        window.ended_s = time.time()
        window.sites |= {s.name for s in self.sites.sites.values() if job_id in s.deployed_jobs}
        if late and self.grace_s > 0:
            asyncio.get_running_loop().call_later(self.grace_s, self._forget, job_id, window)
        else:
            self._forget(job_id, window)

    def close_all(self) -> None:
        """The server stops: close every job's metrics now, late samples or not."""
        for job_id, window in list(self._jobs.items()):
            self._forget(job_id, window)

    def _forget(self, job_id: str, window: _Window) -> None:
        if self._jobs.get(job_id) is window:
            del self._jobs[job_id]
        window.metrics.close()

    def record(self, process: str, samples: list[ResourceSample]) -> None:
        """Write `process`'s samples into the metrics of every job it is part of, within the job's
        span."""
        for job_id, window in self._jobs.items():
            if process != SERVER and not self._takes_part(job_id, window, process):
                continue
            latest = min(window.ended_s, time.time() + MAX_CLOCK_SKEW_S)
            for sample in samples:
                previous = window.last_t.get(process)
                later = previous is None or math.floor(sample.t) > math.floor(previous)
                if later and window.started_s <= sample.t <= latest:
                    window.last_t[process] = sample.t
                    window.metrics.write(sample.record(process))

    def takes_part(self, job_id: str, site: str) -> bool:
        """Whether `site` is part of the running (or just ended) job `job_id`."""
        window = self._jobs.get(job_id)
        return window is not None and self._takes_part(job_id, window, site)

    def _takes_part(self, job_id: str, window: _Window, site: str) -> bool:
        session = self.sites.sites.get(site)
        if window.ended_s == math.inf and session is not None and job_id in session.deployed_jobs:
            window.sites.add(site)
        return site in window.sites

    async def sample_server(self) -> None:
        """Sample the server process every second into the running jobs' metrics, until
        cancelled."""
        meter = ProcessMeter()
        while True:
            self.record(SERVER, await meter.collect(meter.interval_s))
