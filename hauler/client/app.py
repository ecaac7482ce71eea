"""The site process: dial the server, keep the session alive, run the tasks it offers.

A task is: receive the global model into the site's model file (pre-sized once,
overwritten in place every round), train on it in place, hash it, announce the
result, then upload from the same file. The model never has to fit in memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
from pathlib import Path
from types import ModuleType

from hauler.client.executor import TrainContext, run_train
from hauler.core.config import SiteConfig
from hauler.core.errors import ConnectionLost, HaulerError, SecurityError
from hauler.core.messages import (
    AbortTask, DeployJob, EndJob, Heartbeat, Hello, ResultReady, Task, TaskFailed, UploadReady, Welcome,
    dump, parse_server_message,
)
from hauler.core.package import load_job_module, unpack
from hauler.core.timeouts import SilenceTimer
from hauler.model import Manifest, ModelFile
from hauler.transfer import ChunkPlan, ReceiveLedger
from hauler.transport import ControlChannel, MessageStream, open_transfer, receive_model, send_model

log = logging.getLogger("hauler.client")
MAX_PACKAGE_BYTES = 64 << 20
RECONNECT_MAX_S = 30.0


class Site:
    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.name = config.name
        self.jobs_dir = config.workspace / "jobs"
        self._executors: dict[str, tuple[ModuleType, dict]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._upload_ready: dict[str, asyncio.Event] = {}
        self._models: dict[str, ModelFile] = {}
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
            await asyncio.sleep(min(RECONNECT_MAX_S, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0))

    async def _session(self) -> None:
        channel = ControlChannel(self.config.server_host, self.config.control_port)
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
        while True:
            await asyncio.sleep(self.config.timeouts.heartbeat_interval)
            await stream.send(dump(Heartbeat()))

    async def _dispatch(self, stream: MessageStream, group: asyncio.TaskGroup) -> None:
        while (raw := await stream.receive()) is not None:
            message = parse_server_message(raw)
            if isinstance(message, DeployJob):
                await asyncio.to_thread(self._deploy, message)
            elif isinstance(message, Task):
                self._upload_ready[message.task_id] = asyncio.Event()
                task = group.create_task(self._run_task(stream, message))
                self._tasks[message.task_id] = task
                task.add_done_callback(lambda _, task_id=message.task_id: self._task_done(task_id))
            elif isinstance(message, UploadReady):
                if message.task_id in self._upload_ready:
                    self._upload_ready[message.task_id].set()
            elif isinstance(message, AbortTask):
                if message.task_id in self._tasks:
                    self._tasks[message.task_id].cancel()
            elif isinstance(message, EndJob):
                self._end_job(message.job_id)

    def _task_done(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)
        self._upload_ready.pop(task_id, None)

    def _deploy(self, message: DeployJob) -> None:
        app_dir = self.jobs_dir / message.job_id / "app"
        shutil.rmtree(app_dir, ignore_errors=True)
        unpack(message.package_b64, app_dir, MAX_PACKAGE_BYTES)
        module = load_job_module(app_dir, message.job_id, message.executor_module)
        self._executors[message.job_id] = (module, message.executor_config)

    def _end_job(self, job_id: str) -> None:
        self._executors.pop(job_id, None)
        model = self._models.pop(job_id, None)
        if model is not None:
            model.close()

    async def _run_task(self, stream: MessageStream, task: Task) -> None:
        try:
            await self._train_and_upload(stream, task)
        except HaulerError as error:
            log.warning("task failed", extra={"site": self.name, "task": task.task_id, "error": str(error)})
            await stream.send(dump(TaskFailed(task_id=task.task_id, error=str(error)[:4000])))

    async def _train_and_upload(self, stream: MessageStream, task: Task) -> None:
        if task.job_id not in self._executors:
            raise HaulerError(f"job {task.job_id} was not deployed to this site")
        module, config = self._executors[task.job_id]
        manifest = Manifest.from_json(task.manifest)
        model = await asyncio.to_thread(self._model_file, task.job_id, manifest)
        timeouts, host, port = self.config.timeouts, self.config.server_host, self.config.data_port

        connection = await open_transfer(host, port, task.download)
        try:
            await receive_model(connection, ReceiveLedger(ChunkPlan(manifest)), model, timeouts=timeouts)
        finally:
            connection.close()
        started = time.perf_counter()
        context = TrainContext(self.name, task.job_id, task.round, config, self.jobs_dir / task.job_id)
        output = await asyncio.to_thread(run_train, module, model.arrays(), context)
        result_manifest = await asyncio.to_thread(model.compute_digests)
        train_s = time.perf_counter() - started

        await stream.send(dump(ResultReady(task_id=task.task_id, weight=output.weight, metrics=output.metrics,
                                           manifest=result_manifest.to_json(), train_s=train_s)))
        async with SilenceTimer(timeouts.communication_timeout, "communication_timeout", "waiting for the server"):
            await self._upload_ready[task.task_id].wait()
        connection = await open_transfer(host, port, task.upload)
        try:
            await send_model(connection, result_manifest, model, window_chunks=self.config.dataplane.window_chunks,
                             timeouts=timeouts)
        finally:
            connection.close()

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
