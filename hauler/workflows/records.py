"""The metrics records every federation writes for a round, real or simulated, so reports read
one shape: a `site` record per site's contribution and a `round` record per round."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hauler.workflows.base import TrainResult

Record = Callable[[dict[str, Any]], None]


class RoundRecords:
    """Times a round and its sites' phases, and writes their records through `record`."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.round = 0
        self._started = self._started_s = self.last_upload_done = 0.0
        self._timings: list[dict[str, float]] = []

    def begin(self, round: int) -> None:
        self.round, self._timings = round, []
        self._started, self._started_s = time.perf_counter(), time.time()

    def site(
        self,
        result: TrainResult,
        *,
        started_s: float,
        model_bytes: int,
        download: dict[str, Any],
        upload: dict[str, Any],
    ) -> None:
        """One site's contribution: its phase seconds, weight, transfer figures and metrics."""
        timings = result.timings
        self._timings.append(timings)
        self.last_upload_done = time.perf_counter()
        self.record(
            {
                "kind": "site",
                "round": self.round,
                "site": result.site,
                "started_s": started_s,
                "weight": result.weight,
                **timings,
                "download": {**download, "mb_per_s": rate(model_bytes, timings["download_s"])},
                "upload": {**upload, "mb_per_s": rate(model_bytes, timings["upload_s"])},
                "metrics": result.metrics,
            }
        )

    def end(self, results: list[TrainResult], **extra: Any) -> None:
        """The round: its sites, the slowest site's phases, aggregation and round seconds."""
        done = time.perf_counter()
        slowest = (
            {key: max(t[key] for t in self._timings) for key in self._timings[0]}
            if self._timings
            else {}
        )
        self.record(
            {
                "kind": "round",
                "round": self.round,
                "started_s": self._started_s,
                "sites": [r.site for r in results],
                "round_s": done - self._started,
                **slowest,
                "aggregate_s": done - (self.last_upload_done or done),
                **extra,
            }
        )


def rate(nbytes: int, seconds: float) -> float:
    """MB/s, rounded, of `nbytes` moved in `seconds`."""
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0
