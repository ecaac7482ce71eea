"""The API a training script calls: `hauler.is_running()`, `receive()`, `send()`,
`evaluate()`, `context()`.

    import hauler
    while hauler.is_running():
        model = hauler.receive("torch")            # the global model, viewing the site's file
        net.load_state_dict(model)
        hauler.evaluate({"accuracy": accuracy(net)})  # optional: the received model's metrics
        if hauler.context().task == "evaluate":    # cross-site evaluation: that was the answer
            continue
        n = train(net)
        hauler.send(net.state_dict(), weight=n, metrics={"loss": loss})

The site runs the script in a thread of its own process or as a child process; either way
the script talks to the site through a `TrainerLink` carrying only small messages. The model
stays in the site's memory-mapped model file: a child process maps the same file. Sent
in-process, a model is streamed straight from the script's own tensor memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import socket
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from hauler.client.executor import TrainContext
from hauler.client.tensors import layout_of as layout_of  # re-exported: hauler.layout_of
from hauler.client.tensors import to_numpy, to_torch
from hauler.core.errors import JobError
from hauler.core.messages import MAX_METRIC_NAME, MAX_METRICS
from hauler.model import ArraySource, Manifest, ModelFile, check_layout, is_float

TRAINER_FD_VARIABLE = (
    "HAULER_TRAINER_FD"  # set by the site for a training script run as a child process
)
BLOCK_ELEMENTS = 1 << 20


class Channel(Protocol):
    """Small messages between a site and its training code."""

    def get(self) -> dict[str, Any]: ...
    def put(self, message: dict[str, Any]) -> None: ...


class QueueChannel:
    """In-process: the site puts tasks in `inbox`; `deliver` hands messages back to its event
    loop."""

    def __init__(
        self, inbox: queue.Queue[dict[str, Any]], deliver: Callable[[dict[str, Any]], None]
    ) -> None:
        self.inbox, self.deliver = inbox, deliver

    def get(self) -> dict[str, Any]:
        return self.inbox.get()

    def put(self, message: dict[str, Any]) -> None:
        self.deliver(message)


class SocketChannel:
    """Child process: JSON lines on a socket inherited from the site; EOF means the job ended."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lines = sock.makefile("rb")  # reads buffered; writes go out whole, unbuffered

    def get(self) -> dict[str, Any]:
        line = self._lines.readline()
        return json.loads(line) if line else {"type": "end"}

    def put(self, message: dict[str, Any]) -> None:
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            if message.get("type") != "exited":
                raise JobError("the site this training code reports to is gone") from None
            # the site closed its end once the job ended: nobody is left to tell we exited


class TrainerLink:
    """The training code's end: one task at a time, received, trained, sent."""

    def __init__(self, channel: Channel, *, in_process: bool) -> None:
        self.channel, self.in_process = channel, in_process
        self._task: dict[str, Any] | None = None
        self._model: ModelFile | None = None
        self._validation: dict[str, float] = {}
        self._ended = False
        self.tasks_taken = 0

    @property
    def pending_round(self) -> int | None:
        """The round received but not yet sent, if any."""
        return None if self._task is None else int(self._task["round"])

    @property
    def evaluating(self) -> bool:
        """Whether the current task only evaluates its model (cross-site evaluation)."""
        return self._task is not None and self._task.get("task") == "evaluate"

    def is_running(self) -> bool:
        """Wait for the next task: True when one came, False once the job has ended."""
        if self._task is None and not self._ended:
            message = self.channel.get()
            if message["type"] == "end":
                self._ended = True
            else:
                self._task, self._model = message, self._open(message)
                self._validation = {}
                self.tasks_taken += 1
        return self._task is not None

    def receive(self, framework: Literal["numpy", "torch"] = "numpy") -> dict[str, Any]:
        """This round's global model as numpy arrays or torch tensors viewing the site's model
        file."""
        if not self.is_running():
            raise JobError("the job has ended: loop on hauler.is_running() before hauler.receive()")
        assert self._model is not None
        arrays = self._model.arrays()
        return to_torch(arrays) if framework == "torch" else arrays

    def context(self) -> TrainContext:
        """Who and where this round is: site, job, round number, the job's executor config, a work
        folder."""
        if not self.is_running():
            raise JobError("the job has ended; there is no current round")
        task = self._task
        assert task is not None
        return TrainContext(
            task["site"],
            task["job_id"],
            task["round"],
            task["config"],
            Path(task["workdir"]),
            task.get("settings", {}),
            task.get("task", "train"),
            task.get("model_name", ""),
        )

    def send(
        self,
        model: Mapping[str, Any],
        *,
        weight: float = 1.0,
        metrics: Mapping[str, float] | None = None,
        delta: bool = False,
    ) -> None:
        """Hand the trained model to the site; `delta=True` sends it minus the received global
        model."""
        if self._task is None or self._model is None:
            raise JobError("hauler.send() needs a model from hauler.receive() first")
        if self.evaluating:
            raise JobError(
                "this task evaluates a model (cross-site evaluation): report its metrics with "
                "hauler.evaluate(metrics) instead of sending a model"
            )
        if not weight > 0:
            raise JobError(f"weight must be positive, got {weight}")
        arrays = to_numpy(model)
        check_layout(self._model.manifest, arrays)
        reported = _numbers(metrics or {})
        self._keep_local(arrays)
        source = self._place(arrays, delta)
        self.channel.put(
            {
                "type": "result",
                "task_id": self._task["task_id"],
                "weight": float(weight),
                "metrics": reported,
                "validation": self._validation,
                "delta": delta,
                "source": source,
            }
        )
        self._task = None

    def evaluate(self, metrics: Mapping[str, float]) -> None:
        """Report metrics of the model received: in a training round, the global model's (sent
        with the round's result); in an evaluation task, the task's answer."""
        if self._task is None:
            raise JobError("hauler.evaluate() needs a model from hauler.receive() first")
        reported = _numbers(metrics)
        if not self.evaluating:
            self._validation = reported
            return
        self.channel.put(
            {"type": "evaluated", "task_id": self._task["task_id"], "metrics": reported}
        )
        self._task = None

    def fail(self, error: str) -> None:
        """Tell the site that the current task failed (the training code raised)."""
        if self._task is not None:
            self.channel.put({"type": "failed", "task_id": self._task["task_id"], "error": error})
            self._task = None

    def _keep_local(self, arrays: dict[str, np.ndarray]) -> None:
        """Write the model sent into the task's `local_path`, if it has one: the site's local
        model for cross-site evaluation (before a delta takes its place in the model file)."""
        assert self._task is not None and self._model is not None
        if not self._task.get("local_path"):
            return
        local = ModelFile.create(Path(self._task["local_path"]), self._model.manifest)
        try:
            for index, tensor in enumerate(local.manifest.tensors):
                np.copyto(local.array(index), arrays[tensor.name])
            local.flush()
        finally:
            local.close()

    def _place(self, arrays: dict[str, np.ndarray], delta: bool) -> ArraySource | None:
        """Where the site sends from: the arrays themselves (in-process), else the model file.
        With `delta`, float tensors become the update (sent minus received, in the file) and
        the others are sent as they are; tied names are their tensor's."""
        assert self._model is not None
        manifest = self._model.manifest
        views = self._model.arrays()
        if not delta and all(arrays[t.name] is views[t.name] for t in manifest.tensors):
            return None  # trained in place in the file (as a module's train() does)
        if self.in_process and not delta:
            return ArraySource(manifest, arrays)
        stored = [(t.name, is_float(t.dtype)) for t in manifest.tensors]
        if delta:
            for name, floating in stored:  # every check before the first write: all or nothing
                if floating:
                    _check_delta(name, arrays[name], views[name])
        for name, floating in stored:
            if delta and floating:
                _subtract_into(arrays[name], views[name])
            elif not np.shares_memory(arrays[name], views[name]):
                np.copyto(views[name], arrays[name])
        return None

    def _open(self, task: dict[str, Any]) -> ModelFile:
        model = task.get("model")
        if isinstance(model, ModelFile):
            return model
        if self._model is not None:  # a child process maps the site's file anew each round
            self._model.close()
        manifest = Manifest.from_json(task["manifest"])
        return ModelFile.open(
            Path(task["model_path"]), writable=True, chunk_bytes=manifest.chunk_bytes
        )


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as plain finite floats (numpy and torch scalars included), as many and as named
    as the server takes; anything else is refused by name."""
    if not isinstance(metrics, Mapping):
        raise JobError(f"metrics must be a dict of names to numbers, not {type(metrics).__name__}")
    try:
        numbers = {str(name): float(value) for name, value in metrics.items()}
    except (TypeError, ValueError) as error:
        raise JobError(f"metrics must be numbers: {error}") from None
    wrong = [f"{name} = {value}" for name, value in numbers.items() if not math.isfinite(value)]
    wrong += [
        f"name {name[:40]!r}... is too long" for name in numbers if len(name) > MAX_METRIC_NAME
    ]
    if wrong or len(numbers) > MAX_METRICS:
        raise JobError(
            f"metrics must be at most {MAX_METRICS} finite numbers named in at most "
            f"{MAX_METRIC_NAME} characters: {', '.join(wrong) or f'{len(numbers)} given'}"
        )
    return numbers


def _check_delta(name: str, array: np.ndarray, received: np.ndarray) -> None:
    if np.shares_memory(array, received):
        raise JobError(
            f"delta=True: {name!r} was trained in place in the received model, so the received "
            "values are gone; train on a copy (e.g. load_state_dict) or send the full model"
        )


def _subtract_into(array: np.ndarray, received: np.ndarray) -> None:
    """received <- array - received, in blocks, in the model file: the delta needs no new memory."""
    flat, out = array.reshape(-1), received.reshape(-1)
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        np.subtract(
            flat[start : start + BLOCK_ELEMENTS],
            out[start : start + BLOCK_ELEMENTS],
            out=out[start : start + BLOCK_ELEMENTS],
        )


_current: ContextVar[TrainerLink | None] = ContextVar("hauler_trainer_link", default=None)
_process_wide: list[TrainerLink] = []  # a child process's one link, seen from any of its threads


@contextlib.contextmanager
def bound(link: TrainerLink, *, process_wide: bool = False) -> Iterator[TrainerLink]:
    """Make `link` the one the module-level functions use: in this context, or in the whole
    process."""
    token = _current.set(link)
    if process_wide:
        _process_wide.append(link)
    try:
        yield link
    finally:
        _current.reset(token)
        if process_wide:
            _process_wide.remove(link)


def current_link() -> TrainerLink:
    """The link of the training code running here, bound by the site that runs it."""
    link = _current.get() or (_process_wide[0] if _process_wide else None)
    if link is None:
        raise JobError(
            "no Hauler site is running this code: make it a job's [executor] script and "
            "submit the job"
        )
    return link


def is_running() -> bool:
    """Wait for the next round: True when it came, False once the job has ended."""
    return current_link().is_running()


def receive(framework: Literal["numpy", "torch"] = "numpy") -> dict[str, Any]:
    """The global model of this round, as numpy arrays or torch tensors viewing the site's model
    file."""
    return current_link().receive(framework)


def send(
    model: Mapping[str, Any],
    *,
    weight: float = 1.0,
    metrics: Mapping[str, float] | None = None,
    delta: bool = False,
) -> None:
    """Return the trained model (numpy arrays or torch tensors), weighted for FedAvg, with
    metrics."""
    current_link().send(model, weight=weight, metrics=metrics, delta=delta)


def evaluate(metrics: Mapping[str, float]) -> None:
    """Report metrics of the model just received: before training, the global model's (shown
    per round and site); in a cross-site evaluation task, its answer (nothing is sent)."""
    current_link().evaluate(metrics)


def context() -> TrainContext:
    """Site, job id, round, the job's executor config, a work folder, and the task: "train", or
    "evaluate" with the name of the model evaluated ("global", or the site whose model it is)."""
    return current_link().context()
