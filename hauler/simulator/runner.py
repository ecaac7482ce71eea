"""Run a job on N virtual sites in this process and its workers, as a server would run it on N
real ones: the same job folder is written (`jobs/<id>/` with `app/`, `global/round-<r>`,
`events.jsonl`, `metrics.jsonl`), so reports, downloads and TensorBoard read it as a server's.

    await simulate(job_dir, sites=16, workers=3, workspace=Path("sim"))
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hauler.aggregate import Recipe, RoundAggregate
from hauler.core.config import DataPlane, JobConfig, Timeouts
from hauler.core.errors import ConfigError, HaulerError
from hauler.core.events import Event, EventBus, JsonLines
from hauler.core.package import load_job, pack, unpack
from hauler.core.resources import ProcessMeter
from hauler.core.tracking import Run, open_metrics, require_mlflow, sent, tracking_target
from hauler.model.initial import build_in_child, import_initial_model
from hauler.model.rounds import RoundStore
from hauler.simulator.federation import Settings, SimulatedFederation
from hauler.simulator.workers import WorkerPool
from hauler.workflows import workflow_for

PROCESS = "simulator"  # the name its resource samples carry in the job's metrics
MAX_PACKAGE_BYTES = 64 << 20
KEEP_ROUNDS = 2
MEMORY_BUDGET_BYTES = (
    32 << 20
)  # side accumulators larger than this are memory-mapped, as on a server


@dataclass(frozen=True)
class SimulationPlan:
    """What to simulate: N virtual sites, W workers, where; `settings` per site (a TOML file of
    a table per site, or a dict), merged over `{site_index, num_sites}`."""

    job_dir: Path
    sites: int
    workspace: Path
    workers: int | None = None  # None: one per core
    settings: Path | dict[str, dict[str, Any]] | None = None
    initial_model: Path | None = None
    ray: str | None = None
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    dataplane: DataPlane = DataPlane(connections=1)
    timeouts: Timeouts = Timeouts()


async def simulate(plan: SimulationPlan, on_event: Callable[[Event], None] | None = None) -> str:
    """Run the whole job; returns its id (its folder is `workspace/jobs/<id>`). The job's end is
    in its events: `job.finished`, or `job.failed` with the reason, which is also raised."""
    if plan.workers is None:
        plan = replace(plan, workers=os.cpu_count() or 1)
    if plan.sites < 1 or plan.workers < 1:
        raise ConfigError("--sites and --workers must be at least 1")
    job = load_job(plan.job_dir)
    _check_ray(plan, job)
    job_id = uuid.uuid4().hex[:12]
    job_dir = plan.workspace.resolve() / "jobs" / job_id
    bus = EventBus()
    metrics = _metrics(job, job_id, job_dir, bus)
    bus.subscribe(JsonLines(job_dir / "events.jsonl"))
    if on_event is not None:
        bus.subscribe(on_event)
    bus.emit("job.started", job=job_id, name=job.name, sites=plan.sites, workers=plan.workers)
    try:
        async with _sampled(metrics), _pool(plan, job, job_id, job_dir) as pool:
            await _run(plan, job, job_id, job_dir, pool, bus, metrics)
    except HaulerError as failure:
        bus.emit("job.failed", job=job_id, error=str(failure), rounds_done=_rounds_done(job_dir))
        raise
    else:
        bus.emit("job.finished", job=job_id, error="", rounds_done=_rounds_done(job_dir))
    finally:
        metrics.close()
        await sent(metrics)
    return job_id


def _metrics(job: JobConfig, job_id: str, job_dir: Path, bus: EventBus) -> JsonLines:
    """The job's metrics file; with [tracking], its records go to MLflow too (to any URI: this
    is the user's own machine)."""
    target = tracking_target(job.tracking, job_dir)
    if target is not None:
        require_mlflow("on this machine")
    return open_metrics(job_dir / "metrics.jsonl", bus, target, Run.of(job, job_id, PROCESS))


async def _run(
    plan: SimulationPlan,
    job: JobConfig,
    job_id: str,
    job_dir: Path,
    pool: WorkerPool,
    bus: EventBus,
    metrics: JsonLines,
) -> None:
    aggregate = RoundAggregate(
        job_dir,
        keep_rounds=KEEP_ROUNDS,
        memory_budget_bytes=MEMORY_BUDGET_BYTES,
        recipe=Recipe.of(job),
    )
    await _initial_model(plan, job, job_dir, aggregate)
    federation = SimulatedFederation(
        job_id=job_id,
        job_dir=job_dir,
        job=job,
        pool=pool,
        settings=site_settings(plan),
        aggregate=aggregate,
        emit=lambda name, **fields: bus.emit(name, job=job_id, **_said(fields)),
        record=metrics.write,
        dataplane=plan.dataplane,
        timeouts=plan.timeouts,
    )
    every_site = job.workflow.model_copy(update={"min_clients": len(job.sites or federation.sites)})
    try:
        await workflow_for(every_site, job.sites).run(federation)
    finally:
        federation.close()


@contextlib.asynccontextmanager
async def _pool(
    plan: SimulationPlan, job: JobConfig, job_id: str, job_dir: Path
) -> AsyncIterator[WorkerPool]:
    """The job's code unpacked as a site unpacks it, and the workers that run it."""
    app_dir = job_dir / "app"
    unpack(pack(plan.job_dir, MAX_PACKAGE_BYTES), app_dir, MAX_PACKAGE_BYTES)
    workers = min(plan.workers, plan.sites)
    if plan.ray is not None:
        from hauler.simulator.ray import ray_pool  # Ray only when asked for

        pool = await ray_pool(plan, job, job_id, app_dir, workers)
    else:
        pool = WorkerPool.local(
            workers,
            job.executor,
            app_dir,
            job_id,
            job_dir,
            dataplane=plan.dataplane,
            timeouts=plan.timeouts,
            transfer=job.transfer,
        )
    try:
        yield pool
    finally:
        await pool.close()


async def _initial_model(
    plan: SimulationPlan, job: JobConfig, job_dir: Path, aggregate: RoundAggregate
) -> None:
    """Round 0: the given file, the job's [model] file, or built by its model module, here."""
    chunk_bytes, rounds = plan.dataplane.chunk_bytes, aggregate.rounds
    if plan.initial_model is not None or job.model.file is not None:
        source = plan.initial_model or (plan.job_dir / str(job.model.file))
        await asyncio.to_thread(import_initial_model, rounds, Path(source), chunk_bytes, move=False)
    elif job.model.module is not None:
        built = await build_in_child(
            job_dir / "app",
            job.model.module,
            job.model.config,
            chunk_bytes,
            job_dir / "initial.safetensors",
        )
        await asyncio.to_thread(import_initial_model, rounds, built, chunk_bytes, move=True)
    else:
        raise ConfigError(
            f"{plan.job_dir}: job.toml names no [model] module or file; name one, or "
            "give the initial model with --initial-model FILE"
        )


def _check_ray(plan: SimulationPlan, job: JobConfig) -> None:
    """Cross-site evaluation after training keeps every virtual site's local model in this
    machine's job folder, which Ray workers on other nodes cannot write to."""
    workflow = job.workflow
    if plan.ray is not None and workflow.name == "cross_site_evaluation" and workflow.num_rounds:
        raise ConfigError(
            "--ray: cross_site_evaluation keeps every virtual site's local model in the job "
            "folder on this machine, which Ray workers cannot write to; run it without --ray "
            "(or with num_rounds = 0, to evaluate a given model only)"
        )


def site_settings(plan: SimulationPlan) -> Settings:
    """Every virtual site's settings: `{site_index, num_sites}` under what the plan gives it."""
    given = plan.settings
    if isinstance(given, Path):
        try:
            given = tomllib.loads(given.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"{given}: cannot read it as site settings: {error}") from None
    given = given or {}
    names = [f"site-{k}" for k in range(1, plan.sites + 1)]
    unknown = sorted(set(given) - set(names))
    if unknown or any(not isinstance(value, dict) for value in given.values()):
        raise ConfigError(
            f"site settings: expected a table per site among {names[0]}..{names[-1]}; "
            f"got {', '.join(unknown) or 'a value that is not a table'}"
        )
    return {
        name: {"site_index": index, "num_sites": plan.sites, **given.get(name, {})}
        for index, name in enumerate(names)
    }


@contextlib.asynccontextmanager
async def _sampled(metrics: JsonLines) -> AsyncIterator[None]:
    """This process and its children (the workers' training code), every second and once at the
    end, into the metrics: a job shorter than a second has its sample too."""
    meter = ProcessMeter(children=True)

    async def sample() -> None:
        while True:
            for reading in await meter.collect(meter.interval_s):
                metrics.write(reading.record(PROCESS))

    task = asyncio.create_task(sample())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        metrics.write(meter.read().record(PROCESS))


def _said(fields: dict[str, Any]) -> dict[str, Any]:
    error = fields.get("error")
    return {**fields, "error": str(error)} if isinstance(error, BaseException) else fields


def _rounds_done(job_dir: Path) -> int:
    return RoundStore(job_dir, KEEP_ROUNDS).latest() or 0
