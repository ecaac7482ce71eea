"""The metrics records every federation writes for a round, real or simulated, so reports read
one shape: a `site` record per site's contribution and a `round` record per round; and those
of a cross-site evaluation: an `evaluation` record per site and model (its metrics, or why it
is missing) and a `cross_site` record with the whole matrix."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hauler.workflows.base import Evaluation, TrainResult

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
                "validation": result.validation,
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


def evaluation_record(
    site: str, model: str, evaluation: Evaluation | None, missing: str = ""
) -> dict[str, Any]:
    """`site`'s evaluation of `model`: its metrics and seconds, or why it is missing."""
    record: dict[str, Any] = {"kind": "evaluation", "site": site, "model": model}
    if evaluation is None:
        return {**record, "missing": missing}
    timings = {"started_s": evaluation.started_s, **evaluation.timings}
    return {**record, **timings, "metrics": evaluation.metrics}


def matrix_record(
    sites: list[str],
    models: list[str],
    cells: dict[tuple[str, str], dict[str, float]],
    **extra: Any,
) -> dict[str, Any]:
    """The cross-site matrix: for every metric, a row per site and a column per model (None
    where that site did not evaluate that model)."""
    names = sorted({name for metrics in cells.values() for name in metrics})
    matrix = {
        name: [[cells.get((site, model), {}).get(name) for model in models] for site in sites]
        for name in names
    }
    return {"kind": "cross_site", "sites": sites, "models": models, "matrix": matrix, **extra}


def reported(record: dict[str, Any]) -> dict[str, Any]:
    """What a site reported for a round (a `site` record or event): its training metrics, and
    its validation of the round's global model (measured before training) as
    `validation/<name>`."""
    validation = {f"validation/{k}": v for k, v in (record.get("validation") or {}).items()}
    return {**(record.get("metrics") or {}), **validation}


def rate(nbytes: int, seconds: float) -> float:
    """MB/s, rounded, of `nbytes` moved in `seconds`."""
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0
