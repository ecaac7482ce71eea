"""The server side of one running job: `workflows.Federation` over real sites.

For each site and round: offer the round's global model on the data plane (the whole model,
and, from round 1 with a download codec, the round's encoded delta, which a site holding the
previous round takes instead), wait for the site's result (its weight and layout checked
before anything is folded), receive its upload chunk by chunk into one buffer per lane,
decoded if it is encoded, and fold each chunk as it lands (checked for non-finite values and,
if set, max_update_norm). A site that stops or is refused part-way taints the round, which is
refolded from the sites that completed. A site whose control stream drops keeps its task
while it is away; one that comes back as a new process gets the task again. Every wait
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

from hauler.aggregate import LaneBuffers, Recipe, RoundAggregate, UploadSink, check_weight
from hauler.core.config import JobConfig, ServerConfig
from hauler.core.errors import (
    ConnectionLost,
    HaulerError,
    JobError,
    SiteRestarted,
    TransferTimeout,
)
from hauler.core.messages import (
    AbortTask,
    DeltaOffer,
    DeployJob,
    Encoding,
    ResultReady,
    Task,
    UploadReady,
)
from hauler.core.resources import rss_anon_bytes
from hauler.core.waiting import unless_ended
from hauler.model import ChunkPlan, Manifest
from hauler.model.codecs import Codec, make_codec
from hauler.model.encoded import EncodedFile, encoded_limit
from hauler.server.sites import SiteRegistry, SiteSession
from hauler.server.transfers import Download, TransferRegistry, wait_any
from hauler.transfer import ReceiveLedger
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
            recipe=Recipe.of(job),
        )
        self.rounds = self.aggregate.rounds
        self.records = RoundRecords(record)
        self._package_b64 = package_b64
        self._buffers: dict[str, LaneBuffers] = {}
        self._results: dict[str, tuple[str, ResultReady]] = {}  # site -> (task id, its result)
        self._upload_statistics: dict[str, dict[str, Any]] = {}
        self._delta: tuple[EncodedFile, str] | None = None  # the round's delta and its base
        self._manifest_json: dict[str, Any] = {}

    async def wait_for_sites(self, count: int, wanted: list[str] | None) -> list[str]:
        """The connected sites (those the job names, if it names some), once `count` are there;
        meanwhile the events and the job's note say who is there and who is missing."""

        def waiting(connected: list[str]) -> None:
            missing = sorted(set(wanted) - set(connected)) if wanted else []
            note = f"waiting: {len(connected)} of {count} sites connected " + (
                f"({', '.join(connected) or 'none'})"
            )
            note += f"; not connected: {', '.join(missing)}" if missing else ""
            self.emit("sites.waiting", count=count, connected=connected, note=note)
            self.note(note)

        chosen = await self.sites.wait_for(count, wanted, waiting)
        self.note("")
        return chosen

    async def begin_round(self, round: int) -> None:
        self.aggregate.begin(round)  # in the loop: a cancelled round leaves no thread behind
        self.records.begin(round)
        self._results = {}
        self._delta = await asyncio.to_thread(self._open_delta, round)
        self._manifest_json = self.aggregate.global_model.manifest.to_json()  # once, every Task

    def _open_delta(self, round: int) -> tuple[EncodedFile, str] | None:
        """The round's encoded delta from the previous round, and that round's digest."""
        if round == 0 or self.job.transfer.download == "none":
            return None
        delta = self.rounds.open_delta(round)
        return None if delta is None else (delta, delta.index.base)

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
        site, manifest = session.name, self.aggregate.global_model.manifest
        await self._deploy(session)
        task_id = secrets.token_hex(8)
        offers = self._offers(site)
        for offer in offers:
            offer.listeners.append(self._progress(site, round, "download", manifest.total_bytes))
        result_future = session.expect_result(task_id)
        clock = time.perf_counter
        try:
            start, started_s = clock(), time.time()
            await session.request(task_id, self._task(task_id, round, offers))
            what = f"sending round {round} to {site}"
            wait = wait_any(offers, self.server.timeouts.communication_timeout, what)
            download = await self._unless_lost(session, wait, refusal=result_future)
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
            self.transfers.discard(*offers)
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
            download={**download.statistics(), "codec": self._codec_of(download)},
            upload=self._upload_statistics.pop(site, {}),
        )
        self.emit("site.result", round=round, site=site, weight=result.weight, **timings)
        return accepted

    def _offers(self, site: str) -> list[Download]:
        """The round's global model for `site`: whole, and as the encoded delta if there is one."""
        served = self.aggregate.global_model
        plan = ChunkPlan(served.manifest)
        offers = [self.transfers.offer(site, plan, served)]
        if self._delta is not None:
            delta, _ = self._delta
            offers.append(self.transfers.offer(site, plan, delta, delta.payload_bytes))
        return offers

    def _task(self, task_id: str, round: int, offers: list[Download]) -> Task:
        delta = None
        if self._delta is not None:
            file, base = self._delta
            index = file.index
            encoding = Encoding(
                codec=index.codec, block_elements=index.block_elements, digest=index.digest
            )
            delta = DeltaOffer(transfer=offers[1].id, base=base, encoding=encoding)
        manifest = self._manifest_json
        download, lanes = offers[0].id, offers[0].lanes
        return Task(
            task_id=task_id,
            job_id=self.job_id,
            round=round,
            manifest=manifest,
            download=download,
            lanes=lanes,
            delta=delta,
        )

    def _codec_of(self, download: Download) -> str:
        return download.source.index.codec if isinstance(download.source, EncodedFile) else "none"

    async def _collect(
        self, session: SiteSession, task_id: str, result: ResultReady, round: int
    ) -> None:
        """Receive a site's update and fold each chunk into the aggregate as it lands."""
        site = session.name
        manifest = self._check_result(result, site)
        codec = self._upload_codec(result.encoding, site)
        contribution = self.aggregate.contribution(
            result.weight,
            update=result.delta or codec is not None,
            max_update_norm=self.job.workflow.max_update_norm,
        )
        plan = ChunkPlan(manifest)
        buffers = self._buffers.setdefault(
            site, LaneBuffers(self.server.dataplane.connections, manifest.chunk_bytes)
        )
        sink = UploadSink(buffers, contribution, plan, site=site, codec=codec)
        upload = self.transfers.expect(site, self._ledger(plan, codec, result.encoding), sink)
        upload.listeners.append(self._progress(site, round, "upload", manifest.total_bytes))
        failure = session.expect_result(task_id)  # the site's TaskFailed, should it fail to upload
        try:
            ready = UploadReady(task_id=task_id, upload=upload.id, lanes=upload.lanes)
            await session.request(task_id, ready)
            what = f"receiving {site}'s update"
            wait = upload.wait(self.server.timeouts.communication_timeout, what)
            await self._unless_lost(session, wait, refusal=failure)
            contribution.complete()
            codec_name = codec.name if codec is not None else "none"
            self._upload_statistics[site] = {**upload.statistics(), "codec": codec_name}
        finally:
            contribution.abandon()  # no-op once complete; taints the round if it stopped part-way
            session.forget(task_id)
            self.transfers.discard(upload)

    def _ledger(
        self, plan: ChunkPlan, codec: Codec | None, encoding: Encoding | None
    ) -> ReceiveLedger:
        if codec is None or encoding is None:
            return self.transfers.ledger_for(plan)
        return self.transfers.ledger_for(
            plan, payload_limit=encoded_limit(codec, plan), stream_digest=encoding.digest
        )

    def _upload_codec(self, encoding: Encoding | None, site: str) -> Codec | None:
        """The codec of a site's upload, which must be the job's; None for a raw upload."""
        expected = self.job.transfer
        if encoding is None and expected.upload == "none":
            return None
        said = "no codec" if encoding is None else f"codec {encoding.codec!r}"
        if encoding is None or (encoding.codec, encoding.block_elements) != (
            expected.upload,
            expected.block_elements,
        ):
            raise JobError(
                f"{site} sent its update with {said}, but the job's upload codec is "
                f"{expected.upload!r} (blocks of {expected.block_elements}); is the site running "
                "another version of Hauler?"
            )
        return make_codec(encoding.codec, block_elements=encoding.block_elements)

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
        manifest = self.aggregate.global_model.manifest.like(result.manifest)
        if not manifest.same_layout(self.aggregate.global_model.manifest):
            raise JobError(f"{site} returned a model whose tensors differ from the global model's")
        return manifest

    async def _deploy(self, session: SiteSession) -> None:
        if self.job_id in session.deployed_jobs:
            return
        deploy = DeployJob(
            job_id=self.job_id,
            package_b64=self._package_b64,
            executor=self.job.executor.model_dump(),
            transfer=self.job.transfer.model_dump(),
        )
        await session.send(deploy)
        session.deployed_jobs.add(self.job_id)

    async def _unless_lost(
        self, session: SiteSession, work: Awaitable[T], refusal: asyncio.Future | None = None
    ) -> T:
        """Await `work`, failing with why the site's session ended if it ends first, or with
        the site's own failure report if `refusal` (its result future) fails first."""
        ended = asyncio.get_running_loop().create_future()

        def end(future: asyncio.Future) -> None:
            failed = not future.cancelled() and future.exception() is not None
            if failed and not ended.done():
                ended.set_exception(future.exception())
                ended.exception()  # retrieved: `work` may win
            elif future is session.closed and not ended.done():
                ended.set_result(None)

        watched = [session.closed, *([refusal] if refusal is not None else [])]
        for future in watched:
            future.add_done_callback(end)
        try:
            gone = lambda: ConnectionLost(f"site {session.name} disconnected")  # noqa: E731
            return await unless_ended(work, ended, gone)
        finally:
            for future in watched:
                future.remove_done_callback(end)

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
        manifest = await asyncio.to_thread(self.aggregate.finish, round)
        self._close_delta()
        self._say_encoded(round + 1, manifest.total_bytes)
        self.records.end(results, server_rss_anon_bytes=rss_anon_bytes())

    def _say_encoded(self, round: int, model_bytes: int) -> None:
        """The new round's delta was encoded, once, for every site that holds the round before."""
        index = self.rounds.delta_index(round)
        if index is not None:
            encoded = sum(index.lengths)
            self.emit(
                "round.encoded",
                round=round,
                codec=index.codec,
                bytes=encoded,
                model_bytes=model_bytes,
            )

    async def _refold(self, round: int, results: list[TrainResult]) -> list[TrainResult]:
        """A site died mid-upload and left partial folds: start the sum again from the
        completed sites."""
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
                f"site failed mid-upload; fewer than "
                f"min_clients={self.job.workflow.min_clients}"
            )
        return kept

    def _close_delta(self) -> None:
        if self._delta is not None:
            self._delta[0].close()
            self._delta = None

    def close(self) -> None:
        self._close_delta()
        self.aggregate.close()


async def _quietly(work: Awaitable[Any]) -> None:
    try:
        await work
    except Exception:  # best effort: the site may already be gone
        pass
