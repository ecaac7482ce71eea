"""The site process: dial the server, keep the session alive, run the tasks it offers.

A training task is: receive the global model into the site's global file (pre-sized once,
overwritten in place every round; as the encoded delta from the round the site holds, where the
job has a download codec), train on it (on a copy, where the job has codecs: client/jobfiles.py),
hash the result or encode the update, announce it, then upload it. For cross-site evaluation a
site also evaluates models it receives into a scratch file (answering with metrics only) and
uploads its local model when asked, unless its config keeps it (`share_local_model = false`).
The model never has to fit in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hauler.client.jobfiles import JobFiles
from hauler.client.trainer import Trainer, trainer_for
from hauler.core import logs
from hauler.core.config import ExecutorConfig, SiteConfig, TransferConfig, parse
from hauler.core.errors import (
    ConnectionLost,
    HaulerError,
    JobError,
    SecurityError,
    TaskRefused,
)
from hauler.core.events import TrackTransfer, untracked
from hauler.core.logs import JobLogs
from hauler.core.messages import (
    MAX_HEARTBEAT_LINES,
    MAX_HEARTBEAT_SAMPLES,
    AbortTask,
    DeleteJob,
    DeployJob,
    Encoding,
    EndJob,
    Evaluated,
    Heartbeat,
    Hello,
    LogLine,
    ResultReady,
    Task,
    TaskFailed,
    UploadReady,
    Welcome,
    encode,
    parse_server_message,
)
from hauler.core.package import code_digest, unpack
from hauler.core.resources import ProcessMeter
from hauler.core.retry import backoff_s
from hauler.model import ArraySource, ChunkPlan, Manifest, ModelFile
from hauler.model.codecs import Codec, make_codec
from hauler.model.encoded import EncodedFile, encoded_limit
from hauler.model.updates import encode_update
from hauler.transfer import FileSink, ReceiveLedger
from hauler.transfer.deltas import DeltaSink
from hauler.transport import (
    ControlChannel,
    DataAddress,
    MessageStream,
    fetch_model,
    push_model,
)
from hauler.transport.streams import ChunkSink, ChunkSource, Progress

log = logging.getLogger("hauler.client")
MAX_PACKAGE_BYTES = 64 << 20


class Site:
    """A site: one process, many control sessions. Its tasks belong to the site, not to a
    session, so a dropped control stream interrupts nothing: the work goes on, the server
    re-sends what it still asks on the next stream, and the site answers it again."""

    def __init__(self, config: SiteConfig, *, track: TrackTransfer = untracked) -> None:
        """`track` is told about every download and upload, e.g. to draw progress bars."""
        self.config = config
        self.track = track
        self.name = config.name
        self.instance = secrets.token_hex(8)  # tells the server a reconnection from a restart
        self.jobs_dir = config.workspace / "jobs"
        self._trainers: dict[str, Trainer] = {}
        self._deployed: dict[str, str] = {}  # job id -> digest of the package it runs
        self._refused: dict[str, str] = {}  # job id -> why this site will not run it
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}  # (step, task id) -> running
        self._files: dict[str, JobFiles] = {}  # job id -> its model files here
        # task id -> (job, what, where it is sent from)
        self._results: dict[str, tuple[str, Manifest, ChunkSource]] = {}
        # task id -> (job, its last report), said again if asked
        self._reports: dict[str, tuple[str, Any]] = {}
        self._stream: MessageStream | None = None
        self.connected = asyncio.Event()
        self.job_lines = JobLogs()  # what this site logs about jobs, sent with its heartbeats

    async def run(self) -> None:
        """Stay connected to the server, reconnecting with backoff, until cancelled."""
        logs.keep_job_lines(self.job_lines)
        try:
            await self._run()
        finally:
            logging.getLogger(logs.ROOT).removeHandler(self.job_lines)

    async def _run(self) -> None:
        failures = 0
        async with asyncio.TaskGroup() as work:
            while True:
                try:
                    await self._session(work)
                    failures = 0
                except SecurityError:
                    raise
                except HaulerError as error:
                    failures += 1
                    log.warning("session ended", extra={"site": self.name, "error": str(error)})
                self.connected.clear()
                await asyncio.sleep(backoff_s(max(failures, 1), self.config.dataplane))

    async def _session(self, work: asyncio.TaskGroup) -> None:
        channel = ControlChannel(self.config.server_host, self.config.control_port, self.config.tls)
        stream = channel.session()
        try:
            await stream.send(encode(Hello(site=self.name, instance=self.instance)))
            welcome = parse_server_message(await stream.receive() or {})
            if not isinstance(welcome, Welcome):
                raise ConnectionLost("server did not welcome this site")
            self._stream = stream
            self.connected.set()
            log.info("connected", extra={"site": self.name, "server": channel.target})
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeats(stream))
                await self._dispatch(stream, work)
                raise ConnectionLost("server closed the session")
        except* HaulerError as errors:
            raise errors.exceptions[0] from None
        finally:
            self._stream = None
            stream.cancel()
            await channel.close()

    async def _heartbeats(self, stream: MessageStream) -> None:
        """Every heartbeat_interval: the site and its training children's samples (one a second)
        and its log lines about jobs, its training code's output among them."""
        meter = ProcessMeter(children=True)
        while True:
            samples = await meter.collect(self.config.timeouts.heartbeat_interval)
            for job_id, trainer in list(self._trainers.items()):
                for text in trainer.output(MAX_HEARTBEAT_LINES):
                    self.job_lines.add(job_id, "output", text)
            await stream.send(
                encode(Heartbeat(resources=samples[-MAX_HEARTBEAT_SAMPLES:], logs=self._lines()))
            )

    def _lines(self) -> list[LogLine]:
        """The job lines kept since the last heartbeat that make valid lines (a job id is the
        server's word, and may be anything)."""
        lines = []
        for entry in self.job_lines.take(MAX_HEARTBEAT_LINES):
            try:
                lines.append(LogLine.model_validate(entry))
            except ValidationError:
                continue
        return lines

    async def _report(self, job_id: str, message: ResultReady | Evaluated | TaskFailed) -> None:
        """Tell the server how a task went, if connected; it asks again after a reconnection."""
        self._reports[message.task_id] = (job_id, message)
        if self._stream is not None:
            try:
                await self._stream.send(encode(message))
            except HaulerError:
                pass  # the session is ending; the next one is asked again

    async def _dispatch(self, stream: MessageStream, work: asyncio.TaskGroup) -> None:
        """Handle the server's messages; one that cannot be handled is refused and logged, and
        the site goes on (a message of a task that fails is reported as that task's failure)."""
        while (raw := await stream.receive()) is not None:
            try:
                await self._handle(parse_server_message(raw), work)
            except Exception as error:  # a hostile or buggy server must not take the site down
                log.warning(
                    "refused a message from the server",
                    extra={"site": self.name, "error": _describe(error)},
                )

    async def _handle(self, message: Any, work: asyncio.TaskGroup) -> None:
        if isinstance(message, DeployJob):
            await self._deploy_once(message)
        elif isinstance(message, Task):
            steps = {"train": self._train, "evaluate": self._evaluate, "submit": self._submit}
            work_on = steps[message.kind](message)
            await self._begin(work, "train", message.task_id, message.job_id, work_on)
        elif isinstance(message, UploadReady):
            job_id = self._results[message.task_id][0] if message.task_id in self._results else ""
            await self._begin(work, "upload", message.task_id, job_id, self._upload(message))
        elif isinstance(message, AbortTask):
            for step in ("train", "upload"):
                if (step, message.task_id) in self._tasks:
                    self._tasks[step, message.task_id].cancel()
        elif isinstance(message, EndJob):
            work.create_task(self._end_job(message.job_id))
        elif isinstance(message, DeleteJob):
            work.create_task(self._delete_job(message.job_id))

    async def _begin(
        self,
        work: asyncio.TaskGroup,
        step: str,
        task_id: str,
        job_id: str,
        coroutine: Coroutine[Any, Any, None],
    ) -> None:
        """Start a step of a task, unless it runs already or is done (then say again how it
        went)."""
        key = (step, task_id)
        if key in self._tasks or (step == "train" and task_id in self._reports):
            coroutine.close()
            if key not in self._tasks:
                await self._report(*self._reports[task_id])
            return
        if step == "train":
            self._forget_results(job_id)
        task = work.create_task(self._guarded(job_id, task_id, coroutine))
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    def _forget_results(self, job_id: str) -> None:
        for task_id in [t for t, (job, *_) in self._results.items() if job == job_id]:
            _, _, source = self._results.pop(task_id)
            if isinstance(source, EncodedFile):
                source.close()  # its file is written again next round
        for task_id in [t for t, (job, _) in self._reports.items() if job == job_id]:
            del self._reports[task_id]

    async def _deploy_once(self, message: DeployJob) -> None:
        """Deploy a job's package, unless this very package is deployed already."""
        digest = hashlib.sha256(message.package_b64.encode()).hexdigest()
        if self._deployed.get(message.job_id) == digest and message.job_id in self._trainers:
            return
        await self._stop_trainer(message.job_id)
        self._deployed.pop(message.job_id, None)
        try:
            await asyncio.to_thread(self._deploy, message)
            self._deployed[message.job_id] = digest
        except HaulerError as error:  # reported with the job's first task
            self._refused[message.job_id] = str(error)
            log.warning(
                "refused a job",
                extra={"site": self.name, "job": message.job_id, "error": str(error)},
            )

    def _deploy(self, message: DeployJob) -> None:
        executor = parse(ExecutorConfig, message.executor, f"job {message.job_id} [executor]")
        transfer = parse(TransferConfig, message.transfer, f"job {message.job_id} [transfer]")
        workdir = self.jobs_dir / message.job_id
        app_dir = workdir / "app"
        unpack(message.package_b64, app_dir, MAX_PACKAGE_BYTES)
        if not self.config.allow_custom_code:
            self._check_vetted(app_dir)
        self._refused.pop(message.job_id, None)
        self._trainers[message.job_id] = trainer_for(executor, app_dir, message.job_id, workdir)
        previous = self._files.pop(message.job_id, None)
        if previous is not None:
            previous.close()
        self._files[message.job_id] = JobFiles(workdir, transfer)

    def _check_vetted(self, app_dir: Path) -> None:
        """A locked-down site runs only job code whose digest it lists in trusted_code."""
        digest = code_digest(app_dir)
        if digest not in self.config.trusted_code:
            shutil.rmtree(app_dir, ignore_errors=True)
            raise JobError(
                f"site {self.name} refuses this job's code: it runs only vetted code "
                f"(allow_custom_code = false) and {digest} is not in its trusted_code; "
                f'once the code is reviewed, add "{digest}" to trusted_code in site.toml'
            )

    async def _end_job(self, job_id: str) -> None:
        """The job ended: stop its code and remove its model files, of no more use here."""
        self._refused.pop(job_id, None)
        self._deployed.pop(job_id, None)
        self._forget_results(job_id)
        await self._stop_trainer(job_id)
        files = self._files.pop(job_id, None)
        if files is not None:
            files.remove()

    async def _delete_job(self, job_id: str) -> None:
        """Everything of the job this site still keeps (its logs, its code) goes too."""
        await self._end_job(job_id)
        await asyncio.to_thread(shutil.rmtree, self.jobs_dir / job_id, True)

    async def _stop_trainer(self, job_id: str) -> None:
        trainer = self._trainers.pop(job_id, None)
        if trainer is not None:
            await trainer.stop()

    async def _guarded(self, job_id: str, task_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run one step of a task; a failure is reported to the server instead of ending the
        site."""
        try:
            await work
        except Exception as error:  # the job's code may raise anything; the site lives on
            log.warning(
                "task failed",
                extra={
                    "site": self.name,
                    "job": job_id,
                    "task": task_id,
                    "error": _describe(error),
                },
            )
            refused = isinstance(error, TaskRefused)
            failed = TaskFailed(task_id=task_id, error=_describe(error)[:4000], refused=refused)
            await self._report(job_id, failed)

    def _job_of(self, task: Task) -> tuple[Trainer, JobFiles, Manifest]:
        """The task's job as deployed here (its code and files), and its model's manifest, of
        a size this site accepts."""
        if task.job_id not in self._trainers:
            raise JobError(
                self._refused.get(task.job_id, f"job {task.job_id} was not deployed to this site")
            )
        manifest = self._files[task.job_id].manifest_of(task.manifest)
        if manifest.total_bytes > self.config.max_model_gib * 2**30:
            raise JobError(
                f"model of {manifest.total_bytes / 2**30:.1f} GiB exceeds this site's "
                f"max_model_gib = {self.config.max_model_gib:g}"
            )
        return self._trainers[task.job_id], self._files[task.job_id], manifest

    async def _train(self, task: Task) -> None:
        """Receive the global model, have the job's code train a copy of it, then hash it or
        encode the update, and announce the result."""
        trainer, files, manifest = self._job_of(task)
        await self._receive_global(task, files, manifest)
        model = await asyncio.to_thread(files.training_copy)
        output = await trainer.train(self._task_message(task, trainer), model)
        log.info(
            "trained round %d: weight %g, metrics %s",
            task.round,
            output.weight,
            output.metrics,
            extra={"site": self.name, "job": task.job_id, "task": task.task_id},
        )
        source = output.source or model
        if files.transfer.upload == "none":
            trained = await asyncio.to_thread(source.compute_digests)
            self._results[task.task_id] = (task.job_id, trained, source)
            encoding = None
        else:
            encoded = await asyncio.to_thread(self._encode, files, manifest, source, output.delta)
            self._results[task.task_id] = (task.job_id, manifest, encoded)
            index = encoded.index
            encoding = Encoding(
                codec=index.codec, block_elements=index.block_elements, digest=index.digest
            )
        ready = ResultReady(
            task_id=task.task_id,
            weight=output.weight,
            metrics=output.metrics,
            validation=output.validation,
            manifest=self._results[task.task_id][1].to_json(),
            delta=output.delta or encoding is not None,
            encoding=encoding,
        )
        await self._report(task.job_id, ready)

    async def _evaluate(self, task: Task) -> None:
        """Receive a model to evaluate into the scratch file, have the job's code evaluate it,
        and say the metrics."""
        trainer, files, manifest = self._job_of(task)
        model = await asyncio.to_thread(files.evaluated, manifest)
        plan = ChunkPlan(manifest)
        what = f"job {task.job_id} evaluate {task.model_name}"
        track = self.track(what, manifest.total_bytes)
        await self._fetch(
            task.download, ReceiveLedger(plan, task.lanes), FileSink(model, plan), track
        )
        metrics = await trainer.evaluate(self._task_message(task, trainer), model)
        log.info(
            "evaluated %s: %s",
            task.model_name,
            metrics,
            extra={"site": self.name, "job": task.job_id, "task": task.task_id},
        )
        await self._report(task.job_id, Evaluated(task_id=task.task_id, metrics=metrics))

    async def _submit(self, task: Task) -> None:
        """Announce the site's local model for upload, unless the site keeps it to itself."""
        if not self.config.share_local_model:
            raise TaskRefused(f"site {self.name} keeps its local model (share_local_model = false)")
        _, files, manifest = self._job_of(task)
        local = await asyncio.to_thread(files.local_model, manifest)
        self._results[task.task_id] = (task.job_id, local.manifest, local)
        ready = ResultReady(task_id=task.task_id, weight=1.0, manifest=local.manifest.to_json())
        await self._report(task.job_id, ready)

    def _task_message(self, task: Task, trainer: Trainer) -> dict[str, Any]:
        """The task as the job's code gets it."""
        files = self._files[task.job_id]
        return {
            "type": "task",
            "task": task.kind,
            "task_id": task.task_id,
            "job_id": task.job_id,
            "site": self.name,
            "round": task.round,
            "model_name": task.model_name,
            "config": trainer.executor.config,
            "workdir": str(trainer.workdir),
            "settings": self.config.job_settings,
            **({"local_path": str(files.local_path)} if task.keep_local else {}),
        }

    async def _receive_global(self, task: Task, files: JobFiles, manifest: Manifest) -> None:
        """The round's global model into the site's global file: as the encoded delta from the
        model the site holds, if offered one for it, else (or if that fails) whole."""
        offer = task.delta
        track = self.track(f"job {task.job_id} round {task.round} download", manifest.total_bytes)
        if offer is not None and files.held() == offer.base:
            codec = make_codec(offer.encoding.codec, block_elements=offer.encoding.block_elements)
            try:
                await self._fetch_delta(task, files, manifest, codec, track)
                return
            except HaulerError as error:
                log.warning(
                    "the round's delta could not be applied; downloading the whole model",
                    extra={"site": self.name, "job": task.job_id, "error": str(error)},
                )
        model = await asyncio.to_thread(files.global_file, manifest)
        plan = ChunkPlan(manifest)
        await self._fetch(
            task.download, ReceiveLedger(plan, task.lanes), FileSink(model, plan), track
        )
        await asyncio.to_thread(files.mark_received, manifest)

    async def _fetch_delta(
        self, task: Task, files: JobFiles, manifest: Manifest, codec: Codec, track: Progress
    ) -> None:
        assert task.delta is not None
        model = await asyncio.to_thread(files.global_file, manifest)
        plan = ChunkPlan(manifest)
        limit, digest = encoded_limit(codec, plan), task.delta.encoding.digest
        ledger = ReceiveLedger(plan, task.lanes, payload_limit=limit, stream_digest=digest)
        await self._fetch(
            task.delta.transfer, ledger, DeltaSink(model, plan, codec, ledger.lanes), track
        )
        await asyncio.to_thread(files.mark_received, manifest)

    async def _fetch(
        self, transfer: str, ledger: ReceiveLedger, sink: ChunkSink, track: Progress
    ) -> None:
        """Download the server's offer `transfer` into `sink`, as `ledger` allows."""
        await fetch_model(
            self._data_address,
            transfer,
            ledger,
            sink,
            timeouts=self.config.timeouts,
            on_progress=track,
        )

    def _encode(
        self, files: JobFiles, manifest: Manifest, source: ModelFile | ArraySource, delta: bool
    ) -> EncodedFile:
        """The trained model's update, encoded into the job's update file (with error feedback
        through its residual file)."""
        transfer = files.transfer
        codec = make_codec(transfer.upload, block_elements=transfer.block_elements)
        base = None if delta else files.received
        return encode_update(
            ChunkPlan(manifest),
            source,
            base,
            codec,
            files.update_path,
            block_elements=transfer.block_elements,
            residual=files.residual(manifest),
        )

    async def _upload(self, message: UploadReady) -> None:
        """Send a task's trained model or encoded update (the server may ask more than once)."""
        if message.task_id not in self._results:
            raise JobError(f"no result of task {message.task_id} to upload")
        job_id, manifest, source = self._results[message.task_id]
        await push_model(
            self._data_address,
            message.upload,
            ChunkPlan(manifest),
            source,
            message.lanes,
            timeouts=self.config.timeouts,
            on_progress=self.track(f"job {job_id} upload", manifest.total_bytes),
        )

    @property
    def _data_address(self) -> DataAddress:
        return DataAddress(
            self.config.server_host, self.config.data_port, self.config.tls, self.config.dataplane
        )


def _describe(error: Exception) -> str:
    """Hauler's errors speak for themselves; anything else (the job's own code) is named by type."""
    return str(error) if isinstance(error, HaulerError) else f"{type(error).__name__}: {error}"
