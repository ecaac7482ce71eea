"""The admin API: submit, list, inspect, abort and download jobs on a running server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hauler.core.config import AdminConfig, DataPlane
from hauler.core.package import pack
from hauler.model import ChunkPlan, Manifest, ModelFile
from hauler.transfer import ReceiveLedger
from hauler.transport import ControlChannel, DataAddress, fetch_model

MAX_PACKAGE_BYTES = 16 << 20


class Admin:
    """One admin's connection to the server; use as `async with Admin(config) as admin:`."""

    def __init__(self, config: AdminConfig) -> None:
        self.config = config
        self._channel = ControlChannel(config.server_host, config.control_port, config.tls)

    async def __aenter__(self) -> Admin:
        await self._channel.wait_ready(self.config.timeouts.communication_timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def submit(self, job_dir: Path) -> str:
        """Package and submit a job folder; returns the job id."""
        reply = await self._channel.call("submit", package_b64=pack(job_dir, MAX_PACKAGE_BYTES))
        return str(reply["job_id"])

    async def list_jobs(self) -> list[dict[str, Any]]:
        return (await self._channel.call("list_jobs"))["jobs"]

    async def status(self, job_id: str) -> dict[str, Any]:
        return await self._channel.call("status", job_id=job_id)

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every metrics record of the job (rounds, sites, resource samples), fetched page by page."""
        records: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await self._channel.call("metrics", job_id=job_id, offset=offset)
            if not page["records"]:
                return records
            records.extend(page["records"])
            offset = page["next_offset"]

    async def abort(self, job_id: str) -> None:
        await self._channel.call("abort", job_id=job_id)

    async def sites(self) -> list[dict[str, Any]]:
        return (await self._channel.call("sites"))["sites"]

    def watch(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's events from its start, live, until it ends."""
        return self._channel.watch(job_id=job_id)

    async def download(self, job_id: str, out_dir: Path) -> tuple[Path, int]:
        """Fetch the job's latest global model as `out_dir/global.safetensors`; returns it and its round."""
        offer = await self._channel.call("download", job_id=job_id)
        manifest = Manifest.from_json(offer["manifest"])
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "global.safetensors"
        partial = out_dir / ".global.safetensors.partial"
        address = DataAddress(self.config.server_host, self.config.data_port, self.config.tls, DataPlane())
        with ModelFile.create(partial, manifest) as model:
            await fetch_model(address, offer["transfer"], ReceiveLedger(ChunkPlan(manifest), offer["lanes"]), model,
                              timeouts=self.config.timeouts)
            model.flush()
        os.replace(partial, final)
        return final, int(offer["round"])
