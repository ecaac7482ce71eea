"""Experiment tracking: a job's metrics records, as they are written, go to MLflow too.

One run per job (named after the job, tagged with its id) and a run per site nested under it,
made when the site's first record comes. A site's round figures (phase seconds, weight,
transfer figures, training and validation metrics) and its resource samples go to its run; the
round records and the samples of the process running the job (the server, or the simulator) go
to the job's run. A metric is named by its place in the record (`download/wire_bytes`,
`train/loss`, `validation/accuracy`, `round/aggregate_s`, `resources/rss_anon_bytes`), its step
is the round (a resource sample's: its number, one a second) and its time the record's.

MLflow's client blocks (HTTP, or SQLite for the local store), so records go through a queue to
one background thread that sends them in batches: the job never waits for it. A tracking that
fails is said once (a `tracking.failed` event and a log line) and stops there; the job goes on,
and metrics.jsonl keeps everything.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import os
import queue
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hauler.core.config import MLFLOW_LOCAL, JobConfig, TrackingConfig
from hauler.core.errors import ConfigError
from hauler.core.events import Event, EventBus, JsonLines

log = logging.getLogger("hauler.tracking")

INSTALL = "pip install 'hauler[mlflow]'"
LOCAL_FOLDER = "mlflow"  # the local store's folder in the job's folder
MAX_QUEUED = 100_000  # records waiting; a tracking server this far behind stops the tracking
MAX_BATCH = 1000  # metrics per MLflow call, MLflow's own limit
SEND_WAIT_S = 60.0  # how long the end of a simulation waits for its last records to be sent
# MLflow's client settings, unless the environment sets its own: a tracking server that does not
# answer is said within a minute instead of retried for minutes; no run URLs printed (the job's
# events say where its run is); no usage telemetry from a federation's server to third parties.
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
ENDINGS = {"job.finished": "FINISHED", "job.failed": "FAILED", "job.aborted": "KILLED"}
NOT_METRICS = {"kind", "round", "site", "process", "started_s", "t"}  # a record's keys
RENAMED = {"metrics": "train"}  # a site's training metrics, named as in TensorBoard
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :]")  # what MLflow refuses in a metric name's segment
_END = None  # queued by close(): no records after it


@dataclass(frozen=True)
class Target:
    """Where a job's runs go: an MLflow tracking URI, and for the local store its folder (new
    experiments keep their artifacts there too)."""

    uri: str
    folder: Path | None = None


@dataclass(frozen=True)
class Run:
    """Whose runs: the job, the experiment they go in, and the process running the job (whose
    resource samples go to the job's run)."""

    job_id: str
    name: str
    experiment: str
    process: str

    @classmethod
    def of(cls, job: JobConfig, job_id: str, process: str) -> Run:
        experiment = job.tracking.experiment if job.tracking is not None else None
        return cls(job_id, job.name, experiment or job.name, process)


@dataclass(frozen=True)
class Point:
    """One metric value; `run` None is the job's run, else a site's."""

    run: str | None
    key: str
    value: float
    timestamp_ms: int
    step: int


def tracking_target(
    tracking: TrackingConfig | None,
    job_dir: Path,
    *,
    default: str | None = None,
    allowed: list[str] | None = None,
) -> Target | None:
    """Where a job's metrics go besides its metrics.jsonl (None: nowhere): its [tracking]
    mlflow, else `default`; "local" is a SQLite store in the job's folder. With `allowed` (a
    server's list), any other URI than those, `default` and "local" is refused."""
    uri = tracking.mlflow if tracking is not None else default
    if uri is None:
        return None
    if uri == MLFLOW_LOCAL:
        folder = job_dir.resolve() / LOCAL_FOLDER
        return Target(f"sqlite:///{folder / 'mlflow.db'}", folder)
    if allowed is not None and uri not in [*allowed, default]:
        raise ConfigError(
            f"job.toml: tracking.mlflow: {shown(uri)!r} is not a tracking URI this server "
            "allows; its operator lists those jobs may use in server.toml, [tracking] "
            f'allowed_mlflow_uris. Or track into the job\'s folder: mlflow = "{MLFLOW_LOCAL}"'
        )
    return Target(uri)


def require_mlflow(where: str) -> None:
    """Refuse a tracked job where MLflow's client is not installed, saying how to install it."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"[tracking] needs MLflow's client {where}: {INSTALL}")


def shown(uri: str) -> str:
    """A URI as events and logs may show it: without its password."""
    return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", uri)


def open_metrics(path: Path, bus: EventBus, target: Target | None, run: Run) -> JsonLines:
    """A job's metrics file; with a target, every record written to it goes there too."""
    return JsonLines(path) if target is None else TrackedMetrics(path, Tracker(target, run, bus))


async def sent(metrics: JsonLines, wait_s: float = SEND_WAIT_S) -> None:
    """Wait (off the loop, at most `wait_s`) until a closed metrics file's records have gone to
    MLflow: a process that exits would lose those still queued."""
    if isinstance(metrics, TrackedMetrics):
        await asyncio.to_thread(metrics.tracker.join, wait_s)


class TrackedMetrics(JsonLines):
    """A job's metrics file whose every record also goes to MLflow, through its Tracker."""

    def __init__(self, path: Path, tracker: Tracker) -> None:
        super().__init__(path)
        self.tracker = tracker

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        self.tracker.put(record)

    def close(self) -> None:
        super().close()
        self.tracker.close()


class Points:
    """Turns metrics records into MLflow metric values: their run, name, step and time."""

    def __init__(self, process: str) -> None:
        self.process = process
        self._samples: dict[str | None, int] = defaultdict(int)  # per run: samples so far

    def of(self, record: dict[str, Any]) -> list[Point]:
        run = record.get("site", record.get("process"))
        run = None if run in (None, self.process) else str(run)
        kind = record.get("kind", "record")
        step = self._step(record, kind, run)
        when = record.get("started_s", record.get("t"))
        when_ms = int(1000 * (time.time() if when is None else when))
        renamed = RENAMED if kind == "site" else {}
        values = {renamed.get(k, k): v for k, v in record.items() if k not in NOT_METRICS}
        prefix = "" if kind == "site" else f"{_segment(kind)}/"
        if kind == "evaluation":  # a site's evaluation of one model: named after the model
            prefix += f"{_segment(record.get('model', ''))}/"
        return [Point(run, key, value, when_ms, step) for key, value in _numbers(values, prefix)]

    def _step(self, record: dict[str, Any], kind: str, run: str | None) -> int:
        """A round's record: its round; a resource sample: its number in its run; else 0."""
        if "round" in record:
            return int(record["round"])
        return self._sample(run) if kind == "resources" else 0

    def _sample(self, run: str | None) -> int:
        self._samples[run] += 1
        return self._samples[run] - 1


def _numbers(values: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    """Every number in `values`, named by its path there (nested tables joined by `/`)."""
    for key, value in values.items():
        name = prefix + _segment(key)
        if isinstance(value, dict):
            yield from _numbers(value, f"{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield name, float(value)


def _segment(key: object) -> str:
    """A key as one segment of a metric name: characters MLflow refuses (a site names its own
    metrics) become `_`, and so does a segment of dots only, which MLflow takes for a path."""
    segment = _UNSAFE.sub("_", str(key))
    return segment if segment.strip(".") else "_"


class Tracker:
    """Sends a job's metrics records to MLflow from one background thread, so the job's loop
    never waits on MLflow; says on the job's event bus where its run is, or why it stopped."""

    def __init__(self, target: Target, run: Run, bus: EventBus) -> None:
        self.target, self.run, self._bus = target, run, bus
        self._loop = asyncio.get_running_loop()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(MAX_QUEUED)
        self._status: str | None = None  # the job's end, once its event came
        self._failed = self._closed = False
        self._lock = threading.Lock()
        self._unsubscribe = bus.subscribe(self._on_event)
        self._thread = threading.Thread(
            target=self._serve, name=f"tracking-{run.job_id}", daemon=True
        )
        self._thread.start()

    def put(self, record: dict[str, Any] | None) -> None:
        """Queue a record (or the end) to send; never waits. A failed tracking drops it."""
        if self._failed:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._fail(f"the tracking server is {MAX_QUEUED} records behind")

    def close(self) -> None:
        """No more records: the thread sends those queued, ends the runs with the job's status
        (if the job ended; a server stopping mid-job leaves them running, to resume), and stops."""
        if not self._closed:
            self._closed = True
            self._unsubscribe()
            self.put(_END)

    def join(self, timeout_s: float) -> None:
        """Wait for the thread to end; one still sending after `timeout_s` is given up, and said."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._fail(f"still sending after {timeout_s:g} s, when the job's process was done")

    def _on_event(self, event: Event) -> None:
        self._status = ENDINGS.get(event.name, self._status)

    def _serve(self) -> None:
        try:
            session = _Session(self.target, self.run)
            uri, experiment = shown(self.target.uri), self.run.experiment
            self._say("tracking.started", uri=uri, experiment=experiment, run=session.parent)
            points, ended = Points(self.run.process), False
            while not ended and not self._failed:
                records, ended = self._batch()
                session.send([point for record in records for point in points.of(record)])
            if ended and self._status is not None:
                session.end(self._status)
        except Exception as error:  # whatever MLflow raises: unreachable, refused, its own bugs
            self._fail(str(error) or type(error).__name__)

    def _batch(self) -> tuple[list[dict[str, Any]], bool]:
        """The records queued now (waiting for a first one), and whether the end is among them."""
        items = [self._queue.get()]
        while len(items) < MAX_BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return [item for item in items if item is not _END], _END in items

    def _fail(self, reason: str) -> None:
        """Stop tracking for good and say why, once: the job goes on without it."""
        with self._lock:
            if self._failed:
                return
            self._failed = True
        uri = shown(self.target.uri)
        log.warning(
            "tracking to MLflow stopped",
            extra={"job": self.run.job_id, "uri": uri, "error": reason},
        )
        self._say("tracking.failed", uri=uri, error=f"{reason}; the job goes on untracked")

    def _say(self, name: str, **fields: Any) -> None:
        """Emit an event on the job's bus, in its loop's thread (the loop may have ended)."""
        emit = functools.partial(self._bus.emit, name, job=self.run.job_id, **fields)
        try:
            self._loop.call_soon_threadsafe(emit)
        except RuntimeError:  # the loop is closed: the log line is all there is
            pass


class _Session:
    """A job's runs in one MLflow tracking store: the job's, and a run per site under it."""

    def __init__(self, target: Target, run: Run) -> None:
        mlflow = _mlflow()
        self.metric, self.run = mlflow.entities.Metric, run
        if target.folder is not None:
            target.folder.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.tracking.MlflowClient(tracking_uri=target.uri)
        self.experiment = self._experiment(run.experiment, target.folder)
        self.parent = self._run_id(run.process, run.name, parent=None)
        self._sites: dict[str, str] = {}

    def _experiment(self, name: str, folder: Path | None) -> str:
        """The experiment's id, made if new (with its artifacts in the local store's folder)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        artifacts = None if folder is None else (folder / "artifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def _run_id(self, process: str, name: str, parent: str | None) -> str:
        """The run of `process` in this job: the one an earlier start of the job made (a server
        restarted mid-job resumes the job), or a new one."""
        tags = {"hauler.job_id": self.run.job_id, "hauler.process": process}
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        found = self.client.search_runs([self.experiment], query, max_results=1)
        if found:
            return found[0].info.run_id
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment, tags=tags, run_name=name).info.run_id

    def _run_of(self, site: str | None) -> str:
        if site is None:
            return self.parent
        if site not in self._sites:
            self._sites[site] = self._run_id(site, site, parent=self.parent)
        return self._sites[site]

    def send(self, points: list[Point]) -> None:
        by_run: dict[str | None, list[Any]] = defaultdict(list)
        for p in points:
            by_run[p.run].append(self.metric(p.key, p.value, p.timestamp_ms, p.step))
        for site, metrics in by_run.items():
            run_id = self._run_of(site)
            for start in range(0, len(metrics), MAX_BATCH):
                batch = metrics[start : start + MAX_BATCH]
                self.client.log_batch(run_id, metrics=batch, synchronous=True)

    def end(self, status: str) -> None:
        """End the job's runs, the sites' first, with the job's status."""
        for run_id in [*self._sites.values(), self.parent]:
            self.client.set_terminated(run_id, status)


def _mlflow() -> Any:
    """MLflow, imported on first use (seconds, and tens of MiB), with Hauler's client defaults."""
    for name, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        import mlflow.entities
        import mlflow.tracking
    except ImportError:
        raise ConfigError(f"MLflow's client is not installed here: {INSTALL}") from None
    return mlflow
