"""The server process: control plane, data plane, site registry and job runner together.

`Server.serve()` runs until cancelled. Sites dial in (the server never dials out);
admins call the same control port.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from hauler.core.config import ServerConfig
from hauler.core.errors import ConfigError, HaulerError, RemoteProtocolError
from hauler.core.events import read_json_lines, read_json_lines_page
from hauler.core.messages import Heartbeat, Hello, Welcome, parse_site_message
from hauler.server.access import AccessPolicy, submitter
from hauler.server.jobstore import JobStore
from hauler.server.rounds import RoundStore
from hauler.server.runner import JobRunner
from hauler.server.sites import SiteRegistry, SiteSession
from hauler.server.transfers import TransferRegistry
from hauler.transport import (
    ControlServer,
    Listener,
    Message,
    MessageStream,
    Peer,
    listen,
)

log = logging.getLogger("hauler.server")
METRICS_PAGE_BYTES = 4 << 20  # well under the control plane's message limit


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        config.workspace.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(config.workspace / "jobs.sqlite")
        self.sites = SiteRegistry()
        self.access = AccessPolicy(config.revoked)
        self.transfers = TransferRegistry(config.dataplane, config.timeouts, self.access)
        self.runner = JobRunner(config, self.store, self.sites, self.transfers)
        self.control_port = self.data_port = 0
        self._data: Listener | None = None
        self._background: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()

    async def serve(self) -> None:
        """Listen on both planes and run jobs until cancelled."""
        if self.config.tls is None:
            log.warning("plaintext server: no TLS, no identities; for local trials only")
        control = ControlServer(session=self._session, call=self._call, watch=self._watch)
        self.control_port = await control.start(self.config.host, self.config.control_port, self.config.tls)
        self._data = await listen(self.config.host, self.config.data_port, self.transfers.handle, tls=self.config.tls,
                                  congestion_control=self.config.dataplane.congestion_control)
        self.data_port = self._data.port
        log.info("server listening", extra={"control_port": self.control_port, "data_port": self.data_port})
        self.runner.requeue_unfinished()
        try:
            async with asyncio.TaskGroup() as group:
                self._background = group
                group.create_task(self.runner.run_forever())
                group.create_task(self.runner.resources.sample_server())
                self.ready.set()
        finally:
            self.runner.resources.close_all()
            await self._data.close()
            await control.stop()
            self.store.close()

    async def _session(self, stream: MessageStream, peer: Peer) -> None:
        first = await stream.receive()
        hello = parse_site_message(first or {})
        if not isinstance(hello, Hello):
            raise RemoteProtocolError("a site's first message must be hello")
        self.access.check_site(peer, hello.site)
        session = SiteSession(hello.site, stream)
        await self.sites.join(session)
        await session.send(Welcome(site=hello.site))
        log.info("site joined", extra={"site": hello.site})
        reason = "closed the stream"
        try:
            silence = self.config.timeouts.heartbeat_interval * 6
            while True:
                try:
                    async with asyncio.timeout(silence):
                        message = await stream.receive()
                except TimeoutError:
                    reason = f"no heartbeat for {silence:g} s"
                    break
                if message is None:
                    break
                parsed = parse_site_message(message)
                if isinstance(parsed, Heartbeat):
                    self.runner.resources.record(hello.site, parsed.resources)
                elif not isinstance(parsed, Hello):
                    session.deliver(parsed)
        except HaulerError as error:
            reason = str(error)
        finally:
            await self.sites.leave(session, reason)
            log.info("site left", extra={"site": hello.site, "reason": reason})

    async def _call(self, request: Message, peer: Peer) -> Message:
        op = str(request.get("op"))
        if op in ("status", "metrics", "abort", "download"):
            job_id = _job_id(request)
            self.access.check_admin(peer, op, self.store.get(job_id).submitter_org)
        else:
            self.access.check_admin(peer, op)
        if op == "submit":
            return {"job_id": self.runner.submit(str(request.get("package_b64", "")), submitter(peer))}
        if op == "list_jobs":
            return {"jobs": [record.to_json() for record in self.store.list()]}
        if op == "status":
            return self._status(job_id)
        if op == "metrics":
            return self._metrics(job_id, request.get("offset", 0))
        if op == "abort":
            self.runner.abort(job_id)
            return {"ok": True}
        if op == "sites":
            return {"sites": [{"name": s.name, "connected_s": s.connected_s} for s in self.sites.sites.values()]}
        if op == "download":
            return self._offer_download(job_id, submitter(peer)[0])
        raise ConfigError(f"unknown admin operation {op!r}")

    def _status(self, job_id: str) -> Message:
        """The job and its round and site records (its resource samples come with `metrics`)."""
        records = read_json_lines(self.runner.job_dir(job_id) / "metrics.jsonl")
        return {"job": self.store.get(job_id).to_json(),
                "metrics": [record for record in records if record.get("kind") != "resources"]}

    def _metrics(self, job_id: str, offset: Any) -> Message:
        """One page of the job's metrics records from byte `offset`; an empty page means all were read."""
        if not isinstance(offset, int) or offset < 0:
            raise ConfigError("offset must be the next_offset of the previous metrics page")
        records, next_offset = read_json_lines_page(self.runner.job_dir(job_id) / "metrics.jsonl", offset,
                                                    METRICS_PAGE_BYTES)
        return {"records": records, "next_offset": next_offset}

    def _offer_download(self, job_id: str, peer: str) -> Message:
        self.store.get(job_id)
        rounds = RoundStore(self.runner.job_dir(job_id), self.config.keep_rounds)
        latest = rounds.latest()
        if latest is None:
            raise ConfigError(f"job {job_id} has no global model yet")
        model = rounds.open(latest)
        transfer = self.transfers.offer(peer, model.manifest, model)
        assert self._background is not None

        async def serve_then_forget() -> None:
            try:
                await transfer.wait(self.config.timeouts.communication_timeout, "admin download")
            except HaulerError:
                pass
            finally:
                self.transfers.discard(transfer)
                model.close()

        self._background.create_task(serve_then_forget())
        return {"transfer": transfer.id, "lanes": transfer.lanes, "round": latest, "manifest": model.manifest.to_json()}

    async def _watch(self, request: Message, peer: Peer) -> AsyncIterator[Message]:
        self.access.check_admin(peer, "watch")
        async for event in self.runner.watch(_job_id(request)):
            yield event


def _job_id(request: dict[str, Any]) -> str:
    job_id = request.get("job_id")
    if not isinstance(job_id, str) or not job_id.isalnum():
        raise ConfigError("job_id must be the id `hauler jobs list` shows")
    return job_id
