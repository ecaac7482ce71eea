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

For cross-site evaluation the same machinery moves other models: a site's local model is
uploaded (raw, its layout and digests checked) into `local/<site>.safetensors` through a
FileSink, once, and every model to evaluate is offered from its file like a round's global
model; the site answers an evaluation with metrics only.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from hauler.aggregate import Recipe, RoundAggregate, UploadSink, check_weight
from hauler.core.config import JobConfig, ServerConfig
from hauler.core.errors import (
    ConnectionLost,
    HaulerError,
    JobError,
    RemoteProtocolError,
    SiteRestarted,
    TransferTimeout,
)
from hauler.core.messages import (
    AbortTask,
    DeltaOffer,
    DeployJob,
    Encoding,
    Evaluated,
    ResultReady,
    Task,
    UploadReady,
)
from hauler.core.resources import rss_anon_bytes
from hauler.core.waiting import unless_ended
from hauler.model import ChunkPlan, Manifest
from hauler.model.codecs import Codec, make_codec
from hauler.model.encoded import EncodedFile, encoded_limit
from hauler.model.local_models import GLOBAL, EvaluatedModels, LocalModels
from hauler.server.sites import Answer, SiteRegistry, SiteSession
from hauler.server.transfers import Download, TransferRegistry, wait_any
from hauler.transfer import FileSink, LaneBuffers, ReceiveLedger
from hauler.transport.streams import ChunkSink
from hauler.workflows import TrainResult
from hauler.workflows.base import Evaluation
from hauler.workflows.records import RoundRecords

T = TypeVar("T")
A = TypeVar("A", bound=Answer)
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
        self.record = record
        self.local_models = LocalModels(job_dir)
        self.evaluated = EvaluatedModels(self.rounds, self.local_models)
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

    async def train(self, site: str, round: int, *, keep_local: bool = False) -> TrainResult:
        """Run the round's task on `site` (see `_on_site` for a site that drops or restarts)."""
        return await self._on_site(site, round, lambda s: self._train_on(s, round, keep_local))

    async def _on_site(
        self, site: str, round: int, work: Callable[[SiteSession], Awaitable[T]]
    ) -> T:
        """Run a task on `site`. A site whose stream drops keeps its task while it is away (up
        to communication_timeout); one that comes back as a new process is given the task again
        from the start, at most MAX_TASK_RESTARTS times a round."""
        restarts = 0
        while True:
            session = await self.sites.current(site, self.server.timeouts.communication_timeout)
            try:
                return await work(session)
            except SiteRestarted as error:
                restarts += 1
                if restarts > MAX_TASK_RESTARTS:
                    raise
                self.emit("site.restarted", round=round, site=site, error=str(error))

    async def _train_on(self, session: SiteSession, round: int, keep_local: bool) -> TrainResult:
        site, manifest = session.name, self.aggregate.global_model.manifest
        offers = self._offers(site)
        task = self._task(secrets.token_hex(8), round, offers, keep_local)
        async with self._running(session, task, offers):
            run = await self._answered(session, task, offers, ResultReady, manifest.total_bytes)
            result = run.answer
            self._results[site] = (task.task_id, result)
            await self._collect(session, task.task_id, result, round)
            uploaded = time.perf_counter()
        timings = {
            "download_s": run.arrived - run.start,
            "train_s": run.answered - run.arrived,
            "upload_s": uploaded - run.answered,
        }
        accepted = TrainResult(site, result.weight, result.metrics, timings, result.validation)
        assert run.download is not None
        self.records.site(
            accepted,
            started_s=run.started_s,
            model_bytes=manifest.total_bytes,
            download={**run.download.statistics(), "codec": self._codec_of(run.download)},
            upload=self._upload_statistics.pop(site, {}),
        )
        self.emit("site.result", round=round, site=site, weight=result.weight, **timings)
        return accepted

    async def submit_local_model(self, site: str) -> None:
        """Have `site` upload its local model into `local/<site>.safetensors`, once."""
        round = self.rounds.latest() or 0
        await self._on_site(site, round, lambda session: self._submit_on(session, round))

    async def _submit_on(self, session: SiteSession, round: int) -> None:
        layout = self.evaluated.get(GLOBAL).manifest
        task = Task(
            kind="submit",
            task_id=secrets.token_hex(8),
            job_id=self.job_id,
            round=round,
            manifest=layout.to_json(),
            download="",
        )
        async with self._running(session, task, []):
            run = await self._answered(session, task, [], ResultReady, layout.total_bytes)
            await self._store_local(session, task.task_id, run.answer, round)
        self.emit("model.submitted", site=session.name, bytes=layout.total_bytes)

    async def _store_local(
        self, session: SiteSession, task_id: str, result: ResultReady, round: int
    ) -> None:
        """Receive a site's local model into its file, every tensor checked against the digests
        it announced, then commit it."""
        site = session.name
        manifest = self._local_layout(result, site)
        plan = ChunkPlan(manifest)
        model = self.local_models.create(site, manifest)
        try:
            ledger = self.transfers.ledger_for(plan)
            await self._upload(session, task_id, ledger, FileSink(model, plan), round, "model")
            await asyncio.to_thread(model.flush)
        finally:
            model.close()
        self.local_models.commit(site, manifest)

    def _local_layout(self, result: ResultReady, site: str) -> Manifest:
        """A local model announced by `site`: the job's model's layout, with every digest."""
        layout = self.evaluated.get(GLOBAL).manifest
        manifest = layout.like(result.manifest)
        if not manifest.same_layout(layout) or not all(t.digest for t in manifest.tensors):
            raise RemoteProtocolError(
                f"{site} announced a local model whose tensors or digests are not the job's model's"
            )
        return manifest

    async def evaluate(self, site: str, model: str) -> Evaluation:
        """Have `site` evaluate `model` (GLOBAL, or a site's stored local model)."""
        round = self.rounds.latest() or 0
        return await self._on_site(site, round, lambda s: self._evaluate_on(s, model, round))

    async def _evaluate_on(self, session: SiteSession, name: str, round: int) -> Evaluation:
        served = self.evaluated.get(name)
        offers = [self.transfers.offer(session.name, ChunkPlan(served.manifest), served)]
        task = Task(
            kind="evaluate",
            task_id=secrets.token_hex(8),
            job_id=self.job_id,
            round=round,
            manifest=served.manifest.to_json(),
            download=offers[0].id,
            lanes=offers[0].lanes,
            model_name=name,
        )
        total = served.manifest.total_bytes
        async with self._running(session, task, offers):
            run = await self._answered(session, task, offers, Evaluated, total)
        timings = {"download_s": run.arrived - run.start, "evaluate_s": run.answered - run.arrived}
        return Evaluation(run.answer.metrics, timings, run.started_s)

    @contextlib.asynccontextmanager
    async def _running(
        self, session: SiteSession, task: Task, offers: list[Download]
    ) -> AsyncIterator[None]:
        """A task on a site, with the job deployed there: aborted on the site if anything
        fails here, and forgotten (its offers too) however it ends."""
        try:
            await self._deploy(session)
            yield
        except BaseException as error:
            reason = str(error) if isinstance(error, HaulerError) else "the server ended the task"
            await _quietly(session.send(AbortTask(task_id=task.task_id, reason=reason[:1000])))
            raise
        finally:
            session.forget(task.task_id)
            self.transfers.discard(*offers)

    async def _answered(
        self,
        session: SiteSession,
        task: Task,
        offers: list[Download],
        expected: type[A],
        model_bytes: int,
    ) -> Answered[A]:
        """Send `task`, wait until its model (offered as `offers`, if any) has arrived, then for
        the site's answer (within train_timeout: the site's own work)."""
        site = session.name
        for offer in offers:
            offer.listeners.append(self._progress(site, task.round, "download", model_bytes))
        future = session.expect_result(task.task_id)
        start, started_s = time.perf_counter(), time.time()
        await session.request(task.task_id, task)
        download = None
        if offers:
            what = f"sending round {task.round} to {site}"
            wait = wait_any(offers, self.server.timeouts.communication_timeout, what)
            download = await self._unless_lost(session, wait, refusal=future)
        arrived = time.perf_counter()
        answer = await self._unless_lost(session, self._answer(future, site, task, expected))
        return Answered(download, answer, started_s, start, arrived, time.perf_counter())

    def _offers(self, site: str) -> list[Download]:
        """The round's global model for `site`: whole, and as the encoded delta if there is one."""
        served = self.aggregate.global_model
        plan = ChunkPlan(served.manifest)
        offers = [self.transfers.offer(site, plan, served)]
        if self._delta is not None:
            delta, _ = self._delta
            offers.append(self.transfers.offer(site, plan, delta, delta.payload_bytes))
        return offers

    def _task(self, task_id: str, round: int, offers: list[Download], keep_local: bool) -> Task:
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
            keep_local=keep_local,
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
        buffers = self._buffers.get(site)
        if buffers is None:  # not setdefault: its default would be allocated every upload
            buffers = self._buffers[site] = LaneBuffers(
                self.server.dataplane.connections, manifest.chunk_bytes
            )
        sink = UploadSink(buffers, contribution, plan, site=site, codec=codec)
        ledger = self._ledger(plan, codec, result.encoding)
        try:
            statistics = await self._upload(session, task_id, ledger, sink, round, "update")
            contribution.complete()
            codec_name = codec.name if codec is not None else "none"
            self._upload_statistics[site] = {**statistics, "codec": codec_name}
        finally:
            contribution.abandon()  # no-op once complete; taints the round if it stopped part-way

    async def _upload(
        self,
        session: SiteSession,
        task_id: str,
        ledger: ReceiveLedger,
        sink: ChunkSink,
        round: int,
        what: str,
    ) -> dict[str, Any]:
        """Have the site upload its task's result into `sink`, as `ledger` allows; returns the
        transfer's figures."""
        site = session.name
        upload = self.transfers.expect(site, ledger, sink)
        upload.listeners.append(
            self._progress(site, round, "upload", ledger.plan.manifest.total_bytes)
        )
        failure = session.expect_result(task_id)  # the site's TaskFailed, should it fail to upload
        try:
            ready = UploadReady(task_id=task_id, upload=upload.id, lanes=upload.lanes)
            await session.request(task_id, ready)
            wait = upload.wait(
                self.server.timeouts.communication_timeout, f"receiving {site}'s {what}"
            )
            await self._unless_lost(session, wait, refusal=failure)
            return upload.statistics()
        finally:
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

    async def _answer(
        self, future: asyncio.Future[Answer], site: str, task: Task, expected: type[A]
    ) -> A:
        """The site's answer to `task`, of the kind the task calls for, within train_timeout."""
        seconds = self.job.workflow.train_timeout
        try:
            async with asyncio.timeout(seconds):
                answer = await future
        except TimeoutError:
            raise TransferTimeout(
                "train_timeout", seconds or 0, f"waiting for {site} to {task.kind}"
            ) from None
        if not isinstance(answer, expected):
            raise RemoteProtocolError(f"{site} answered a {task.kind} task with {answer.type}")
        return answer

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
        self.evaluated.close()


@dataclass(frozen=True)
class Answered(Generic[A]):
    """A task's answer, with the transfer of its model (if any) and when each step ended."""

    download: Download | None
    answer: A
    started_s: float  # unix time the task was sent
    start: float  # perf_counter times: sent, model arrived, answered
    arrived: float
    answered: float


async def _quietly(work: Awaitable[Any]) -> None:
    try:
        await work
    except Exception:  # best effort: the site may already be gone
        pass
