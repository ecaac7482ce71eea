"""The site process: dial the server, keep the session alive, run the tasks it offers.

A task is: receive the global model into the site's model file (pre-sized once,
overwritten in place every round), train on it in place, hash it, announce the
result, then upload from the same file. The model never has to fit in memory.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Coroutine
from typing import Any

from hauler.client.trainer import Trainer, trainer_for
from hauler.core.config import ExecutorConfig, SiteConfig, parse
from hauler.core.errors import ConnectionLost, HaulerError, JobError, SecurityError
from hauler.core.messages import (
    AbortTask,
    DeployJob,
    EndJob,
    MAX_HEARTBEAT_SAMPLES,
    Heartbeat,
    Hello,
    ResultReady,
    Task,
    TaskFailed,
    UploadReady,
    Welcome,
    dump,
    parse_server_message,
)
from hauler.core.package import unpack
from hauler.core.resources import ProcessMeter
from hauler.core.retry import backoff_s
from hauler.model import ArraySource, ChunkPlan, Manifest, ModelFile
from hauler.transfer import ReceiveLedger
from hauler.transport import (
    ControlChannel,
    DataAddress,
    MessageStream,
    fetch_model,
    push_model,
)

log = logging.getLogger("hauler.client")
MAX_PACKAGE_BYTES = 64 << 20

TrackTransfer = Callable[[str, int], Callable[[int], None]]  # (what, total bytes) -> called with bytes moved


def untracked(what: str, total: int) -> Callable[[int], None]:
    return lambda nbytes: None


class Site:
    def __init__(self, config: SiteConfig, *, track: TrackTransfer = untracked) -> None:
        """`track` is told about every download and upload, e.g. to draw progress bars."""
        self.config = config
        self.track = track
        self.name = config.name
        self.jobs_dir = config.workspace / "jobs"
        self._trainers: dict[str, Trainer] = {}
        self._refused: dict[str, str] = {}  # job id -> why this site will not run it
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._models: dict[str, ModelFile] = {}
        self._results: dict[str, tuple[str, Manifest, ModelFile | ArraySource]] = {}  # task id -> (job, what, where)
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Stay connected to the server, reconnecting with backoff, until cancelled."""
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0
            except SecurityError:
                raise
            except HaulerError as error:
                failures += 1
                log.warning("session ended", extra={"site": self.name, "error": str(error)})
            self.connected.clear()
            await asyncio.sleep(backoff_s(max(failures, 1), self.config.dataplane))

    async def _session(self) -> None:
        channel = ControlChannel(self.config.server_host, self.config.control_port, self.config.tls)
        stream = channel.session()
        try:
            await stream.send(dump(Hello(site=self.name)))
            welcome = parse_server_message(await stream.receive() or {})
            if not isinstance(welcome, Welcome):
                raise ConnectionLost("server did not welcome this site")
            self.connected.set()
            log.info("connected", extra={"site": self.name, "server": channel.target})
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeats(stream))
                await self._dispatch(stream, group)
                raise ConnectionLost("server closed the session")
        except* HaulerError as errors:
            raise errors.exceptions[0] from None
        finally:
            for task in self._tasks.values():
                task.cancel()
            stream.cancel()
            await channel.close()

    async def _heartbeats(self, stream: MessageStream) -> None:
        meter = ProcessMeter(children=True)  # the site and its training children, every second, sent with heartbeats
        while True:
            samples = await meter.collect(self.config.timeouts.heartbeat_interval)
            await stream.send(dump(Heartbeat(resources=samples[-MAX_HEARTBEAT_SAMPLES:])))

    async def _dispatch(self, stream: MessageStream, group: asyncio.TaskGroup) -> None:
        while (raw := await stream.receive()) is not None:
            message = parse_server_message(raw)
            if isinstance(message, DeployJob):
                await self._stop_trainer(message.job_id)
                try:
                    await asyncio.to_thread(self._deploy, message)
                except HaulerError as error:  # reported with the job's first task
                    self._refused[message.job_id] = str(error)
            elif isinstance(message, Task):
                self._forget_results(message.job_id)
                self._start(group, message.task_id, self._guarded(stream, message.task_id, self._train(stream, message)))
            elif isinstance(message, UploadReady):
                self._start(group, message.task_id, self._guarded(stream, message.task_id, self._upload(message)))
            elif isinstance(message, AbortTask):
                if message.task_id in self._tasks:
                    self._tasks[message.task_id].cancel()
            elif isinstance(message, EndJob):
                group.create_task(self._end_job(message.job_id))

    def _start(self, group: asyncio.TaskGroup, task_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = group.create_task(work)
        self._tasks[task_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(task_id, None))

    def _forget_results(self, job_id: str) -> None:
        for task_id in [t for t, (job, *_) in self._results.items() if job == job_id]:
            del self._results[task_id]

    def _deploy(self, message: DeployJob) -> None:
        executor = parse(ExecutorConfig, message.executor, f"job {message.job_id} [executor]")
        workdir = self.jobs_dir / message.job_id
        app_dir = workdir / "app"
        shutil.rmtree(app_dir, ignore_errors=True)
        unpack(message.package_b64, app_dir, MAX_PACKAGE_BYTES)
        if not self.config.allow_custom_code and any(app_dir.rglob("*.py")):
            shutil.rmtree(app_dir, ignore_errors=True)
            raise JobError(f"site {self.name} refuses jobs that carry custom code (allow_custom_code = false)")
        self._refused.pop(message.job_id, None)
        self._trainers[message.job_id] = trainer_for(executor, app_dir, message.job_id, workdir)

    async def _end_job(self, job_id: str) -> None:
        self._refused.pop(job_id, None)
        self._forget_results(job_id)
        await self._stop_trainer(job_id)
        model = self._models.pop(job_id, None)
        if model is not None:
            model.close()

    async def _stop_trainer(self, job_id: str) -> None:
        trainer = self._trainers.pop(job_id, None)
        if trainer is not None:
            await trainer.stop()

    async def _guarded(self, stream: MessageStream, task_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run one step of a task; a failure is reported to the server instead of ending the session."""
        try:
            await work
        except Exception as error:  # the job's code may raise anything; the site lives on
            log.warning("task failed", extra={"site": self.name, "task": task_id, "error": _describe(error)})
            await stream.send(dump(TaskFailed(task_id=task_id, error=_describe(error)[:4000])))

    async def _train(self, stream: MessageStream, task: Task) -> None:
        """Receive the global model into the site's file, have the job's code train it, hash, announce."""
        if task.job_id not in self._trainers:
            raise JobError(self._refused.get(task.job_id, f"job {task.job_id} was not deployed to this site"))
        trainer = self._trainers[task.job_id]
        manifest = Manifest.from_json(task.manifest)
        if manifest.total_bytes > self.config.max_model_gib * 2**30:
            raise JobError(f"model of {manifest.total_bytes / 2**30:.1f} GiB exceeds this site's "
                           f"max_model_gib = {self.config.max_model_gib:g}")
        model = await asyncio.to_thread(self._model_file, task.job_id, manifest)
        await fetch_model(self._data_address, task.download, ReceiveLedger(ChunkPlan(manifest), task.lanes), model,
                          timeouts=self.config.timeouts,
                          on_progress=self.track(f"job {task.job_id} round {task.round} download",
                                                 manifest.total_bytes))
        output = await trainer.train({"type": "task", "task_id": task.task_id, "job_id": task.job_id,
                                      "site": self.name, "round": task.round, "config": trainer.executor.config,
                                      "workdir": str(trainer.workdir)}, model)
        source = output.source or model
        trained = await asyncio.to_thread(source.compute_digests)
        self._results[task.task_id] = (task.job_id, trained, source)
        await stream.send(dump(ResultReady(task_id=task.task_id, weight=output.weight, metrics=output.metrics,
                                           manifest=trained.to_json(), delta=output.delta)))

    async def _upload(self, message: UploadReady) -> None:
        """Send a task's trained model from the site's file (the server may ask more than once)."""
        if message.task_id not in self._results:
            raise JobError(f"no result of task {message.task_id} to upload")
        job_id, manifest, source = self._results[message.task_id]
        await push_model(self._data_address, message.upload, manifest, source, message.lanes,
                         timeouts=self.config.timeouts,
                         on_progress=self.track(f"job {job_id} upload", manifest.total_bytes))

    @property
    def _data_address(self) -> DataAddress:
        return DataAddress(self.config.server_host, self.config.data_port, self.config.tls, self.config.dataplane)

    def _model_file(self, job_id: str, manifest: Manifest) -> ModelFile:
        """The site's one model file for a job, re-created only if the layout changes."""
        model = self._models.get(job_id)
        if model is not None and model.manifest.same_layout(manifest):
            model.manifest = manifest
            return model
        if model is not None:
            model.close()
        model = ModelFile.create(self.jobs_dir / job_id / "model.safetensors", manifest)
        self._models[job_id] = model
        return model


def _describe(error: Exception) -> str:
    """Hauler's errors speak for themselves; anything else (the job's own code) is named by type."""
    return str(error) if isinstance(error, HaulerError) else f"{type(error).__name__}: {error}"
