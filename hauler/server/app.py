"""The server process: control plane, data plane, site registry and job runner together.

`Server.serve()` runs until cancelled. Sites dial in (the server never dials out);
admins call the same control port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hauler.core import logs
from hauler.core.config import ServerConfig
from hauler.core.errors import ConfigError, HaulerError, RemoteProtocolError
from hauler.core.events import read_json_lines, read_json_lines_page
from hauler.core.messages import Heartbeat, Hello, Welcome, encode, parse_site_message
from hauler.model import ChunkPlan, Manifest
from hauler.model.rounds import RoundStore
from hauler.server.access import AccessPolicy, sees_private, submitter
from hauler.server.joblogs import LOGS_FILE
from hauler.server.jobstore import PRIVATE_ERROR, JobStore
from hauler.server.lock import WorkspaceLock
from hauler.server.refusals import RefusalLog
from hauler.server.runner import JobRunner
from hauler.server.sites import SiteRegistry
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
TRACEMALLOC_VARIABLE = "HAULER_TRACEMALLOC_DIR"


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        config.workspace.mkdir(parents=True, exist_ok=True)
        self._lock = WorkspaceLock(config.workspace)  # before anything of the workspace is read
        self.store = JobStore(config.workspace / "jobs.sqlite")
        self.sites = SiteRegistry(grace_s=config.timeouts.communication_timeout)
        self.access = AccessPolicy(config.revoked)
        self.refusals = RefusalLog()
        self.transfers = TransferRegistry(
            config.dataplane, config.timeouts, self.access, self.refusals
        )
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
        self.control_port = await control.start(
            self.config.host, self.config.control_port, self.config.tls
        )
        self._data = await listen(
            self.config.host,
            self.config.data_port,
            self.transfers.handle,
            tls=self.config.tls,
            congestion_control=self.config.dataplane.congestion_control,
            handshake_timeout_s=self.config.dataplane.hello_timeout_s,
        )
        self.data_port = self._data.port
        log.info(
            "server listening",
            extra={"control_port": self.control_port, "data_port": self.data_port},
        )
        _trace_allocations()
        self.runner.requeue_unfinished()
        logging.getLogger(logs.ROOT).addHandler(self.runner.joblogs)
        try:
            async with asyncio.TaskGroup() as group:
                self._background = group
                group.create_task(self.runner.run_forever())
                group.create_task(self.runner.resources.sample_server())
                self.ready.set()
        finally:
            logging.getLogger(logs.ROOT).removeHandler(self.runner.joblogs)
            self.runner.resources.close_all()
            await self._data.close()
            await control.stop()
            self.store.close()
            self._lock.release()

    async def _session(self, stream: MessageStream, peer: Peer) -> None:
        hello = await self._hello(stream, peer)
        await stream.send(encode(Welcome(site=hello.site)))  # first: a rejoin sends what waited
        session = await self.sites.join(
            hello.site, hello.instance, stream, org="" if peer is None else peer.org
        )
        log.info("site joined", extra={"site": hello.site, "instance": hello.instance})
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
                session.heartbeat_s = time.time()
                if isinstance(parsed, Heartbeat):
                    self.runner.resources.record(hello.site, parsed.resources)
                    self.runner.joblogs.record(hello.site, parsed.logs)
                elif not isinstance(parsed, Hello):
                    session.deliver(parsed)
        except HaulerError as error:
            reason = str(error)
            self.refusals.refused(hello.site, "message", reason)
        finally:
            self.sites.leave(session, stream, reason)
            log.info("site left", extra={"site": hello.site, "reason": reason})

    async def _hello(self, stream: MessageStream, peer: Peer) -> Hello:
        """A site's first message, due within hello_timeout_s, from the site its certificate
        names."""
        who = "(plaintext peer)" if peer is None else peer.name
        try:
            async with asyncio.timeout(self.config.dataplane.hello_timeout_s):
                hello = parse_site_message(await stream.receive() or {})
            if not isinstance(hello, Hello):
                raise RemoteProtocolError("a site's first message must be hello")
            self.access.check_site(peer, hello.site)
        except TimeoutError:
            self.refusals.refused(who, "hello", "no hello in time")
            raise RemoteProtocolError(
                f"no hello within {self.config.dataplane.hello_timeout_s:g} s"
            ) from None
        except HaulerError as error:
            self.refusals.refused(who, "hello", str(error))
            raise
        return hello

    async def _call(self, request: Message, peer: Peer) -> Message:
        op = str(request.get("op"))
        if op in ("status", "metrics", "events", "logs", "abort", "delete", "download"):
            job_id = _job_id(request)
            self.access.check_admin(peer, op, self.store.get(job_id).submitter_org)
        else:
            self.access.check_admin(peer, op)
        if op == "submit":
            return await self._submit(request, peer)
        if op == "info":
            return {
                "chunk_bytes": self.config.dataplane.chunk_bytes,
                "max_model_bytes": int(self.config.max_model_gib * 2**30),
            }
        if op == "list_jobs":
            return {
                "jobs": [
                    r.to_json(private=sees_private(peer, r.submitter)) for r in self.store.list()
                ]
            }
        if op == "status":
            return self._status(job_id, peer)
        if op == "metrics":
            return self._page(job_id, "metrics.jsonl", request.get("offset", 0))
        if op == "events":
            return self._events(job_id, request.get("offset", 0), peer)
        if op == "logs":
            return self._logs(job_id, request.get("offset", 0), peer)
        if op == "delete":
            await self.runner.delete(job_id)
            return {"ok": True}
        if op == "abort":
            self.runner.abort(job_id)
            return {"ok": True}
        if op == "sites":
            return {"sites": [session.describe() for session in self.sites.sites.values()]}
        if op == "download":
            return self._offer_download(job_id, submitter(peer)[0])
        raise ConfigError(f"unknown admin operation {op!r}")

    async def _submit(self, request: Message, peer: Peer) -> Message:
        """Take a job; if it brings its initial model, offer the upload of it on the data plane."""
        announced = request.get("initial_manifest")
        manifest = None if announced is None else Manifest.from_json(announced)
        job_id = await self.runner.submit(
            str(request.get("package_b64", "")), submitter(peer), manifest
        )
        if manifest is None:
            return {"job_id": job_id}
        transfer, model = self.runner.expect_initial(job_id, manifest, submitter(peer)[0])
        assert self._background is not None
        self._background.create_task(self.runner.receive_initial(job_id, transfer, model))
        return {"job_id": job_id, "upload": {"transfer": transfer.id, "lanes": transfer.lanes}}

    def _status(self, job_id: str, peer: Peer) -> Message:
        """The job and its round and site records (its resource samples come with `metrics`)."""
        records = read_json_lines(self.runner.job_dir(job_id) / "metrics.jsonl")
        job = self.store.get(job_id)
        return {
            "job": job.to_json(private=sees_private(peer, job.submitter)),
            "metrics": [record for record in records if record.get("kind") != "resources"],
        }

    def _page(self, job_id: str, name: str, offset: Any) -> Message:
        """One page of a job's file of records from byte `offset`; an empty page means all were
        read."""
        if not isinstance(offset, int) or offset < 0:
            raise ConfigError("offset must be the next_offset of the previous page")
        records, next_offset = read_json_lines_page(
            self.runner.job_dir(job_id) / name, offset, METRICS_PAGE_BYTES
        )
        return {"records": records, "next_offset": next_offset}

    def _logs(self, job_id: str, offset: Any, peer: Peer) -> Message:
        """A page of the job's log lines; its sites' only for its submitter and project admins."""
        page = self._page(job_id, LOGS_FILE, offset)
        if not sees_private(peer, self.store.get(job_id).submitter):
            page["records"] = [entry for entry in page["records"] if not entry.get("private")]
        return page

    def _events(self, job_id: str, offset: Any, peer: Peer) -> Message:
        page = self._page(job_id, "events.jsonl", offset)
        private = sees_private(peer, self.store.get(job_id).submitter)
        page["records"] = [event if private else redacted(event) for event in page["records"]]
        return page

    def _offer_download(self, job_id: str, peer: str) -> Message:
        self.store.get(job_id)
        rounds = RoundStore(self.runner.job_dir(job_id), self.config.keep_rounds)
        latest = rounds.latest()
        if latest is None:
            raise ConfigError(f"job {job_id} has no global model yet")
        model = rounds.open(latest)
        transfer = self.transfers.offer(peer, ChunkPlan(model.manifest), model)
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
        return {
            "transfer": transfer.id,
            "lanes": transfer.lanes,
            "round": latest,
            "manifest": model.manifest.to_json(),
        }

    async def _watch(self, request: Message, peer: Peer) -> AsyncIterator[Message]:
        self.access.check_admin(peer, "watch")
        job_id = _job_id(request)
        private = sees_private(peer, self.store.get(job_id).submitter)
        async for event in self.runner.watch(job_id):
            yield event if private else redacted(event)


def redacted(event: Message) -> Message:
    """An event as those who may not read what a job's own code said see it."""
    return {**event, "error": PRIVATE_ERROR} if event.get("private") else event


def _trace_allocations() -> None:
    """With HAULER_TRACEMALLOC_DIR set, record allocations; each SIGUSR1 then writes a snapshot
    into that folder (`python -m bench.soak --tracemalloc DIR` finds what grows with them)."""
    folder = os.environ.get(TRACEMALLOC_VARIABLE)
    if not folder:
        return
    tracemalloc.start(25)

    def dump() -> None:
        tracemalloc.take_snapshot().dump(
            str(Path(folder) / f"server-{time.time():.3f}.tracemalloc")
        )

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


def _job_id(request: dict[str, Any]) -> str:
    job_id = request.get("job_id")
    if not isinstance(job_id, str) or not job_id.isalnum():
        raise ConfigError("job_id must be the id `hauler jobs list` shows")
    return job_id
