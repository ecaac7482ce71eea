"""Runs submitted jobs one at a time: receive or make round 0, then run the workflow.

Each job's events go to `jobs/<id>/events.jsonl` and to live watchers; its
round and site timings, and the CPU and memory samples of its processes, go to
`jobs/<id>/metrics.jsonl`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from hauler.core.config import JobConfig, ServerConfig
from hauler.core.errors import HaulerError, JobCodeError, JobError
from hauler.core.events import Event, EventBus, JsonLines, read_json_lines
from hauler.core.messages import DeleteJob, EndJob
from hauler.core.package import load_job, unpack
from hauler.core.tracking import Run, Target, open_metrics, require_mlflow, tracking_target
from hauler.model import ChunkPlan, Manifest, ModelFile
from hauler.model.initial import import_initial_model
from hauler.model.rounds import INITIAL_ROUND, RoundStore
from hauler.server import initial
from hauler.server.federation import JobFederation
from hauler.server.joblogs import JobLogRecorder
from hauler.server.jobstore import JobStatus, JobStore
from hauler.server.resources import SERVER, ResourceRecorder
from hauler.server.round_zero import check_initial_manifest, resolve_model_file
from hauler.server.sites import SiteRegistry
from hauler.server.transfers import Transfer, TransferRegistry
from hauler.transfer import FileSink
from hauler.workflows import workflow_for

log = logging.getLogger("hauler.server")


class JobRunner:
    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        sites: SiteRegistry,
        transfers: TransferRegistry,
    ) -> None:
        self.config, self.store, self.sites, self.transfers = config, store, sites, transfers
        self.jobs_dir = config.workspace / "jobs"
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._buses: dict[str, EventBus] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._aborting: set[str] = set()
        # a site's samples come with its heartbeats: wait two of them for the last ones of a job
        self.resources = ResourceRecorder(sites, grace_s=2 * config.timeouts.heartbeat_interval + 1)
        self.joblogs = JobLogRecorder(self.jobs_dir, self.resources.takes_part)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    async def submit(
        self, package_b64: str, submitter: tuple[str, str], initial: Manifest | None
    ) -> str:
        """Validate and store a job package, and queue the job, unless its initial model is still
        to be uploaded (`initial`: what the submitter announced)."""
        job_id = uuid.uuid4().hex[:12]
        job = await asyncio.to_thread(
            self._unpack, job_id, package_b64, initial
        )  # slow for big packages
        self.store.add(job_id, job.name, job.workflow.num_rounds, submitter)
        if initial is None:
            self._queue.put_nowait(job_id)
        return job_id

    def _unpack(self, job_id: str, package_b64: str, initial: Manifest | None) -> JobConfig:
        """The job's folder from its package, or nothing of it if the job is refused."""
        try:
            job = unpack(
                package_b64, self.job_dir(job_id) / "app", self.config.max_job_package_mib << 20
            )
            self._check_sites(job)
            self._check_tracking(job, job_id)
            self._check_initial_source(job, initial)
            (self.job_dir(job_id) / "package.b64").write_text(package_b64)
        except BaseException:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            raise
        return job

    def _check_sites(self, job: JobConfig) -> None:
        """Refuse, at submission, a job naming sites the project does not have."""
        known = self.config.sites
        unknown = sorted(set(job.sites or []) - set(known or []))
        if known is not None and unknown:
            raise JobError(
                f"job.toml: sites: {', '.join(unknown)} is not a site of this project "
                f"(its sites: {', '.join(known)})"
            )

    def _check_tracking(self, job: JobConfig, job_id: str) -> None:
        """Refuse, at submission, a job tracked where this server does not allow, or by a
        server that cannot track."""
        if self._tracking(job, job_id) is not None:
            require_mlflow("on the server")

    def _tracking(self, job: JobConfig, job_id: str) -> Target | None:
        """Where the job's metrics go besides its metrics.jsonl, if this server allows it."""
        ours = self.config.tracking
        return tracking_target(
            job.tracking,
            self.job_dir(job_id),
            default=ours.mlflow,
            allowed=ours.allowed_mlflow_uris,
        )

    def _check_initial_source(self, job: JobConfig, initial: Manifest | None) -> None:
        """Refuse, at submission, a job whose round 0 this server cannot have."""
        if initial is not None:
            check_initial_manifest(
                initial,
                chunk_bytes=self.config.dataplane.chunk_bytes,
                max_bytes=int(self.config.max_model_gib * 2**30),
            )
        elif job.model.file is not None:
            resolve_model_file(job.model.file, self.config.model_dirs)
        elif job.model.build == "server":
            if not self.config.allow_custom_code:
                raise JobError(
                    "this server runs no job code (allow_custom_code = false in its config): "
                    'drop [model] build = "server" to build round 0 where you submit, or '
                    "upload it with `hauler submit --initial-model FILE`"
                )
        else:
            raise JobError(
                "the job brings no initial model: name a [model] module or file in job.toml, "
                "or upload one with `hauler submit --initial-model FILE`"
            )

    def expect_initial(
        self, job_id: str, manifest: Manifest, peer: str
    ) -> tuple[Transfer, ModelFile]:
        """Round 0's file, ready to receive the upload of the job's initial model from `peer`."""
        model = RoundStore(self.job_dir(job_id), self.config.keep_rounds).create(
            INITIAL_ROUND, manifest
        )
        plan = ChunkPlan(manifest)
        ledger = self.transfers.ledger_for(plan)
        return self.transfers.expect(peer, ledger, FileSink(model, plan)), model

    async def receive_initial(self, job_id: str, transfer: Transfer, model: ModelFile) -> None:
        """Wait for the initial model's upload (silence: communication_timeout), commit it as
        round 0 and queue the job; a failed upload fails the job."""
        try:
            await transfer.wait(
                self.config.timeouts.communication_timeout, "receiving the initial model"
            )
            await asyncio.to_thread(model.flush)
            RoundStore(self.job_dir(job_id), self.config.keep_rounds).commit(
                INITIAL_ROUND, model.manifest
            )
        except HaulerError as error:
            reason = f"the initial model's upload did not complete: {error}"
            self.store.update(job_id, status=JobStatus.FAILED, finished_s=time.time(), error=reason)
            self.events(job_id).emit("job.failed", job=job_id, error=reason, rounds_done=0)
            return
        finally:
            self.transfers.discard(transfer)
            model.close()
        self.events(job_id).emit(
            "initial_model.received", job=job_id, bytes=model.manifest.total_bytes
        )
        self._queue.put_nowait(job_id)

    def requeue_unfinished(self) -> None:
        """After a restart, jobs that were running or waiting are queued again."""
        for record in self.store.list():
            if not record.status.ended:
                self._queue.put_nowait(record.id)

    async def run_forever(self) -> None:
        while True:
            job_id = await self._queue.get()
            if self.store.get(job_id).status.ended:
                continue
            task = asyncio.create_task(self._run(job_id))
            self._running[job_id] = task
            try:
                await asyncio.wait([task])
            finally:  # a server shutting down stops its job too; it resumes after a restart
                self._running.pop(job_id, None)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def abort(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record.status.ended:
            raise JobError(f"job {job_id} already {record.status.value}")
        task = self._running.get(job_id)
        if task is not None:
            self._aborting.add(job_id)
            task.cancel()
        else:
            self.store.update(job_id, status=JobStatus.ABORTED, error="aborted before it started")

    async def delete(self, job_id: str) -> None:
        """Remove an ended job: its folder here, its record, and what its sites still keep."""
        record = self.store.get(job_id)
        if not record.status.ended:
            raise JobError(
                f"job {job_id} is {record.status.value}; abort it first (`hauler jobs abort`)"
            )
        self._buses.pop(job_id, None)
        await asyncio.to_thread(shutil.rmtree, self.job_dir(job_id), True)
        self.store.remove(job_id)
        for session in list(self.sites.sites.values()):
            await session.send(DeleteJob(job_id=job_id))

    async def reclaim(self) -> None:
        """Keep the model files of ended jobs within max_finished_jobs_gib: the oldest go first
        (their records, events and metrics stay; their rounds can no longer be downloaded)."""
        cap = self.config.max_finished_jobs_gib
        if cap is None:
            return
        ended = [r for r in self.store.list() if r.status.ended]
        sizes = await asyncio.to_thread(lambda: [_model_bytes(self.job_dir(r.id)) for r in ended])
        total = sum(sizes)
        for record, size in zip(ended, sizes):
            if total <= cap * 2**30:
                return
            if size:
                await asyncio.to_thread(
                    RoundStore(self.job_dir(record.id), self.config.keep_rounds).remove_all
                )
                self.events(record.id).emit("job.reclaimed", job=record.id, bytes=size)
                total -= size

    def events(self, job_id: str) -> EventBus:
        bus = self._buses.get(job_id)
        if bus is None:
            bus = self._buses[job_id] = EventBus()
            bus.subscribe(JsonLines(self.job_dir(job_id) / "events.jsonl"))
        return bus

    async def _run(self, job_id: str) -> None:
        """Run a job and record how it ended. A server that stops mid-job leaves it running,
        so a restart resumes it; only an admin's abort marks it aborted."""
        bus = self.events(job_id)
        metrics = self._metrics(job_id, bus)
        self.store.update(
            job_id, status=JobStatus.RUNNING, started_s=time.time(), error="", error_private=False
        )
        self.resources.open(
            job_id, metrics
        )  # it closes the metrics when the job's last samples are in
        status, error, private = JobStatus.FINISHED, "", False
        try:
            await self._execute(job_id, bus, metrics)
        except HaulerError as failure:
            status, error, private = (
                JobStatus.FAILED,
                str(failure),
                isinstance(failure, JobCodeError),
            )
        except asyncio.CancelledError:
            if job_id not in self._aborting:
                self.resources.close(job_id, late=False)
                raise
            self._aborting.discard(job_id)
            status, error = JobStatus.ABORTED, "aborted by an admin"
        except (
            Exception
        ) as failure:  # the job's own code, or a bug: the job fails, the server lives
            log.exception("job failed unexpectedly", extra={"job": job_id})
            status, error = JobStatus.FAILED, f"{type(failure).__name__}: {failure}"
        rounds = RoundStore(self.job_dir(job_id), self.config.keep_rounds).latest() or 0
        self.store.update(
            job_id,
            status=status,
            finished_s=time.time(),
            error=error,
            error_private=private,
            rounds_done=rounds,
        )
        bus.emit(
            f"job.{status.value}", job=job_id, error=error, rounds_done=rounds, **_privacy(private)
        )
        self.resources.close(job_id)
        await self._end_on_sites(job_id)
        await self.reclaim()

    def _metrics(self, job_id: str, bus: EventBus) -> JsonLines:
        """The job's metrics file, whose records also go to MLflow where the job (or this server)
        asks; a tracking this server no longer allows is said in the job's events, untracked."""
        path = self.job_dir(job_id) / "metrics.jsonl"
        try:
            job = load_job(self.job_dir(job_id) / "app")
            target = self._tracking(job, job_id)
        except HaulerError as error:
            bus.emit("tracking.failed", job=job_id, error=str(error))
            return JsonLines(path)
        return open_metrics(path, bus, target, Run.of(job, job_id, SERVER))

    async def _execute(self, job_id: str, bus: EventBus, metrics: JsonLines) -> None:
        job_dir = self.job_dir(job_id)
        job = load_job(job_dir / "app")
        federation = JobFederation(
            job_id=job_id,
            job_dir=job_dir,
            job=job,
            package_b64=(job_dir / "package.b64").read_text(),
            server=self.config,
            sites=self.sites,
            transfers=self.transfers,
            emit=_emitter(bus, job_id),
            record=metrics.write,
            note=lambda text: self.store.update(job_id, note=text),
        )
        unsubscribe = bus.subscribe(self._planned(job_id))
        try:
            bus.emit("job.started", job=job_id, name=job.name)
            first_round = await self._first_round(job_id, job, bus, federation.rounds)
            await workflow_for(job.workflow, job.sites).run(federation, first_round=first_round)
        finally:
            unsubscribe()
            federation.close()

    def _planned(self, job_id: str) -> Callable[[Event], None]:
        """Records the job's number of rounds once its workflow knows it (cyclic: its passes x
        its sites, known when it starts)."""

        def planned(event: Event) -> None:
            if event.name == "rounds.planned":
                self.store.update(job_id, num_rounds=int(event.fields["rounds"]))

        return planned

    async def _first_round(
        self, job_id: str, job: JobConfig, bus: EventBus, rounds: RoundStore
    ) -> int:
        """The newest intact round (torn ones are skipped, and the events say why); round 0 is
        made again where it can be."""
        latest, skipped = await asyncio.to_thread(rounds.latest_intact)
        for torn in skipped:
            bus.emit("round.skipped", job=job_id, round=torn.round, reason=torn.reason)
        if latest is None:
            await self._initial_model(job_id, job, rounds)
        return latest or INITIAL_ROUND

    async def _initial_model(self, job_id: str, job: JobConfig, rounds: RoundStore) -> None:
        """Round 0 from a file of the server's model_dirs, or built by the job's model module in a
        confined child where the server allows it; an uploaded one cannot be made again here."""
        chunk_bytes = self.config.dataplane.chunk_bytes
        if job.model.file is not None:
            source = resolve_model_file(job.model.file, self.config.model_dirs)
            await asyncio.to_thread(import_initial_model, rounds, source, chunk_bytes, move=False)
        elif job.model.build == "server" and job.model.module is not None:
            self._check_initial_source(job, None)
            built = await initial.build_on_server(
                self.job_dir(job_id) / "app",
                job.model.module,
                job.model.config,
                chunk_bytes,
                self.job_dir(job_id) / "initial",
            )
            await asyncio.to_thread(import_initial_model, rounds, built, chunk_bytes, move=True)
        else:
            raise JobError(
                "the job's initial model, uploaded with it, is missing or damaged on the "
                "server; submit the job again"
            )

    async def _end_on_sites(self, job_id: str) -> None:
        for session in list(self.sites.sites.values()):
            if job_id in session.deployed_jobs:
                session.deployed_jobs.discard(job_id)
                try:
                    await session.send(EndJob(job_id=job_id))
                except HaulerError:
                    pass

    async def watch(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's past events, then live ones, until it ends."""
        self.store.get(job_id)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        unsubscribe = self.events(job_id).subscribe(queue.put_nowait)
        try:
            # No await between subscribing and reading: every event is either in the file or queued.
            past = read_json_lines(self.job_dir(job_id) / "events.jsonl")
            for record in past:
                yield record
            if any(r["event"] in _ENDINGS for r in past):
                return
            while True:
                if queue.empty() and self.store.get(job_id).status.ended:
                    return  # ended without an event to replay (e.g. aborted while queued)
                record = (await queue.get()).to_record()
                yield record
                if record["event"] in _ENDINGS:
                    return
        finally:
            unsubscribe()


_ENDINGS = {"job.finished", "job.failed", "job.aborted"}


def _model_bytes(job_dir: Path) -> int:
    return sum(path.stat().st_size for path in (job_dir / "global").glob("*.safetensors"))


def _emitter(bus: EventBus, job_id: str) -> Callable[..., None]:
    """The job's `emit`: an `error` given as an exception is said as text, and marked private
    when it came from the job's own code (readers then show it to the job's submitter and
    project admins only)."""

    def emit(name: str, **fields: Any) -> None:
        error = fields.get("error")
        if isinstance(error, BaseException):
            fields.update(error=str(error), **_privacy(isinstance(error, JobCodeError)))
        bus.emit(name, job=job_id, **fields)

    return emit


def _privacy(private: bool) -> dict[str, bool]:
    return {"private": True} if private else {}
