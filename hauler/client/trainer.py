"""A site's handle on a job's training code: a thread of the site, or a child process.

Both run `run_executor` against a `TrainerLink` and speak the same small messages.
site -> code: `task` (ids, round, config, where the model is; `task` "evaluate" for a model to
evaluate only) or `end`;
code -> site: `result` (weight, metrics, validation, delta; in-process also the arrays to send),
`evaluated` (an evaluation's metrics) or `failed`, and finally `exited`. The code lives across
rounds; one that ended is started again for the next task, so a script may also handle a single
round and return.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import queue
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hauler.client.api import TRAINER_FD_VARIABLE, QueueChannel, TrainerLink, bound
from hauler.client.executor import run_executor
from hauler.core.config import ExecutorConfig
from hauler.core.errors import JobError
from hauler.model import ArraySource, ModelFile

STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 20
OUTPUT_READ_BYTES = 256 << 10  # trainer.log read for the server at one heartbeat, at most


@dataclass(frozen=True)
class TrainerResult:
    weight: float
    metrics: dict[str, float]
    delta: bool
    source: ArraySource | None  # None: send from the site's model file
    validation: dict[str, float] = field(default_factory=dict)  # the received model's metrics


class Trainer(abc.ABC):
    """Runs a job's training code and hands it one task at a time."""

    def __init__(self, executor: ExecutorConfig, app_dir: Path, job_id: str, workdir: Path) -> None:
        self.executor, self.app_dir, self.job_id, self.workdir = executor, app_dir, job_id, workdir
        self._messages: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
        self._generation = 0
        self._alive = False

    async def train(self, task: dict[str, Any], model: ModelFile) -> TrainerResult:
        """Give the code this round's task and wait for what it sends back."""
        message = await self._answer(task, model)
        return TrainerResult(
            message["weight"],
            message["metrics"],
            message["delta"],
            message.get("source"),
            message.get("validation", {}),
        )

    async def evaluate(self, task: dict[str, Any], model: ModelFile) -> dict[str, float]:
        """Give the code a model to evaluate only, and wait for the metrics it reports."""
        return (await self._answer({**task, "task": "evaluate"}, model))["metrics"]

    async def _answer(self, task: dict[str, Any], model: ModelFile) -> dict[str, Any]:
        """Hand the code `task` and wait for its answer (a result, or an evaluation's metrics)."""
        await self._ensure_started()
        await self._post(self._task_message(task, model))
        while True:
            generation, message = await self._messages.get()
            if generation != self._generation:
                continue  # from an earlier run of the code
            if message["type"] == "exited":
                self._alive = False
                if message["error"]:
                    raise JobError(message["error"])
                if not message["took"]:
                    raise JobError("the training code ended without calling hauler.receive()")
                await self._ensure_started()  # it ended before taking this task: run it again
                await self._post(self._task_message(task, model))
            elif message.get("task_id") != task["task_id"]:
                continue  # a task the server has since aborted
            elif message["type"] == "failed":
                self._alive = False  # the code ends after a failure; the next task starts it again
                raise JobError(message["error"])
            else:
                return message

    async def _ensure_started(self) -> None:
        if not self._alive:
            self._generation += 1
            await self._start(self._generation)
            self._alive = True

    def _deliver(self, generation: int) -> Callable[[dict[str, Any]], None]:
        return lambda message: self._messages.put_nowait((generation, message))

    @abc.abstractmethod
    def _task_message(self, task: dict[str, Any], model: ModelFile) -> dict[str, Any]:
        """The task as the code receives it: where its model is."""

    @abc.abstractmethod
    async def _start(self, generation: int) -> None:
        """Start the code; its messages are delivered tagged with `generation`."""

    @abc.abstractmethod
    async def _post(self, message: dict[str, Any]) -> None:
        """Hand the running code a message."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Tell the code the job has ended and let it finish."""

    def output(self, most: int) -> list[str]:
        """Lines the code printed since the last call, at most `most` (a thread's go to the
        site's own output, so there are none to give)."""
        return []


class ThreadTrainer(Trainer):
    """The code runs in a thread of the site process and sends straight from its own memory."""

    _inbox: queue.Queue[dict[str, Any]]

    def _task_message(self, task: dict[str, Any], model: ModelFile) -> dict[str, Any]:
        return {**task, "model": model}

    async def _start(self, generation: int) -> None:
        loop, deliver = asyncio.get_running_loop(), self._deliver(generation)

        def threadsafe(message: dict[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(deliver, message)
            except RuntimeError:  # the site's loop has closed: nobody is listening any more
                pass

        self._inbox = queue.Queue()
        link = TrainerLink(QueueChannel(self._inbox, threadsafe), in_process=True)
        threading.Thread(
            target=run_trainer,
            args=(self.executor, self.app_dir, self.job_id, link),
            daemon=True,
            name=f"hauler-train-{self.job_id}",
        ).start()

    async def _post(self, message: dict[str, Any]) -> None:
        self._inbox.put(message)

    async def stop(self) -> None:
        if self._alive:
            self._inbox.put({"type": "end"})
            self._alive = False


class ProcessTrainer(Trainer):
    """The code runs as a child process that maps the site's model file; its output goes to
    trainer.log."""

    _process: asyncio.subprocess.Process
    _writer: asyncio.StreamWriter
    _relay: asyncio.Task[None]

    _read_to = 0  # how far trainer.log has been given out by `output`

    @property
    def log_path(self) -> Path:
        return self.workdir / "trainer.log"

    def output(self, most: int) -> list[str]:
        """Whole lines trainer.log got since the last call (a partial last line waits)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._read_to)
                data = log.read(OUTPUT_READ_BYTES)
        except FileNotFoundError:
            return []
        raw = data[: data.rfind(b"\n") + 1].split(b"\n")[:-1][:most]
        self._read_to += sum(len(line) + 1 for line in raw)
        return [line.decode(errors="replace") for line in raw]

    def _task_message(self, task: dict[str, Any], model: ModelFile) -> dict[str, Any]:
        return {**task, "model_path": str(model.path), "manifest": model.manifest.to_json()}

    async def _start(self, generation: int) -> None:
        ours, theirs = socket.socketpair()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log, theirs:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hauler.client.child",
                self.job_id,
                str(self.app_dir),
                self.executor.model_dump_json(),
                cwd=self.workdir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(theirs.fileno(),),
                env={**os.environ, TRAINER_FD_VARIABLE: str(theirs.fileno())},
            )
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._relay = asyncio.create_task(
            self._pass_on(reader, self._process, self._deliver(generation))
        )

    async def _pass_on(
        self,
        reader: asyncio.StreamReader,
        process: asyncio.subprocess.Process,
        deliver: Callable[[dict[str, Any]], None],
    ) -> None:
        """Pass the child's messages on; when it goes, say how it ended (the child says, or its exit
        code)."""
        exited = False
        while line := await reader.readline():
            message = json.loads(line)
            exited = exited or message["type"] == "exited"
            deliver(message)
        code = await process.wait()
        if not exited:
            deliver(
                {
                    "type": "exited",
                    "took": 0,
                    "error": f"the training process exited with code {code}; "
                    f"its output ends with:\n{self._log_tail()}",
                }
            )

    def _log_tail(self) -> str:
        try:
            return "\n".join(
                self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            )
        except FileNotFoundError:
            return "(no output)"

    async def _post(self, message: dict[str, Any]) -> None:
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()

    async def stop(self) -> None:
        if not self._alive:
            return
        self._alive = False
        self._writer.close()  # EOF: the child's hauler.is_running() returns False
        try:
            await asyncio.wait_for(self._process.wait(), STOP_GRACE_S)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()


def trainer_for(executor: ExecutorConfig, app_dir: Path, job_id: str, workdir: Path) -> Trainer:
    kind = ProcessTrainer if executor.mode == "subprocess" else ThreadTrainer
    return kind(executor, app_dir, job_id, workdir)


def run_trainer(
    executor: ExecutorConfig,
    app_dir: Path,
    job_id: str,
    link: TrainerLink,
    *,
    process_wide: bool = False,
) -> bool:
    """Run the code until it returns; a failure fails the current task. Ends with an `exited`
    message."""
    error = ""
    with bound(link, process_wide=process_wide):
        try:
            run_executor(executor, app_dir, job_id, link)
        except BaseException as failure:  # the job's code may raise anything, SystemExit included
            if not (isinstance(failure, SystemExit) and failure.code in (0, None)):
                error = _describe(failure)
        if not error and link.pending_round is not None:
            owed = "hauler.evaluate()" if link.evaluating else "hauler.send()"
            error = (
                f"the training code returned in round {link.pending_round} without calling {owed}"
            )
        if error:
            link.fail(error)
        link.channel.put({"type": "exited", "error": error, "took": link.tasks_taken})
    return not error


def _describe(error: BaseException) -> str:
    """The error and where in the job's code it was raised (the last frames)."""
    frames = traceback.format_exception(error, limit=-4)
    return f"{type(error).__name__}: {error}\n" + "".join(frames[1:-1]).rstrip()
