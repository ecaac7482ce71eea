"""The server side of one running job: `workflows.Federation` over real sites.

For each site and round: offer the round's global model on the data plane, wait
for the site's result, receive its upload into the site's staging file, and fold
it into the aggregate only once complete and verified. Every wait measures
silence (communication_timeout), except the site's own work (train_timeout),
which starts when the model has fully arrived.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from hauler.aggregate import FedAvg
from hauler.core.config import JobConfig, ServerConfig
from hauler.core.errors import ConnectionLost, JobError, TransferTimeout
from hauler.core.messages import AbortTask, DeployJob, ResultReady, Task, UploadReady
from hauler.model import Manifest, ModelFile
from hauler.server.rounds import RoundStore
from hauler.server.sites import SiteRegistry, SiteSession
from hauler.server.transfers import Transfer, TransferRegistry
from hauler.workflows import TrainResult

T = TypeVar("T")
PROGRESS_EVERY_S = 0.5


class JobFederation:
    def __init__(self, *, job_id: str, job_dir: Path, job: JobConfig, package_b64: str,
                 server: ServerConfig, sites: SiteRegistry, transfers: TransferRegistry,
                 emit: Callable[..., None], record: Callable[[dict], None]) -> None:
        self.job_id, self.job_dir, self.job, self.server = job_id, job_dir, job, server
        self.sites, self.transfers = sites, transfers
        self.emit, self.record = emit, record
        self.rounds = RoundStore(job_dir, server.keep_rounds)
        self._package_b64 = package_b64
        self._global: ModelFile | None = None
        self._aggregate: FedAvg | None = None
        self._staging: dict[str, ModelFile] = {}
        self._round_started = self._last_upload_done = 0.0
        self._site_timings: list[dict[str, float]] = []

    async def wait_for_sites(self, count: int, wanted: list[str] | None) -> list[str]:
        self.emit("sites.waiting", count=count)
        return await self.sites.wait_for(count, wanted)

    async def begin_round(self, round: int) -> None:
        if self._global is not None:
            self._global.close()
        self._global = self.rounds.open(round)
        if self._aggregate is None:
            self._aggregate = FedAvg(self._global.manifest, workdir=self.job_dir,
                                     memory_budget_bytes=self.server.memory_budget_mib << 20)
        self._aggregate.reset()
        self._round_started = time.perf_counter()
        self._site_timings = []

    async def train(self, site: str, round: int) -> TrainResult:
        assert self._global is not None and self._aggregate is not None
        session = self.sites.get(site)
        await self._deploy(session)
        task_id, upload_id = secrets.token_hex(8), self.transfers.new_id()
        manifest = self._global.manifest
        download = self.transfers.offer(site, manifest, self._global)
        upload: Transfer | None = None
        result_future = session.expect_result(task_id)
        timeouts, clock = self.server.timeouts, time.perf_counter
        try:
            start = clock()
            await session.send(Task(task_id=task_id, job_id=self.job_id, round=round, manifest=manifest.to_json(),
                                    download=download.id, upload=upload_id))
            download.listeners.append(self._progress(site, round, "download", manifest.total_bytes))
            await self._unless_lost(session, download.wait(timeouts.communication_timeout, f"sending round {round} to {site}"))
            arrived = clock()
            result = await self._unless_lost(session, self._train_result(result_future, site))
            trained = clock()
            upload = self.transfers.expect(upload_id, site, self._check_result(result, site), self._staging_file(site))
            upload.listeners.append(self._progress(site, round, "upload", manifest.total_bytes))
            await session.send(UploadReady(task_id=task_id))
            await self._unless_lost(session, upload.wait(timeouts.communication_timeout, f"receiving {site}'s update"))
            uploaded = self._last_upload_done = clock()
            await asyncio.to_thread(self._aggregate.fold, upload.file, result.weight)
            folded = clock()
        except BaseException:
            await _quietly(session.send(AbortTask(task_id=task_id, reason="the server ended the task")))
            raise
        finally:
            session.forget(task_id)
            self.transfers.discard(download, upload)
        timings = {"download_s": arrived - start, "train_s": trained - arrived,
                   "upload_s": uploaded - trained, "fold_s": folded - uploaded}
        self._site_timings.append(timings)
        self.record({"kind": "site", "round": round, "site": site, "weight": result.weight,
                     "bytes": 2 * manifest.total_bytes, **timings, "metrics": result.metrics})
        self.emit("site.result", round=round, site=site, weight=result.weight, **timings)
        return TrainResult(site, result.weight, result.metrics, timings)

    async def _train_result(self, future: asyncio.Future[ResultReady], site: str) -> ResultReady:
        seconds = self.job.workflow.train_timeout
        try:
            async with asyncio.timeout(seconds):
                return await future
        except TimeoutError:
            raise TransferTimeout("train_timeout", seconds or 0, f"waiting for {site} to train") from None

    def _check_result(self, result: ResultReady, site: str) -> Manifest:
        manifest = Manifest.from_json(result.manifest)
        assert self._global is not None
        if not manifest.same_layout(self._global.manifest):
            raise JobError(f"{site} returned a model whose tensors differ from the global model's")
        return manifest

    def _staging_file(self, site: str) -> ModelFile:
        """The site's upload lands here; kept and overwritten in place every round."""
        assert self._global is not None
        staged = self._staging.get(site)
        if staged is None:
            staged = ModelFile.create(self.job_dir / "uploads" / f"{site}.safetensors", self._global.manifest)
            self._staging[site] = staged
        return staged

    async def _deploy(self, session: SiteSession) -> None:
        if self.job_id in session.deployed_jobs:
            return
        await session.send(DeployJob(job_id=self.job_id, package_b64=self._package_b64,
                                     executor_module=self.job.executor.module,
                                     executor_config=self.job.executor.config))
        session.deployed_jobs.add(self.job_id)

    async def _unless_lost(self, session: SiteSession, work: Awaitable[T]) -> T:
        """Await `work`, failing with ConnectionLost if the site's session ends first."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait([task, session.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise ConnectionLost(f"site {session.name} disconnected")
        return task.result()

    def _progress(self, site: str, round: int, direction: str, total: int) -> Callable[[int], None]:
        state = {"bytes": 0, "emitted": 0.0}

        def listener(nbytes: int) -> None:
            state["bytes"] += nbytes
            now = time.monotonic()
            if now - state["emitted"] >= PROGRESS_EVERY_S or state["bytes"] >= total:
                state["emitted"] = now
                self.emit("transfer.progress", round=round, site=site, direction=direction,
                          bytes=state["bytes"], total=total)

        return listener

    async def end_round(self, round: int, results: list[TrainResult]) -> None:
        assert self._aggregate is not None and self._global is not None
        output = self.rounds.create(round + 1, self._global.manifest)
        try:
            manifest = await asyncio.to_thread(self._aggregate.finish, output)
        finally:
            output.close()
        self.rounds.commit(round + 1, manifest)
        done = time.perf_counter()
        summary: dict[str, Any] = {key: max(t[key] for t in self._site_timings) for key in self._site_timings[0]}
        summary["aggregate_s"] = done - self._last_upload_done
        self.record({"kind": "round", "round": round, "sites": [r.site for r in results],
                     "round_s": done - self._round_started, **summary})

    def close(self) -> None:
        for model in [self._global, *self._staging.values()]:
            if model is not None:
                model.close()


async def _quietly(work: Awaitable[Any]) -> None:
    try:
        await work
    except Exception:  # best effort: the site may already be gone
        pass
