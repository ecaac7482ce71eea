"""The simulator's workers: W slots, each one model file and one running copy of the job's
training code, that the N virtual sites take turns on. A virtual site holds no memory of its own:
the global model exists once, and a model per worker, however many sites there are.

The code runs as it does on a real site (`client/trainer.py`, in a thread or a child process,
talking through the client API), and stays up across tasks, so a worker serves site-3 in one
task and site-12 in the next: scripts read `hauler.context()` every round to know whose turn it
is.

Every worker, in this process (`LocalWorker`) or a Ray actor (`hauler.simulator.ray`), offers the
same steps to the federation, which never asks which kind it has (`Worker`): `receive` the
round's global model, `train` one site's task, `send_update` chunk by chunk into the fold, or
`evaluate` the received model for one site (cross-site evaluation), and `close`. A local
worker's task may ask it to keep the site's trained model (`keep_local`): the training code
writes it to the site's `sites/<site>/local.safetensors` on `send()`, as a real site does.

A worker screens its own update after training (`screen_update`: every value finite, and its squared
norm), where the update is at hand, and reports the figures; the federation checks them
(`check_screen`) before a byte is folded, so a refused site is dropped with nothing folded,
whichever machine its worker is on. With an upload codec the worker then encodes the update as a
site does (`encode_for_site`), with the virtual site's own residual file in `sites/<site>/` on the
worker's machine, and the fold decodes it as a server does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hauler.aggregate.screening import FiniteCheck, UpdateNorms, squares
from hauler.client.trainer import Trainer, TrainerResult, trainer_for
from hauler.core.config import DataPlane, ExecutorConfig, Timeouts, TransferConfig
from hauler.core.errors import HaulerError, LocalProtocolError, UpdateRefused
from hauler.model import ArraySource, ChunkPlan, Manifest, ModelFile, accumulator_dtype
from hauler.model.codecs import make_codec
from hauler.model.encoded import EncodedFile, EncodedIndex, encoded_limit
from hauler.model.updates import encode_update, open_residual, source_arrays
from hauler.transfer import FileSink, LaneBuffers, ReceiveLedger, SendSchedule
from hauler.transport import connection_pair, receive_model, send_model
from hauler.transport.streams import ChunkSink

ChunkSource = ModelFile | ArraySource | EncodedFile
SCREEN_BLOCK_ELEMENTS = 1 << 20  # screened in blocks with one reused scratch


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
    encoding: EncodedIndex | None = None  # how it travels, if encoded
    validation: dict[str, float] = field(default_factory=dict)  # the global model's metrics


class Worker(Protocol):
    """One slot the virtual sites take turns on, wherever it runs. `buffers` is this process's
    landing buffer for the update being sent (set by `receive`), which the fold reads from."""

    index: int
    buffers: LaneBuffers | None

    async def receive(self, served: ModelFile) -> None:
        """Make the worker's model the round's global model `served`."""

    async def train(self, task: dict[str, Any], *, measure_norm: bool) -> Update:
        """Run the job's code on the received model for one site's task, then screen its update."""

    async def send_update(self, sink: ChunkSink) -> None:
        """Land the update chunk by chunk in `sink` (which checks, decodes and folds each)."""

    async def evaluate(self, task: dict[str, Any]) -> dict[str, float]:
        """Run the job's code on the received model for one site's evaluation task."""

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
        transfer: TransferConfig,
    ) -> None:
        self.index, self.folder, self.trainer, self.sites_dir = index, folder, trainer, sites_dir
        self.dataplane, self.timeouts, self.transfer = dataplane, timeouts, transfer
        self.buffers: LaneBuffers | None = None
        self._model: ModelFile | None = None
        self._base: ModelFile | None = None
        self._sending: tuple[Update, ChunkSource] | None = None

    async def receive(self, served: ModelFile) -> None:
        path = self.folder / "model.safetensors"
        self._model = model_file_for(self._model, path, served.manifest)
        self.buffers = buffers_for(self.buffers, served.manifest)
        plan = ChunkPlan(served.manifest)
        sink = FileSink(self._model, plan)
        await move(plan, served, sink, dataplane=self.dataplane, timeouts=self.timeouts)
        self._base = served

    async def train(self, task: dict[str, Any], *, measure_norm: bool) -> Update:
        if self._model is None or self._base is None:
            raise LocalProtocolError("train() before receive()")
        workdir = self.sites_dir / task["site"]
        workdir.mkdir(parents=True, exist_ok=True)
        if task.get("keep_local"):
            task = {**task, "local_path": str(local_model_path(self.sites_dir, task["site"]))}
        output = await self.trainer.train({**task, "workdir": str(workdir)}, self._model)
        update, source = await finish_training(
            output, self._model, self._base, measure_norm=measure_norm
        )
        if self.transfer.upload != "none":
            update, source = await encode_for_site(
                update, source, self._base, self.transfer, workdir, self.folder
            )
        self._sending = (update, source)
        return update

    async def send_update(self, sink: ChunkSink) -> None:
        if self._sending is None:
            raise LocalProtocolError("send_update() before train()")
        update, source = self._sending
        plan = ChunkPlan(update.manifest)
        ledger = update_ledger(plan, update.encoding)
        await move(
            plan, source, sink, ledger=ledger, dataplane=self.dataplane, timeouts=self.timeouts
        )

    async def evaluate(self, task: dict[str, Any]) -> dict[str, float]:
        if self._model is None:
            raise LocalProtocolError("evaluate() before receive()")
        workdir = self.sites_dir / task["site"]
        workdir.mkdir(parents=True, exist_ok=True)
        return await self.trainer.evaluate({**task, "workdir": str(workdir)}, self._model)

    async def close(self) -> None:
        await self.trainer.stop()
        self._sending = self._base = None
        if self._model is not None:
            self._model.close()


def local_model_path(sites_dir: Path, site: str) -> Path:
    """Where a virtual site's local model is kept, on the machine its worker runs on."""
    return sites_dir / site / "local.safetensors"


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
        transfer: TransferConfig,
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
                    transfer=transfer,
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


def buffers_for(buffers: LaneBuffers | None, manifest: Manifest) -> LaneBuffers:
    """One landing buffer, made on first use and kept all job long (it grows for encoded
    chunks larger than a raw one)."""
    return buffers if buffers is not None else LaneBuffers(1, manifest.chunk_bytes)


async def finish_training(
    output: TrainerResult, model: ModelFile, base: ModelFile | ArraySource, *, measure_norm: bool
) -> tuple[Update, ChunkSource]:
    """What a worker does once the code has sent: digest the update where it lies (the code's
    arrays, or the worker's file) and screen it against the global model `base`."""
    source: ModelFile | ArraySource = output.source or model
    manifest = await asyncio.to_thread(source.compute_digests)
    screen = await asyncio.to_thread(
        screen_update, manifest, source, None if output.delta else base, measure_norm=measure_norm
    )
    update = Update(
        output.weight, output.metrics, output.delta, manifest, screen, validation=output.validation
    )
    return update, source


async def encode_for_site(
    update: Update,
    source: ChunkSource,
    base: ModelFile | ArraySource,
    transfer: TransferConfig,
    site_dir: Path,
    folder: Path,
) -> tuple[Update, EncodedFile]:
    """The update encoded as a real site encodes it (model/updates.py), into `folder`, with the
    virtual site's residual in `site_dir` when the job keeps error feedback."""
    codec = make_codec(transfer.upload, block_elements=transfer.block_elements)
    plan = ChunkPlan(update.manifest)
    residual = None
    if transfer.error_feedback and codec.lossy:
        residual = open_residual(site_dir / "residual.safetensors", update.manifest)
    try:
        encoded = await asyncio.to_thread(
            encode_update,
            plan,
            source,
            None if update.delta else base,
            codec,
            folder / "update.bin",
            block_elements=transfer.block_elements,
            residual=residual,
        )
    finally:
        if residual is not None:
            residual.close()
    return replace(update, delta=True, encoding=encoded.index), encoded


def update_ledger(plan: ChunkPlan, encoding: EncodedIndex | None) -> ReceiveLedger:
    """The receiving ledger of an update: raw, or encoded as `encoding` says."""
    if encoding is None:
        return ReceiveLedger(plan, 1)
    codec = make_codec(encoding.codec, block_elements=encoding.block_elements)
    return ReceiveLedger(
        plan, 1, payload_limit=encoded_limit(codec, plan), stream_digest=encoding.digest
    )


def screen_update(
    manifest: Manifest,
    update: ModelFile | ArraySource,
    base: ModelFile | None,
    *,
    measure_norm: bool,
) -> UpdateScreen:
    """Screen a whole update in one pass, with the aggregator's own checks (`aggregate.screening`):
    every float value finite, and, if `measure_norm`, the sum of squares of `update - base` (of
    `update` itself when `base` is None: a delta, or the global model's own norm), in the dtype
    the fold accumulates in."""
    finite, total, plan = FiniteCheck(SCREEN_BLOCK_ELEMENTS), 0.0, ChunkPlan(manifest)
    for chunk in manifest.chunks():
        based = None if base is None else source_arrays(plan, base, chunk)
        for index, (piece, values) in enumerate(source_arrays(plan, update, chunk)):
            if values.dtype.kind != "f" and manifest.tensors[piece.tensor].dtype != "BF16":
                continue  # integers and flags are neither screened nor counted, as in the fold
            try:
                finite.check_folded(values, manifest, chunk, piece.tensor)
            except UpdateRefused as refusal:
                return UpdateScreen(str(refusal), None)
            if measure_norm:
                reference = None if based is None else based[index][1]
                total += _squares(values, reference, accumulator_dtype(values.dtype))
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
            reference_part = reference[start : start + block.size]
            np.subtract(part, reference_part, out=block, dtype=dtype, casting="unsafe")
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
    plan: ChunkPlan,
    source: ChunkSource,
    sink: ChunkSink,
    *,
    dataplane: DataPlane,
    timeouts: Timeouts,
    ledger: ReceiveLedger | None = None,
) -> None:
    """Move a model from `source` to `sink` over an in-process connection: chunk by chunk, each
    checked against its checksum, then by the sink (every tensor against the manifest's
    digest, or the whole encoded stream against its digest)."""
    sender, receiver = connection_pair()
    ledger = ledger or ReceiveLedger(plan, 1)
    window = SendSchedule(plan, dataplane.window_bytes, 1, source.payload_bytes).windows[0]
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(send_model(sender, source, window, timeouts=timeouts))
            group.create_task(receive_model(receiver, ledger, sink, timeouts=timeouts))
    except* HaulerError as errors:
        raise errors.exceptions[0] from None
    finally:
        sender.close()
        receiver.close()
