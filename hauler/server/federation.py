"""The server side of one running job: `workflows.Federation` over real sites.

For each site and round: offer the round's global model on the data plane, wait for the
site's result (its weight checked before anything is folded), receive its upload chunk by
chunk into one buffer per lane and fold each chunk as it lands (checked for non-finite values
and, if set, max_update_norm). A site that stops or is refused part-way taints the round,
which is refolded from the sites that completed. A site whose control stream drops keeps its
task while it is away; one that comes back as a new process gets the task again. Every wait
measures silence (communication_timeout), except the site's own work (train_timeout), which
starts when the model has fully arrived.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from hauler.aggregate import RoundAggregate, UploadBuffers, check_weight, folding
from hauler.core.config import JobConfig, ServerConfig
from hauler.core.errors import ConnectionLost, HaulerError, JobError, TransferTimeout
from hauler.core.messages import AbortTask, DeployJob, ResultReady, Task, UploadReady
from hauler.core.resources import rss_anon_bytes
from hauler.model import Manifest
from hauler.server.sites import SiteRegistry, SiteRestarted, SiteSession
from hauler.server.transfers import TransferRegistry
from hauler.workflows import TrainResult
from hauler.workflows.records import RoundRecords

T = TypeVar("T")
PROGRESS_EVERY_S = 0.5
MAX_TASK_RESTARTS = 3  # a site restarting in a loop cannot hold a round open for ever


class JobFederation:
    def __init__(
        self,
        *,
        job_id: str,
        job_dir: Path,
        job: JobConfig,
        package_b64: str,
        server: ServerConfig,
        sites: SiteRegistry,
        transfers: TransferRegistry,
        emit: Callable[..., None],
        record: Callable[[dict], None],
        note: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.job_id, self.job_dir, self.job, self.server = job_id, job_dir, job, server
        self.sites, self.transfers = sites, transfers
        self.emit, self.note = emit, note
        self.aggregate = RoundAggregate(
            job_dir,
            keep_rounds=server.keep_rounds,
            memory_budget_bytes=server.memory_budget_mib << 20,
        )
        self.rounds = self.aggregate.rounds
        self.records = RoundRecords(record)
        self._package_b64 = package_b64
        self._buffers: dict[str, UploadBuffers] = {}
        self._results: dict[
            str, tuple[str, ResultReady]
        ] = {}  # site -> (task id, result), this round
        self._upload_statistics: dict[str, dict[str, int]] = {}

    async def wait_for_sites(self, count: int, wanted: list[str] | None) -> list[str]:
        """The connected sites (those the job names, if it names some), once `count` are there;
        meanwhile the events and the job's note say who is there and who is missing."""

        def waiting(connected: list[str]) -> None:
            missing = sorted(set(wanted) - set(connected)) if wanted else []
            note = (
                f"waiting: {len(connected)} of {count} sites connected "
                f"({', '.join(connected) or 'none'})"
                + (f"; not connected: {', '.join(missing)}" if missing else "")
            )
            self.emit("sites.waiting", count=count, connected=connected, note=note)
            self.note(note)

        chosen = await self.sites.wait_for(count, wanted, waiting)
        self.note("")
        return chosen

    async def begin_round(self, round: int) -> None:
        self.aggregate.begin(round)
        self.records.begin(round)
        self._results = {}

    async def train(self, site: str, round: int) -> TrainResult:
        """Run the round's task on `site`. A site whose stream drops keeps its task while it is
        away (up to communication_timeout); one that comes back as a new process is given the
        task again from the start, at most MAX_TASK_RESTARTS times a round."""
        restarts = 0
        while True:
            session = await self.sites.current(site, self.server.timeouts.communication_timeout)
            try:
                return await self._train_on(session, round)
            except SiteRestarted as error:
                restarts += 1
                if restarts > MAX_TASK_RESTARTS:
                    raise
                self.emit("site.restarted", round=round, site=site, error=str(error))

    async def _train_on(self, session: SiteSession, round: int) -> TrainResult:
        site, served = session.name, self.aggregate.global_model
        await self._deploy(session)
        task_id, manifest = secrets.token_hex(8), served.manifest
        download = self.transfers.offer(site, manifest, served)
        download.listeners.append(self._progress(site, round, "download", manifest.total_bytes))
        result_future = session.expect_result(task_id)
        clock = time.perf_counter
        try:
            start, started_s = clock(), time.time()
            await session.request(
                task_id,
                Task(
                    task_id=task_id,
                    job_id=self.job_id,
                    round=round,
                    manifest=manifest.to_json(),
                    download=download.id,
                    lanes=download.lanes,
                ),
            )
            await self._unless_lost(
                session,
                download.wait(
                    self.server.timeouts.communication_timeout, f"sending round {round} to {site}"
                ),
                refusal=result_future,
            )
            arrived = clock()
            result = await self._unless_lost(session, self._train_result(result_future, site))
            trained = clock()
            self._results[site] = (task_id, result)
            await self._collect(session, task_id, result, round)
            uploaded = clock()
        except BaseException as error:
            reason = str(error) if isinstance(error, HaulerError) else "the server ended the task"
            await _quietly(session.send(AbortTask(task_id=task_id, reason=reason[:1000])))
            raise
        finally:
            session.forget(task_id)
            self.transfers.discard(download)
        timings = {
            "download_s": arrived - start,
            "train_s": trained - arrived,
            "upload_s": uploaded - trained,
        }
        accepted = TrainResult(site, result.weight, result.metrics, timings)
        self.records.site(
            accepted,
            started_s=started_s,
            model_bytes=manifest.total_bytes,
            download=download.statistics(),
            upload=self._upload_statistics.pop(site, {}),
        )
        self.emit("site.result", round=round, site=site, weight=result.weight, **timings)
        return accepted

    async def _collect(
        self, session: SiteSession, task_id: str, result: ResultReady, round: int
    ) -> None:
        """Receive a site's update and fold each chunk into the aggregate as it lands."""
        manifest = self._check_result(result, session.name)
        contribution = self.aggregate.contribution(
            result.weight, delta=result.delta, max_update_norm=self.job.workflow.max_update_norm
        )
        buffers = self._buffers.get(session.name)
        if buffers is None:
            buffers = self._buffers[session.name] = UploadBuffers(
                manifest.chunk_bytes, self.server.dataplane.connections
            )
        upload = self.transfers.expect(
            session.name, manifest, buffers, on_chunk=folding(contribution, buffers, session.name)
        )
        buffers.ledger = (
            upload.ledger
        )  # before the site hears of the upload: no chunk can come sooner
        upload.listeners.append(self._progress(session.name, round, "upload", manifest.total_bytes))
        failure = session.expect_result(task_id)  # the site's TaskFailed, should it fail to upload
        try:
            await session.request(
                task_id, UploadReady(task_id=task_id, upload=upload.id, lanes=upload.lanes)
            )
            await self._unless_lost(
                session,
                upload.wait(
                    self.server.timeouts.communication_timeout, f"receiving {session.name}'s update"
                ),
                refusal=failure,
            )
            contribution.complete()
            self._upload_statistics[session.name] = upload.statistics()
        finally:
            contribution.abandon()  # no-op once complete; taints the round if it stopped part-way
            session.forget(task_id)
            self.transfers.discard(upload)

    async def _train_result(self, future: asyncio.Future[ResultReady], site: str) -> ResultReady:
        seconds = self.job.workflow.train_timeout
        try:
            async with asyncio.timeout(seconds):
                return await future
        except TimeoutError:
            raise TransferTimeout(
                "train_timeout", seconds or 0, f"waiting for {site} to train"
            ) from None

    def _check_result(self, result: ResultReady, site: str) -> Manifest:
        """Refuse a result before any of it is folded: its weight, then its layout."""
        check_weight(result.weight, site, self.job.workflow.max_weight)
        manifest = Manifest.from_json(result.manifest)
        if not manifest.same_layout(self.aggregate.global_model.manifest):
            raise JobError(f"{site} returned a model whose tensors differ from the global model's")
        return manifest

    async def _deploy(self, session: SiteSession) -> None:
        if self.job_id in session.deployed_jobs:
            return
        await session.send(
            DeployJob(
                job_id=self.job_id,
                package_b64=self._package_b64,
                executor=self.job.executor.model_dump(),
            )
        )
        session.deployed_jobs.add(self.job_id)

    async def _unless_lost(
        self, session: SiteSession, work: Awaitable[T], refusal: asyncio.Future | None = None
    ) -> T:
        """Await `work`, failing with ConnectionLost if the site's session ends first, or with
        the site's own failure report if `refusal` (its result future) fails first."""
        task = asyncio.ensure_future(work)
        watched = [task, session.closed]
        try:
            while not task.done() and not session.closed.done():
                if refusal is not None and refusal.done() and refusal.exception() is not None:
                    raise refusal.exception()
                pending = [
                    *watched,
                    *([refusal] if refusal is not None and not refusal.done() else []),
                ]
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise session.closed.exception() or ConnectionLost(f"site {session.name} disconnected")
        return task.result()

    def _progress(self, site: str, round: int, direction: str, total: int) -> Callable[[int], None]:
        state = {"bytes": 0, "emitted": 0.0}

        def listener(nbytes: int) -> None:
            state["bytes"] += nbytes
            now = time.monotonic()
            if now - state["emitted"] >= PROGRESS_EVERY_S or state["bytes"] >= total:
                state["emitted"] = now
                self.emit(
                    "transfer.progress",
                    round=round,
                    site=site,
                    direction=direction,
                    bytes=state["bytes"],
                    total=total,
                )

        return listener

    async def end_round(self, round: int, results: list[TrainResult]) -> None:
        if self.aggregate.fedavg.tainted:
            results = await self._refold(round, results)
        await asyncio.to_thread(self.aggregate.finish, round)
        self.records.end(results, server_rss_anon_bytes=rss_anon_bytes())

    async def _refold(self, round: int, results: list[TrainResult]) -> list[TrainResult]:
        """A site died mid-upload and left partial folds: start the sum again from the completed
        sites."""
        self.emit("round.refold", round=round, sites=[r.site for r in results])
        self.aggregate.fedavg.restart()
        kept = []
        for result in results:
            task_id, ready = self._results[result.site]
            try:
                await self._collect(self.sites.get(result.site), task_id, ready, round)
                kept.append(result)
            except HaulerError as error:
                self.emit("site.failed", round=round, site=result.site, error=error)
                self.aggregate.fedavg.restart()
                return await self._refold(round, [r for r in results if r.site != result.site])
        if len(kept) < self.job.workflow.min_clients:
            raise JobError(
                f"round {round}: only {len(kept)} sites could re-send their update after a "
                f"site failed mid-upload; fewer than min_clients={self.job.workflow.min_clients}"
            )
        return kept

    def close(self) -> None:
        self.aggregate.close()


async def _quietly(work: Awaitable[Any]) -> None:
    try:
        await work
    except Exception:  # best effort: the site may already be gone
        pass
