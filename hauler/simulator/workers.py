"""The simulator's workers: W slots, each one model file and one running copy of the job's
training code, that the N virtual sites take turns on. A virtual site holds no memory of its own:
the global model exists once, and a model per worker, however many sites there are.

The code runs as it does on a real site (`client/trainer.py`, in a thread or a child process,
talking through the client API), and stays up across tasks, so a worker serves site-3 in one
task and site-12 in the next: scripts read `hauler.context()` every round to know whose turn it
is.

Every worker, in this process (`LocalWorker`) or a Ray actor (`hauler.simulator.ray`), offers the
same four steps to the federation, which never asks which kind it has (`Worker`):
`receive` the round's global model, `train` one site's task, `send_update` chunk by chunk into
the fold, `close`. A worker screens its own update after training (`screen_update`: every value
finite, and its squared norm), where the update is at hand, and reports the figures; the
federation checks them (`check_screen`) before a byte is folded, so a refused site is dropped
with nothing folded, whichever machine its worker is on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hauler.aggregate import UploadBuffers
from hauler.aggregate.screening import FiniteCheck, UpdateNorms, squares
from hauler.client.trainer import Trainer, TrainerResult, trainer_for
from hauler.core.config import DataPlane, ExecutorConfig, Timeouts
from hauler.core.errors import HaulerError, LocalProtocolError, UpdateRefused
from hauler.model import (
    ArraySource,
    Chunk,
    ChunkPlan,
    Manifest,
    ModelFile,
    accumulator_dtype,
    numpy_dtype,
)
from hauler.transfer import ReceiveLedger, SendSchedule
from hauler.transport import connection_pair, receive_model, send_model

ChunkSource = ModelFile | ArraySource
SCREEN_BLOCK_ELEMENTS = (
    1 << 20
)  # screened in blocks with one reused scratch: no model-sized temporaries


@dataclass(frozen=True)
class UpdateScreen:
    """What a worker found in its update: why it must be refused ("" if nothing), and its squared
    norm (the update minus the global model, or the delta itself), None if not measured."""

    refusal: str
    update_squares: float | None


@dataclass(frozen=True)
class Update:
    """A site's trained model, still on its worker: what it says and how it screened."""

    weight: float
    metrics: dict[str, float]
    delta: bool
    manifest: Manifest  # with the digests `send_update` is checked against
    screen: UpdateScreen


class Worker(Protocol):
    """One slot the virtual sites take turns on, wherever it runs. `buffers` is this process's
    chunk buffer for the update being sent (set by `receive`), which the fold reads from."""

    index: int
    buffers: UploadBuffers | None

    async def receive(self, served: ModelFile) -> None:
        """Make the worker's model the round's global model `served`."""

    async def train(self, task: dict[str, Any], *, measure_norm: bool) -> Update:
        """Run the job's code on the received model for one site's task, then screen its update."""

    async def send_update(self, on_chunk: Callable[[Chunk], None]) -> None:
        """Land the update chunk by chunk in `buffers`, each checked, calling `on_chunk` for
        each."""

    async def close(self) -> None:
        """Stop the training code and release the worker's model."""


class LocalWorker:
    """A worker in this process: its model file, its training code (a thread or a child
    process), and the in-process transport both ways."""

    def __init__(
        self,
        index: int,
        folder: Path,
        trainer: Trainer,
        *,
        sites_dir: Path,
        dataplane: DataPlane,
        timeouts: Timeouts,
    ) -> None:
        self.index, self.folder, self.trainer, self.sites_dir = index, folder, trainer, sites_dir
        self.dataplane, self.timeouts = dataplane, timeouts
        self.buffers: UploadBuffers | None = None
        self._model: ModelFile | None = None
        self._base: ModelFile | None = None
        self._sending: tuple[Manifest, ChunkSource] | None = None

    async def receive(self, served: ModelFile) -> None:
        self._model = model_file_for(
            self._model, self.folder / "model.safetensors", served.manifest
        )
        self.buffers = buffers_for(self.buffers, served.manifest)
        await move(
            served.manifest, served, self._model, dataplane=self.dataplane, timeouts=self.timeouts
        )
        self._base = served

    async def train(self, task: dict[str, Any], *, measure_norm: bool) -> Update:
        if self._model is None or self._base is None:
            raise LocalProtocolError("train() before receive()")
        workdir = self.sites_dir / task["site"]
        workdir.mkdir(parents=True, exist_ok=True)
        output = await self.trainer.train({**task, "workdir": str(workdir)}, self._model)
        update, source = await finish_training(
            output, self._model, self._base, measure_norm=measure_norm
        )
        self._sending = (update.manifest, source)
        return update

    async def send_update(self, on_chunk: Callable[[Chunk], None]) -> None:
        if self._sending is None or self.buffers is None:
            raise LocalProtocolError("send_update() before train()")
        manifest, source = self._sending
        await move(
            manifest,
            source,
            self.buffers,
            dataplane=self.dataplane,
            timeouts=self.timeouts,
            on_chunk=on_chunk,
        )

    async def close(self) -> None:
        await self.trainer.stop()
        self._sending = self._base = None
        if self._model is not None:
            self._model.close()


class WorkerPool:
    """W workers; `async with pool.worker() as worker:` waits for a free one. `on_close` runs
    after every worker has closed (a Ray pool disconnects from its cluster there)."""

    def __init__(
        self, workers: Sequence[Worker], on_close: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.workers = list(workers)
        self._on_close = on_close
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        for worker in self.workers:
            self._idle.put_nowait(worker)

    @classmethod
    def local(
        cls,
        count: int,
        executor: ExecutorConfig,
        app_dir: Path,
        job_id: str,
        job_dir: Path,
        *,
        dataplane: DataPlane,
        timeouts: Timeouts,
    ) -> WorkerPool:
        """`count` workers in this process, each in `job_dir/workers/worker-<k>`."""
        workers = []
        for index in range(count):
            workdir = job_dir / "workers" / f"worker-{index + 1}"
            workdir.mkdir(parents=True, exist_ok=True)
            workers.append(
                LocalWorker(
                    index,
                    workdir,
                    trainer_for(executor, app_dir, job_id, workdir),
                    sites_dir=job_dir / "sites",
                    dataplane=dataplane,
                    timeouts=timeouts,
                )
            )
        return cls(workers)

    @contextlib.asynccontextmanager
    async def worker(self) -> AsyncIterator[Worker]:
        worker = await self._idle.get()
        try:
            yield worker
        finally:
            self._idle.put_nowait(worker)

    async def close(self) -> None:
        """Close every worker, even past one that fails to, then run `on_close`; raises the first
        failure."""
        failures = []
        for worker in self.workers:
            try:
                await worker.close()
            except Exception as failure:  # the others still hold training code and files
                failures.append(failure)
        if self._on_close is not None:
            await self._on_close()
        if failures:
            raise failures[0]


def model_file_for(model: ModelFile | None, path: Path, manifest: Manifest) -> ModelFile:
    """A worker's model file for `manifest`: made on first use, re-made only if the layout
    changes."""
    if model is None or not model.manifest.same_layout(manifest):
        if model is not None:
            model.close()
        model = ModelFile.create(path, manifest)
    model.manifest = manifest
    return model


def buffers_for(buffers: UploadBuffers | None, manifest: Manifest) -> UploadBuffers:
    """One chunk buffer, made on first use and kept all job long: every round of a job has the
    same layout and chunk size (the aggregate refuses another)."""
    return buffers if buffers is not None else UploadBuffers(manifest.chunk_bytes, 1)


async def finish_training(
    output: TrainerResult, model: ModelFile, base: ChunkSource, *, measure_norm: bool
) -> tuple[Update, ChunkSource]:
    """What a worker does once the code has sent: digest the update where it lies (the code's
    arrays, or the worker's file) and screen it against the global model `base`."""
    source: ChunkSource = output.source or model
    manifest = await asyncio.to_thread(source.compute_digests)
    screen = await asyncio.to_thread(
        screen_update, manifest, source, None if output.delta else base, measure_norm=measure_norm
    )
    return Update(output.weight, output.metrics, output.delta, manifest, screen), source


def screen_update(
    manifest: Manifest, update: ChunkSource, base: ChunkSource | None, *, measure_norm: bool
) -> UpdateScreen:
    """Screen a whole update in one pass, with the aggregator's own checks (`aggregate.screening`):
    every float value finite, and, if `measure_norm`, the sum of squares of `update - base` (of
    `update` itself when `base` is None: a delta, or the global model's own norm), in the dtype the
    fold accumulates in."""
    finite, total = FiniteCheck(SCREEN_BLOCK_ELEMENTS), 0.0
    for chunk in manifest.chunks():
        tensor = manifest.tensors[chunk.tensor]
        if not (numpy_dtype(tensor.dtype).kind == "f" or tensor.dtype == "BF16"):
            continue  # integers and flags are neither screened nor counted, as in the fold
        dtype = numpy_dtype(tensor.dtype)
        values = np.frombuffer(update.chunk_bytes(chunk.tensor, chunk.offset, chunk.length), dtype)
        try:
            finite.check_folded(values, manifest, chunk)
        except UpdateRefused as refusal:
            return UpdateScreen(str(refusal), None)
        if measure_norm:
            reference = (
                None
                if base is None
                else np.frombuffer(
                    base.chunk_bytes(chunk.tensor, chunk.offset, chunk.length), dtype
                )
            )
            total += _squares(values, reference, accumulator_dtype(dtype))
    return UpdateScreen("", total if measure_norm else None)


def _squares(values: np.ndarray, reference: np.ndarray | None, dtype: np.dtype) -> float:
    """Sum of squares of `values - reference` (or of `values`), block by block in `dtype`."""
    scratch, total = np.empty(min(SCREEN_BLOCK_ELEMENTS, values.size), dtype), 0.0
    for start in range(0, values.size, SCREEN_BLOCK_ELEMENTS):
        block = scratch[: min(SCREEN_BLOCK_ELEMENTS, values.size - start)]
        part = values[start : start + block.size]
        if reference is None:
            np.copyto(block, part, casting="unsafe")
        else:
            np.subtract(
                part,
                reference[start : start + block.size],
                out=block,
                dtype=dtype,
                casting="unsafe",
            )
        total += squares(block)
    return total


def check_screen(
    screen: UpdateScreen, site: str, *, base_squares: float | None, limit: float | None
) -> None:
    """Refuse `site`'s update on what its worker found: non-finite values, or a norm above `limit`
    times the global model's (`base_squares`, measured once per round by the federation)."""
    if screen.refusal:
        raise UpdateRefused(f"{site}'s update: {screen.refusal}")
    if limit is None:
        return
    if screen.update_squares is None or base_squares is None:
        raise LocalProtocolError(
            "max_update_norm is set but the update's or the global model's norm is missing"
        )
    norms = UpdateNorms(1)
    norms.add_base(0, base_squares)
    try:
        norms.check(screen.update_squares, limit, complete=True)
    except UpdateRefused as error:
        raise UpdateRefused(f"{site}'s update: {error}") from None


async def move(
    manifest: Manifest,
    source: ChunkSource,
    sink: Any,
    *,
    dataplane: DataPlane,
    timeouts: Timeouts,
    on_chunk: Callable[[Chunk], None] = lambda chunk: None,
) -> None:
    """Move a model from `source` to `sink` over an in-process connection: chunk by chunk, each
    checked against its checksum and every tensor against the manifest's digest."""
    sender, receiver = connection_pair()
    ledger = ReceiveLedger(ChunkPlan(manifest), 1)
    if isinstance(sink, UploadBuffers):
        sink.ledger = ledger
    window = SendSchedule(ChunkPlan(manifest), dataplane.window_chunks).windows[0]
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(
                send_model(
                    sender,
                    manifest,
                    source,
                    window_chunks=dataplane.window_chunks,
                    timeouts=timeouts,
                    window=window,
                )
            )
            group.create_task(
                receive_model(receiver, ledger, sink, timeouts=timeouts, on_chunk=on_chunk)
            )
    except* HaulerError as errors:
        raise errors.exceptions[0] from None
    finally:
        sender.close()
        receiver.close()
