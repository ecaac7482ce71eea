"""The server's job runner without sites: submission through the real package checks,
aborting a queued job, and watching a job's events (past, then live, to the end)."""

from __future__ import annotations

import asyncio
import base64
import io
import tomllib
import zipfile

import pytest
import tomli_w
from helpers import hello_job

from hauler.core.config import ServerConfig
from hauler.core.errors import ConfigError, JobError
from hauler.core.package import pack
from hauler.model import Manifest
from hauler.server.access import AccessPolicy
from hauler.server.jobstore import JobStatus, JobStore
from hauler.server.runner import JobRunner
from hauler.server.sites import SiteRegistry
from hauler.server.transfers import TransferRegistry

ADMIN = ("admin", "poc")  # who submits: (name, organisation)
INITIAL = Manifest.build([("w", "F32", (8,))], 4 << 20).with_digests(
    ["0123456789abcdef"]
)  # announced


async def submit(runner: JobRunner, package: str, submitter: tuple[str, str]) -> str:
    """Submit as an admin does for a job whose round 0 it built: the upload is still to come."""
    return await runner.submit(package, submitter, INITIAL)


@pytest.fixture
def runner(tmp_path):
    config = ServerConfig(workspace=tmp_path / "server")
    store = JobStore(tmp_path / "server" / "jobs.sqlite")
    transfers = TransferRegistry(config.dataplane, config.timeouts, AccessPolicy([]))
    yield JobRunner(config, store, SiteRegistry(), transfers)
    store.close()


async def test_submitted_job_is_stored_and_awaits_its_initial_model(runner, tmp_path):
    job_id = await submit(runner, pack(hello_job(tmp_path), 1 << 20), ("admin", "hospital-a"))
    record = runner.store.get(job_id)
    assert (
        record.name,
        record.status,
        record.num_rounds,
        record.submitter,
        record.submitter_org,
    ) == ("hello-numpy", JobStatus.SUBMITTED, 2, "admin", "hospital-a")
    assert (runner.job_dir(job_id) / "app" / "job.toml").exists()


async def test_refused_package_leaves_no_job_behind(runner, tmp_path):
    job_dir = hello_job(tmp_path)
    package = pack(job_dir, 1 << 20)
    (job_dir / "job.toml").write_text("extra = 1\n" + (job_dir / "job.toml").read_text())
    with pytest.raises(ConfigError, match="job.toml: extra: unknown key"):
        await submit(runner, raw_pack(job_dir), ADMIN)  # the server checks again what admins send
    with pytest.raises(JobError):
        await submit(runner, package[:-8], ADMIN)  # truncated: not a zip any more
    assert runner.store.list() == []
    assert not runner.jobs_dir.exists() or list(runner.jobs_dir.iterdir()) == []


def raw_pack(job_dir):
    """A package of `job_dir` without the client-side validation `pack` does."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(job_dir.iterdir()):
            if path.is_file():
                archive.write(path, path.name)
    return base64.b64encode(buffer.getvalue()).decode()


async def test_aborting_a_queued_job_marks_it_aborted(runner, tmp_path):
    job_id = await submit(runner, pack(hello_job(tmp_path), 1 << 20), ADMIN)
    runner.abort(job_id)
    record = runner.store.get(job_id)
    assert record.status is JobStatus.ABORTED and "before it started" in record.error
    with pytest.raises(JobError, match="already aborted"):
        runner.abort(job_id)
    with pytest.raises(JobError, match="no job"):
        runner.abort("000000000000")


async def test_watch_delivers_the_ending_even_if_the_job_ends_during_the_replay(runner, tmp_path):
    job_id = await submit(runner, pack(hello_job(tmp_path), 1 << 20), ADMIN)
    bus = runner.events(job_id)
    bus.emit("job.started", job=job_id)
    bus.emit("round.started", job=job_id, round=0)
    watch = runner.watch(job_id)
    first = await anext(watch)  # the watcher is part-way through the past events...
    bus.emit("round.complete", job=job_id, round=0)  # ...when the job finishes
    bus.emit("job.finished", job=job_id)
    runner.store.update(job_id, status=JobStatus.FINISHED)
    rest = [record async for record in watch]
    assert [r["event"] for r in [first, *rest]] == [
        "job.started",
        "round.started",
        "round.complete",
        "job.finished",
    ]


async def test_watch_replays_a_finished_job_and_ends(runner, tmp_path):
    job_id = await submit(runner, pack(hello_job(tmp_path), 1 << 20), ADMIN)
    bus = runner.events(job_id)
    for name in ("job.started", "round.complete", "job.finished"):
        bus.emit(name, job=job_id)
    runner.store.update(job_id, status=JobStatus.FINISHED)
    records = [record async for record in runner.watch(job_id)]
    assert [r["event"] for r in records] == ["job.started", "round.complete", "job.finished"]


async def test_watch_follows_live_events_until_the_end(runner, tmp_path):
    job_id = await submit(runner, pack(hello_job(tmp_path), 1 << 20), ADMIN)
    bus = runner.events(job_id)
    bus.emit("job.started", job=job_id)

    async def collect():
        return [record["event"] async for record in runner.watch(job_id)]

    watcher = asyncio.create_task(collect())
    await asyncio.sleep(0)  # the watcher subscribes and replays
    await asyncio.sleep(0)
    bus.emit("round.complete", job=job_id, round=0)
    bus.emit("job.failed", job=job_id, error="boom")
    assert await asyncio.wait_for(watcher, 10) == ["job.started", "round.complete", "job.failed"]


@pytest.mark.parametrize(
    "model, error",
    [
        ({}, "the job brings no initial model"),
        ({"module": "model", "build": "server"}, "this server runs no job code"),
        ({"file": "pretrained.safetensors"}, "not a file in the server's model_dirs"),
    ],
    ids=["no_source", "build_on_a_server_without_custom_code", "file_outside_model_dirs"],
)
async def test_a_job_whose_round_zero_this_server_cannot_have_is_refused_at_submission(
    runner, tmp_path, model, error
):
    job_dir = hello_job(tmp_path)
    config = tomllib.loads((job_dir / "job.toml").read_text())
    config["model"] = model
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    with pytest.raises(JobError, match=error):
        await runner.submit(pack(job_dir, 1 << 20), ADMIN, None)
    assert runner.store.list() == [] and not list(runner.jobs_dir.glob("*"))


@pytest.mark.parametrize(
    "change, error",
    [
        (
            lambda m: Manifest(m.tensors, 1 << 20),
            "chunks of 1048576 bytes; this server's are 4194304",
        ),
        (lambda m: Manifest.build([("w", "F32", (8,))], 4 << 20), "with their digests"),
        (
            lambda m: Manifest.build([("w", "F32", (1 << 41,))], 4 << 20).with_digests(["00"]),
            "max_model_gib",
        ),
    ],
    ids=["other_chunk_size", "no_digests", "too_large"],
)
async def test_an_announced_initial_model_the_server_would_not_take_is_refused(
    runner, tmp_path, change, error
):
    with pytest.raises(JobError, match=error):
        await runner.submit(pack(hello_job(tmp_path), 1 << 20), ADMIN, change(INITIAL))
