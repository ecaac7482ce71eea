"""`workflows.Federation` over virtual sites that take turns on a pool of workers.

A virtual site's round is what a real site's is, without a network: its worker receives the
round's global model, runs the job's code on it for that site (its name, its settings), and its
update streams back chunk by chunk into the same fold as a server's, checked the same way. Every
virtual site takes part in every round; W of them train at once. Where a worker runs (this
process, or a Ray actor) is the worker's business (`simulate/workers.py`, `simulate/ray.py`).

Codecs run as on a real federation: an update is encoded by its worker (with the virtual site's
own residual) and decoded into the fold, and the round's global model is the server's, delta
codec included. A worker copies the global model whole, in memory; its download is reported as
what a real site holding the previous round would have downloaded: the round's encoded delta.

Cross-site evaluation runs as on a real federation too: in the last training round each virtual
site's code writes its local model to `sites/<site>/local.safetensors` (disk, not memory); asked
for it, the federation checks it (layout, digests) and moves it into the job's `local/` folder,
as a server stores an upload, unless the site's settings say `share_local_model = false`; a
model to evaluate reaches a worker as a round's global model does, and only metrics come back.

One difference is said rather than hidden: a worker's model is reused by the next site once its
update is folded, so the simulator cannot refold a round from its sites as a server does. Each
update is screened whole (finite values, max_update_norm) before any of it is folded: the worker
measures it where it lies, this federation decides, so a refused site is dropped with nothing
folded; only an overflow of weight x value found while folding still taints a round, and that
round fails, naming why.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hauler.aggregate import RoundAggregate, UploadSink, check_weight
from hauler.core.config import DataPlane, JobConfig, Timeouts
from hauler.core.errors import ConfigError, JobError, TaskRefused
from hauler.model import ChunkPlan, Manifest
from hauler.model.codecs import make_codec
from hauler.model.encoded import EncodedIndex
from hauler.model.local_models import GLOBAL, EvaluatedModels, LocalModels, open_local
from hauler.simulator.workers import (
    Update,
    Worker,
    WorkerPool,
    check_screen,
    local_model_path,
    screen_update,
)
from hauler.workflows import TrainResult
from hauler.workflows.base import Evaluation
from hauler.workflows.records import RoundRecords

Settings = dict[str, dict[str, Any]]  # site -> its settings (context.settings)


class SimulatedFederation:
    def __init__(
        self,
        *,
        job_id: str,
        job_dir: Path,
        job: JobConfig,
        pool: WorkerPool,
        settings: Settings,
        aggregate: RoundAggregate,
        emit: Callable[..., None],
        record: Callable[[dict], None],
        dataplane: DataPlane,
        timeouts: Timeouts,
    ) -> None:
        self.job_id, self.job_dir, self.job, self.pool = job_id, job_dir, job, pool
        self.settings, self.aggregate, self.emit = settings, aggregate, emit
        self.records = RoundRecords(record)
        self.record = record
        self.local_models = LocalModels(job_dir)
        self.evaluated = EvaluatedModels(aggregate.rounds, self.local_models)
        self.dataplane, self.timeouts = dataplane, timeouts
        self.sites = list(settings)
        self._base_squares: float | None = None  # the round's global model's, if bounded
        self._delta: EncodedIndex | None = None  # the round's encoded delta, if any

    async def wait_for_sites(self, count: int, wanted: list[str] | None) -> list[str]:
        """Every virtual site (those the job names, if it names some): they are all there."""
        unknown = sorted(set(wanted or []) - set(self.sites))
        if unknown:
            raise ConfigError(
                f"job.toml: sites: {', '.join(unknown)} are not among the simulated "
                f"sites site-1..site-{len(self.sites)}"
            )
        chosen = [site for site in self.sites if wanted is None or site in wanted]
        if len(chosen) < count:
            raise JobError(
                f"the job needs min_clients = {count} sites; the simulation has {len(chosen)}"
            )
        return chosen

    async def begin_round(self, round: int) -> None:
        self.aggregate.begin(round)  # in the loop: a cancelled round leaves no thread behind
        self.records.begin(round)
        self._delta = self.aggregate.rounds.delta_index(round) if round > 0 else None
        self._base_squares = None
        if self.job.workflow.max_update_norm is not None:  # measured once a round, not once a site
            served = self.aggregate.global_model
            screen = await asyncio.to_thread(
                screen_update, served.manifest, served, None, measure_norm=True
            )
            self._base_squares = screen.update_squares

    async def train(self, site: str, round: int, *, keep_local: bool = False) -> TrainResult:
        async with self.pool.worker() as worker:
            started, started_s = time.perf_counter(), time.time()
            served = self.aggregate.global_model
            await worker.receive(served)
            arrived = time.perf_counter()
            update = await worker.train(
                {**self._task(site, round), "keep_local": keep_local},
                measure_norm=self.job.workflow.max_update_norm is not None,
            )
            trained = time.perf_counter()
            await self._fold(site, worker, update)
            uploaded = time.perf_counter()
        timings = {
            "download_s": arrived - started,
            "train_s": trained - arrived,
            "upload_s": uploaded - trained,
        }
        result = TrainResult(site, update.weight, update.metrics, timings, update.validation)
        model_bytes = served.manifest.total_bytes
        figures = {"bytes": model_bytes, "bytes_resent": 0, "lanes": 1, "reconnects": 0}
        self.records.site(
            result,
            started_s=started_s,
            model_bytes=model_bytes,
            download={**figures, **_wire(self._delta, model_bytes)},
            upload={**figures, **_wire(update.encoding, model_bytes)},
        )
        self.emit(
            "site.result",
            round=round,
            site=site,
            weight=update.weight,
            metrics=update.metrics,
            validation=update.validation,
            worker=worker.index + 1,
            **timings,
        )
        return result

    async def submit_local_model(self, site: str) -> None:
        """Take the model `site` kept in the last round as its local model (checked as a server
        checks an upload), unless its settings keep it to itself."""
        if not self.settings[site].get("share_local_model", True):
            raise TaskRefused(f"{site} keeps its local model (share_local_model = false)")
        path = local_model_path(self.job_dir / "sites", site)
        layout = self.evaluated.get(GLOBAL).manifest
        manifest = await asyncio.to_thread(_digested, path, layout, site)
        self.local_models.adopt(site, path, manifest)
        self.emit("model.submitted", site=site, bytes=manifest.total_bytes)

    async def evaluate(self, site: str, model: str) -> Evaluation:
        """`site` evaluates `model` on a worker: the model copied in, metrics out."""
        task = {**self._task(site, self.aggregate.rounds.latest() or 0), "model_name": model}
        async with self.pool.worker() as worker:
            start, started_s = time.perf_counter(), time.time()
            await worker.receive(self.evaluated.get(model))
            arrived = time.perf_counter()
            metrics = await worker.evaluate(task)
        timings = {"download_s": arrived - start, "evaluate_s": time.perf_counter() - arrived}
        return Evaluation(metrics, timings, started_s)

    def _task(self, site: str, round: int) -> dict[str, Any]:
        """What the training code receives, as a site would give it, for virtual site `site`; the
        worker adds where the site's files go (`workdir`), on its own machine."""
        return {
            "type": "task",
            "task_id": secrets.token_hex(8),
            "job_id": self.job_id,
            "site": site,
            "round": round,
            "config": self.job.executor.config,
            "settings": self.settings[site],
        }

    async def _fold(self, site: str, worker: Worker, update: Update) -> None:
        """Check the site's update as a server checks it, then stream it from its worker into the
        fold, decoded as a server decodes it."""
        workflow = self.job.workflow
        check_weight(update.weight, site, workflow.max_weight)
        check_screen(
            update.screen, site, base_squares=self._base_squares, limit=workflow.max_update_norm
        )
        encoding = update.encoding
        codec = None
        if encoding is not None:
            codec = make_codec(encoding.codec, block_elements=encoding.block_elements)
        contribution = self.aggregate.contribution(update.weight, update=update.delta)
        assert worker.buffers is not None
        plan = ChunkPlan(update.manifest)
        sink = UploadSink(worker.buffers, contribution, plan, site=site, codec=codec)
        try:
            await worker.send_update(sink)
            contribution.complete()
        finally:
            contribution.abandon()  # no-op once complete; taints the round if it stopped part-way

    async def end_round(self, round: int, results: list[TrainResult]) -> None:
        if self.aggregate.fedavg.tainted:
            raise JobError(
                f"round {round}: an update was refused after part of it was folded (see the "
                "events); the simulator keeps no site's model once folded, so it cannot refold"
            )
        await asyncio.to_thread(self.aggregate.finish, round)
        self.records.end(results)

    def close(self) -> None:
        self.aggregate.close()
        self.evaluated.close()


def _digested(path: Path, layout: Manifest, site: str) -> Manifest:
    """The manifest, with digests, of the local model `site` kept at `path` (checked)."""
    with open_local(path, layout, site) as model:
        return model.manifest


def _wire(encoding: EncodedIndex | None, model_bytes: int) -> dict[str, Any]:
    """What a transfer put on the wire: its encoding's bytes, or the whole model. A virtual
    site's download is counted as a real site holding the previous round makes it: the round's
    delta, encoded once (the worker itself copies the whole model in memory)."""
    if encoding is None:
        return {"wire_bytes": model_bytes, "codec": "none"}
    return {"wire_bytes": sum(encoding.lengths), "codec": encoding.codec}
