"""The simulator's workers as Ray actors on an existing cluster (`--ray ADDRESS`, or `auto`).

Only `hauler simulate --ray` imports this module, and so Ray (`pip install 'hauler[ray]'`). Every
node must have Hauler installed in the Python its Ray workers run; nothing else is shared: no
filesystem, no job folder.

How the bytes travel, and why:
- The job's code reaches each actor as the packed package (`core.package.pack`), which the actor
  unpacks as a site does, into a temporary folder of its own node.
- The global model is put into Ray's object store once per round (`GlobalModel`), as numpy views
  of the served file, so one copy exists per node however many actors and virtual sites read it;
  an actor copies it into its own model file and checks the tensors' digests against the served
  manifest, as the in-process transport would.
- The update comes back one window (`window_bytes` of raw chunks) per call (`SiteActor.window`), one
  window ahead in flight: each chunk lands in the worker's landing buffer, is checked against
  the checksum its actor sent, handed to the fold's sink (which checks every tensor against the
  update's manifest digest, or decodes an encoded chunk), and recorded in a `ReceiveLedger`
  (which checks an encoded stream's digest). The driver never holds more than two windows.
- With an upload codec the actor encodes the update as a site does, with the virtual site's
  residual in its node's `sites/<site>/`: a site that runs on another node in a later round
  starts that node's residual from zero (error feedback is kept per node, not moved).
- The actor screens the update where it lies (`workers.screen_update`); the federation decides
  on the figures (`workers.check_screen`) before any chunk is folded, as for a local worker.

Errors from an actor are mapped at this edge: a Hauler error raised there is raised again here
(a site's failed training code fails that site), a dead actor or lost node is a `JobError`.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hauler.client.trainer import trainer_for
from hauler.core.config import ExecutorConfig, JobConfig, TransferConfig
from hauler.core.errors import (
    ConfigError,
    DigestError,
    HaulerError,
    IntegrityError,
    JobError,
    LocalProtocolError,
)
from hauler.core.package import pack, unpack
from hauler.model import (
    ArraySource,
    ChunkPlan,
    Manifest,
    ModelFile,
    check_layout,
    chunk_checksum,
)
from hauler.model.encoded import EncodedIndex
from hauler.simulator.workers import (
    ChunkSource,
    Update,
    UpdateScreen,
    WorkerPool,
    buffers_for,
    encode_for_site,
    finish_training,
    model_file_for,
    update_ledger,
)
from hauler.transfer import FrameHeader, LaneBuffers, ReceiveLedger
from hauler.transport.streams import ChunkSink

if TYPE_CHECKING:
    from hauler.simulator.runner import SimulationPlan

try:
    import ray
    import ray.exceptions
except ImportError:  # said as a fix, not as a traceback
    raise ConfigError(
        "--ray needs Ray on this machine and every node: pip install 'hauler[ray]'"
    ) from None

MAX_PACKAGE_BYTES = 64 << 20  # as the runner's: the job's code, not its data
CONNECT_CHECK_S = 10.0  # to open a TCP connection to the cluster's address before ray.init


class SiteActor:
    """What runs on a Ray node: one worker's unpacked job code, model file and training code.

    Its methods take and return plain values (manifests as JSON, figures, chunk windows as numpy
    arrays, which Ray moves out of band), never a model: the global model arrives as the arrays
    of one object-store object, the update leaves a window at a time."""

    def __init__(
        self, package: str, executor_json: str, transfer_json: str, job_id: str, index: int
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"hauler-{job_id}-worker-{index + 1}-"))
        self.transfer = TransferConfig.model_validate_json(transfer_json)
        app_dir = self.folder / "app"
        unpack(package, app_dir, MAX_PACKAGE_BYTES)
        self.trainer = trainer_for(
            ExecutorConfig.model_validate_json(executor_json), app_dir, job_id, self.folder
        )
        self.model: ModelFile | None = None
        self.base: ArraySource | None = None
        self.sending: tuple[Update, ChunkSource] | None = None

    def node(self) -> str:
        """Where this actor runs (and that it has started)."""
        return ray.get_runtime_context().get_node_id()

    async def receive(self, manifest_json: dict, arrays: dict[str, np.ndarray]) -> None:
        """Copy the round's global model from the object store (read-only views) into the model
        file."""
        manifest = Manifest.from_json(manifest_json)
        check_layout(manifest, arrays)
        self.model = model_file_for(self.model, self.folder / "model.safetensors", manifest)
        await asyncio.to_thread(_copy_into, self.model, arrays)
        self.base = ArraySource(
            manifest, arrays
        )  # the views keep this node's copy until the next round

    async def train(self, task: dict[str, Any], measure_norm: bool) -> dict[str, Any]:
        """Run one site's task; returns what it said, its update's manifest and how it screened."""
        if self.model is None or self.base is None:
            raise LocalProtocolError("train() before receive()")
        workdir = self.folder / "sites" / task["site"]
        workdir.mkdir(parents=True, exist_ok=True)
        output = await self.trainer.train({**task, "workdir": str(workdir)}, self.model)
        update, source = await finish_training(
            output, self.model, self.base, measure_norm=measure_norm
        )
        if self.transfer.upload != "none":
            update, source = await encode_for_site(
                update, source, self.base, self.transfer, workdir, self.folder
            )
        self.sending = (update, source)
        encoding = update.encoding.to_json() if update.encoding is not None else None
        return {
            "weight": update.weight,
            "metrics": update.metrics,
            "validation": update.validation,
            "delta": update.delta,
            "manifest": update.manifest.to_json(),
            "refusal": update.screen.refusal,
            "update_squares": update.screen.update_squares,
            "encoding": encoding,
        }

    async def evaluate(self, task: dict[str, Any]) -> dict[str, float]:
        """Run one site's evaluation task on the received model; returns its metrics."""
        if self.model is None:
            raise LocalProtocolError("evaluate() before receive()")
        workdir = self.folder / "sites" / task["site"]
        workdir.mkdir(parents=True, exist_ok=True)
        return await self.trainer.evaluate({**task, "workdir": str(workdir)}, self.model)

    def window(self, start_seq: int, count: int) -> tuple[np.ndarray, list[int], list[int]]:
        """Chunks `start_seq`.. (at most `count`) of the update as they travel, end to end, and
        each one's checksum and length."""
        if self.sending is None:
            raise LocalProtocolError("window() before train()")
        update, source = self.sending
        plan = ChunkPlan(update.manifest)
        seqs = range(start_seq, min(start_seq + count, plan.total))
        views = [list(source.chunk_views(plan.chunk(seq))) for seq in seqs]
        data = np.empty(sum(len(view) for parts in views for view in parts), np.uint8)
        checksums, lengths, position = [], [], 0
        for parts in views:
            start = position
            for view in parts:
                data[position : position + len(view)] = np.frombuffer(view, np.uint8)
                position += len(view)
            checksums.append(chunk_checksum(memoryview(data[start:position])))
            lengths.append(position - start)
        return data, checksums, lengths

    async def close(self) -> None:
        await self.trainer.stop()
        self.sending = self.base = None
        if self.model is not None:
            self.model.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _copy_into(model: ModelFile, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` into `model` and check they hash to the manifest's digests (if it has
    them)."""
    expected = model.manifest
    for index, tensor in enumerate(expected.tensors):
        np.copyto(model.array(index), arrays[tensor.name])
    received = model.compute_digests()
    for want, got in zip(expected.tensors, received.tensors):
        if want.digest and want.digest != got.digest:
            raise DigestError(
                f"tensor {want.name!r} of the global model differs from the served one after "
                "the object store; the round cannot go on on this node"
            )


class GlobalModel:
    """The round's global model in the object store: put once per round, when a worker first needs
    it; the previous round's object is released as its reference is dropped."""

    def __init__(self) -> None:
        self._served: ModelFile | None = None
        self._ref: ray.ObjectRef | None = None
        self._lock = asyncio.Lock()

    async def ref_for(self, served: ModelFile) -> ray.ObjectRef:
        async with self._lock:
            if self._served is not served:
                self._ref = None
                self._ref = await asyncio.to_thread(ray.put, served.arrays())
                self._served = served
            assert self._ref is not None
            return self._ref


class RayWorker:
    """The driver's side of one actor: the `Worker` steps, as calls to it."""

    def __init__(
        self, index: int, actor: Any, global_model: GlobalModel, window_chunks: int
    ) -> None:
        self.index, self.actor, self.global_model = index, actor, global_model
        self.window_chunks = window_chunks
        self.buffers: LaneBuffers | None = None
        self._served: Manifest | None = None
        self._update: Update | None = None

    async def receive(self, served: ModelFile) -> None:
        self.buffers = buffers_for(self.buffers, served.manifest)
        ref = await self.global_model.ref_for(served)
        await _call(self, self.actor.receive.remote(served.manifest.to_json(), ref))
        self._served = served.manifest

    async def train(self, task: dict[str, Any], *, measure_norm: bool) -> Update:
        said = await _call(self, self.actor.train.remote(task, measure_norm))
        manifest = Manifest.from_json(said["manifest"])
        if self._served is None or not manifest.same_layout(self._served):
            raise JobError(
                f"Ray worker {self.index + 1} sent an update whose layout is not the global model's"
            )
        squares = said["update_squares"]
        encoding = said["encoding"]
        self._update = Update(
            float(said["weight"]),
            dict(said["metrics"]),
            bool(said["delta"]),
            manifest,
            UpdateScreen(str(said["refusal"]), None if squares is None else float(squares)),
            None if encoding is None else EncodedIndex.from_json(encoding, manifest.chunk_count()),
            dict(said["validation"]),
        )
        return self._update

    async def evaluate(self, task: dict[str, Any]) -> dict[str, float]:
        return dict(await _call(self, self.actor.evaluate.remote(task)))

    async def send_update(self, sink: ChunkSink) -> None:
        """Pull the update a window at a time, the next window already asked for while this one
        lands."""
        if self._update is None or self.buffers is None:
            raise LocalProtocolError("send_update() before train()")
        plan = ChunkPlan(self._update.manifest)
        ledger = update_ledger(plan, self._update.encoding)
        starts = list(range(0, plan.total, self.window_chunks))

        def ask(start: int | None) -> Any:
            return None if start is None else self.actor.window.remote(start, self.window_chunks)

        ahead = ask(starts[0] if starts else None)
        for start, following in zip(starts, [*starts[1:], None]):
            current, ahead = ahead, ask(following)
            data, checksums, lengths = await _call(self, current)
            self._land(ledger, sink, start, data, checksums, lengths)
        if not ledger.done:
            raise IntegrityError(
                f"Ray worker {self.index + 1} sent {ledger.held(0)} of {plan.total} "
                "chunks of its update"
            )

    def _land(
        self,
        ledger: ReceiveLedger,
        sink: ChunkSink,
        start: int,
        data: np.ndarray,
        checksums: list[int],
        lengths: list[int],
    ) -> None:
        """Land one window: each chunk where the sink says, checked, handed to the sink (which
        folds it), then recorded in the ledger."""
        expected = min(self.window_chunks, ledger.plan.total - start)
        if len(checksums) != expected or len(lengths) != expected:
            raise IntegrityError(
                f"Ray worker {self.index + 1} sent {len(checksums)} chunks for a window of "
                f"{self.window_chunks} from chunk {start}; the update is dropped"
            )
        window = memoryview(data).cast("B")
        position = 0
        for seq, checksum, length in zip(range(start, start + expected), checksums, lengths):
            chunk = ledger.expect(FrameHeader.data(seq, length, checksum))
            if position + length > len(window):
                raise IntegrityError(
                    f"Ray worker {self.index + 1} sent a window shorter than its chunks"
                )
            landed = sink.landing(chunk, 0, length)
            landed[:] = window[position : position + length]
            if chunk_checksum(landed) != checksum:
                raise IntegrityError(
                    f"chunk {chunk.seq} of Ray worker {self.index + 1}'s update fails its "
                    "checksum; the update is dropped"
                )
            sink.landed(chunk, 0, landed, checksum)
            ledger.commit(chunk, checksum, length)  # checks an encoded stream's digest at the end
            position += length

    async def close(self) -> None:
        try:
            await _call(self, self.actor.close.remote())
        finally:
            ray.kill(self.actor)


async def _call(worker: RayWorker, pending: Awaitable[Any]) -> Any:
    """Await an actor call; a Hauler error raised in the actor is raised again here, as itself."""
    try:
        return await pending
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, HaulerError):
            raise error.cause from None
        raise JobError(f"Ray worker {worker.index + 1} failed: {error.cause!r}") from None
    except ray.exceptions.RayError as error:  # the actor died, its node was lost, the object too
        raise JobError(
            f"Ray worker {worker.index + 1} is gone ({type(error).__name__}: {error}); "
            "see the Ray cluster's logs"
        ) from None


async def ray_pool(
    plan: SimulationPlan, job: JobConfig, job_id: str, app_dir: Path, workers: int
) -> WorkerPool:
    """`workers` actors on the cluster at `plan.ray`, each with `plan.worker_cpus` CPUs and
    `plan.worker_gpus` GPUs, started and ready; closing the pool ends them and disconnects."""
    owned = await asyncio.to_thread(_connect, plan.ray)
    _check_room(plan.worker_cpus, plan.worker_gpus, workers)
    package = pack(app_dir, MAX_PACKAGE_BYTES)
    actor_class = ray.remote(SiteActor).options(
        num_cpus=plan.worker_cpus, num_gpus=plan.worker_gpus
    )
    global_model = GlobalModel()
    pool = [
        RayWorker(
            index,
            actor_class.remote(
                package,
                job.executor.model_dump_json(),
                job.transfer.model_dump_json(),
                job_id,
                index,
            ),
            global_model,
            max(1, plan.dataplane.window_bytes // plan.dataplane.chunk_bytes),
        )
        for index in range(workers)
    ]

    async def disconnect() -> None:
        if owned:
            await asyncio.to_thread(ray.shutdown)

    try:
        await asyncio.gather(*(_call(worker, worker.actor.node.remote()) for worker in pool))
    except BaseException:
        await WorkerPool(pool, disconnect).close()
        raise
    return WorkerPool(pool, disconnect)


def _connect(address: str) -> bool:
    """Join the cluster at `address` ("auto": the one this machine belongs to); True if this call
    connected (and so the pool disconnects), False if the process already was connected."""
    if ray.is_initialized():
        return False
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise ConfigError(
            f"--ray {address}: cannot join the Ray cluster there ({error}); start one with "
            "`ray start --head`, or give its address"
        ) from None
    return True


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT nobody listens on: `ray.init` would retry it forever, in silence."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", or a scheme of Ray's own: Ray finds and reports those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_CHECK_S).close()
    except OSError as error:
        raise ConfigError(
            f"--ray {address}: no Ray cluster answers there ({error}); start one with "
            "`ray start --head`, or give its address"
        ) from None


def _check_room(cpus: float, gpus: float, workers: int) -> None:
    """Refuse a pool the whole cluster has no room for, rather than wait for it forever."""
    room = ray.cluster_resources()
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        if each * workers > room.get(name, 0.0):
            raise ConfigError(
                f"--workers {workers} x --worker-{name.lower()}s {each:g} needs {each * workers:g} "
                f"{name}s; the Ray cluster has {room.get(name, 0.0):g}"
            )
