"""The admin API: submit, list, inspect, abort and download jobs on a running server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from hauler.core.config import AdminConfig, DataPlane, JobConfig
from hauler.core.errors import ConfigError
from hauler.core.events import TrackTransfer, untracked
from hauler.core.package import load_job, pack
from hauler.model import ChunkPlan, Manifest, ModelFile
from hauler.model.initial import build_in_child
from hauler.transfer import FileSink, ReceiveLedger
from hauler.transport import ControlChannel, DataAddress, fetch_model, push_model

MAX_PACKAGE_BYTES = 16 << 20
BUILD_ROOT = Path.home() / ".cache" / "hauler"  # a disk, not /tmp (often RAM): models are large


class Admin:
    """One admin's connection to the server; use as `async with Admin(config) as admin:`."""

    def __init__(
        self, config: AdminConfig, *, on_wait: Callable[[str], None] | None = None
    ) -> None:
        """`on_wait` is told when the server is there but slow to answer."""
        self.config = config
        self.on_wait = on_wait
        self._channel = ControlChannel(config.server_host, config.control_port, config.tls)

    async def __aenter__(self) -> Admin:
        await self._channel.wait_ready(
            self.config.timeouts.communication_timeout, on_wait=self.on_wait
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def submit(
        self, job_dir: Path, *, initial_model: Path | None = None, track: TrackTransfer = untracked
    ) -> str:
        """Package and submit a job folder with its initial model; returns the job id.

        The initial model is `initial_model` if given, else built here from the job's model
        module (the author's code, run where its author runs it), unless the job names a file
        of the server's or asks the server to build it. Either way it is uploaded on the data
        plane, chunked and verified; `track` is told of the upload's progress."""
        job = load_job(job_dir)
        package = pack(job_dir, MAX_PACKAGE_BYTES)
        chunk_bytes = int((await self._channel.call("info"))["chunk_bytes"])
        async with initial_model_file(job_dir, job, chunk_bytes, initial_model) as path:
            if path is None:
                return str((await self._channel.call("submit", package_b64=package))["job_id"])
            with ModelFile.open(path, chunk_bytes=chunk_bytes) as model:
                manifest = await asyncio.to_thread(model.compute_digests)
                reply = await self._channel.call(
                    "submit", package_b64=package, initial_manifest=manifest.to_json()
                )
                upload = reply["upload"]
                await push_model(
                    self._data_address,
                    upload["transfer"],
                    ChunkPlan(manifest),
                    model,
                    int(upload["lanes"]),
                    timeouts=self.config.timeouts,
                    on_progress=track("initial model upload", manifest.total_bytes),
                )
            return str(reply["job_id"])

    @property
    def _data_address(self) -> DataAddress:
        return DataAddress(
            self.config.server_host, self.config.data_port, self.config.tls, DataPlane()
        )

    async def list_jobs(self) -> list[dict[str, Any]]:
        return (await self._channel.call("list_jobs"))["jobs"]

    async def status(self, job_id: str) -> dict[str, Any]:
        return await self._channel.call("status", job_id=job_id)

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every metrics record of the job (rounds, sites, resource samples)."""
        return await self._pages("metrics", job_id)

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events so far (`watch` follows them live)."""
        return await self._pages("events", job_id)

    async def logs(self, job_id: str) -> list[dict[str, Any]]:
        """The job's log lines: the server's, and its sites' (if this admin may read them)."""
        return await self._pages("logs", job_id)

    async def _pages(self, op: str, job_id: str) -> list[dict[str, Any]]:
        """A job's file of records, fetched page by page (a page is at most a few MiB)."""
        records: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await self._channel.call(op, job_id=job_id, offset=offset)
            if not page["records"]:
                return records
            records.extend(page["records"])
            offset = page["next_offset"]

    async def abort(self, job_id: str) -> None:
        await self._channel.call("abort", job_id=job_id)

    async def delete(self, job_id: str) -> None:
        """Remove an ended job's files from the server and its sites, and its record."""
        await self._channel.call("delete", job_id=job_id)

    async def sites(self) -> list[dict[str, Any]]:
        return (await self._channel.call("sites"))["sites"]

    def watch(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's events from its start, live, until it ends."""
        return self._channel.watch(job_id=job_id)

    async def download(self, job_id: str, out_dir: Path) -> tuple[Path, int]:
        """Fetch the job's latest global model as `out_dir/global.safetensors`; returns it and its
        round."""
        offer = await self._channel.call("download", job_id=job_id)
        manifest = Manifest.from_json(offer["manifest"])
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "global.safetensors"
        partial = out_dir / ".global.safetensors.partial"
        with ModelFile.create(partial, manifest) as model:
            plan = ChunkPlan(manifest)
            await fetch_model(
                self._data_address,
                offer["transfer"],
                ReceiveLedger(plan, offer["lanes"]),
                FileSink(model, plan),
                timeouts=self.config.timeouts,
            )
            model.flush()
        os.replace(partial, final)
        return final, int(offer["round"])


@contextlib.asynccontextmanager
async def initial_model_file(
    job_dir: Path, job: JobConfig, chunk_bytes: int, given: Path | None
) -> AsyncIterator[Path | None]:
    """The file to upload as the job's round 0: `given`, or one built here from the job's model
    module (removed afterwards); None when the server makes round 0 itself."""
    if given is not None:
        yield given
        return
    if job.model.file is not None or job.model.build == "server":
        yield None
        return
    if job.model.module is None:
        raise ConfigError(
            f"{job_dir}: job.toml names no [model] module or file; name one, or give "
            "the initial model with `hauler submit --initial-model FILE`"
        )
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="initial-", dir=BUILD_ROOT))
    try:
        yield await build_in_child(
            job_dir, job.model.module, job.model.config, chunk_bytes, folder / "initial.safetensors"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
