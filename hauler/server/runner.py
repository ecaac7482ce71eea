"""Runs submitted jobs one at a time: unpack, build the initial model, run the workflow.

Each job's events go to `jobs/<id>/events.jsonl` and to live watchers; its
round and site timings, and the CPU and memory samples of its processes, go to
`jobs/<id>/metrics.jsonl`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hauler.core.config import JobConfig, ServerConfig
from hauler.core.errors import HaulerError, JobError
from hauler.core.events import Event, EventBus, JsonLines, read_json_lines
from hauler.core.messages import EndJob
from hauler.core.package import load_job, unpack
from hauler.server.federation import JobFederation
from hauler.server.jobstore import JobStatus, JobStore
from hauler.server.resources import ResourceRecorder
from hauler.server.rounds import RoundStore
from hauler.server.sites import SiteRegistry
from hauler.server.transfers import TransferRegistry
from hauler.workflows import ScatterAndGather

log = logging.getLogger("hauler.server")


class JobRunner:
    def __init__(self, config: ServerConfig, store: JobStore, sites: SiteRegistry, transfers: TransferRegistry) -> None:
        self.config, self.store, self.sites, self.transfers = config, store, sites, transfers
        self.jobs_dir = config.workspace / "jobs"
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._buses: dict[str, EventBus] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._aborting: set[str] = set()
        # a site's samples come with its heartbeats: wait two of them for the last ones of a job
        self.resources = ResourceRecorder(sites, grace_s=2 * config.timeouts.heartbeat_interval + 1)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def submit(self, package_b64: str, submitter: tuple[str, str]) -> str:
        """Validate and store a job package, and queue the job."""
        job_id = uuid.uuid4().hex[:12]
        app_dir = self.job_dir(job_id) / "app"
        try:
            job = unpack(package_b64, app_dir, self.config.max_job_package_mib << 20)
        except HaulerError:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            raise
        (self.job_dir(job_id) / "package.b64").write_text(package_b64)
        self.store.add(job_id, job.name, job.workflow.num_rounds, submitter)
        self._queue.put_nowait(job_id)
        return job_id

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

    def events(self, job_id: str) -> EventBus:
        bus = self._buses.get(job_id)
        if bus is None:
            bus = self._buses[job_id] = EventBus()
            bus.subscribe(JsonLines(self.job_dir(job_id) / "events.jsonl"))
        return bus

    async def _run(self, job_id: str) -> None:
        """Run a job and record how it ended. A server that stops mid-job leaves it running,
        so a restart resumes it; only an admin's abort marks it aborted."""
        bus, metrics = self.events(job_id), JsonLines(self.job_dir(job_id) / "metrics.jsonl")
        self.store.update(job_id, status=JobStatus.RUNNING, started_s=time.time(), error="")
        self.resources.open(job_id, metrics)  # it closes the metrics when the job's last samples are in
        status, error = JobStatus.FINISHED, ""
        try:
            await self._execute(job_id, bus, metrics)
        except HaulerError as failure:
            status, error = JobStatus.FAILED, str(failure)
        except asyncio.CancelledError:
            if job_id not in self._aborting:
                self.resources.close(job_id, late=False)
                raise
            self._aborting.discard(job_id)
            status, error = JobStatus.ABORTED, "aborted by an admin"
        except Exception as failure:  # the job's own code, or a bug: the job fails, the server lives
            log.exception("job failed unexpectedly", extra={"job": job_id})
            status, error = JobStatus.FAILED, f"{type(failure).__name__}: {failure}"
        rounds = RoundStore(self.job_dir(job_id), self.config.keep_rounds).latest() or 0
        self.store.update(job_id, status=status, finished_s=time.time(), error=error, rounds_done=rounds)
        bus.emit(f"job.{status.value}", job=job_id, error=error, rounds_done=rounds)
        self.resources.close(job_id)
        await self._end_on_sites(job_id)

    async def _execute(self, job_id: str, bus: EventBus, metrics: JsonLines) -> None:
        job_dir = self.job_dir(job_id)
        job = load_job(job_dir / "app")
        federation = JobFederation(
            job_id=job_id, job_dir=job_dir, job=job, package_b64=(job_dir / "package.b64").read_text(),
            server=self.config, sites=self.sites, transfers=self.transfers,
            emit=lambda name, **fields: bus.emit(name, job=job_id, **fields), record=metrics.write,
        )
        try:
            bus.emit("job.started", job=job_id, name=job.name)
            first_round = await self._initial_model(job_id, job, federation.rounds)
            await ScatterAndGather(job.workflow, job.sites).run(federation, first_round=first_round)
        finally:
            federation.close()

    async def _initial_model(self, job_id: str, job: JobConfig, rounds: RoundStore) -> int:
        """Build round 0 from the job's model module in a child process (`server/initial.py`),
        unless a restart finds intact rounds already."""
        latest = await asyncio.to_thread(rounds.latest_intact)
        if latest is not None:
            return latest
        child = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "hauler.server.initial", str(self.job_dir(job_id)), job_id, job.model.module,
            json.dumps(job.model.config), str(self.config.dataplane.chunk_bytes), str(self.config.keep_rounds)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if child.returncode != 0:
            reason = child.stderr.decode(errors="replace").strip()[-2000:] or f"exit status {child.returncode}"
            raise JobError(f"building the initial model with {job.model.module}.py failed: {reason}")
        return 0

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


