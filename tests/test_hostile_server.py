"""A site treats everything a server sends as hostile: a real site process, provisioned as in a
POC, connects to a server the test plays by hand (with the server's own kit, mutual TLS) that
sends it broken job packages, malformed messages and hostile manifests. The site refuses each,
reports it as that task's failure where there is a task, and stays connected."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, edit_configs, hauler, ok, process_gone

from hauler.core.config import ServerConfig, load_toml
from hauler.core.messages import (
    DeployJob,
    Heartbeat,
    Hello,
    Task,
    TaskFailed,
    Welcome,
    encode,
    parse_site_message,
)
from hauler.model import Manifest
from hauler.transport import ControlServer

EXECUTOR = {"module": "train", "script": None, "mode": "in_process", "config": {}}
GOOD_FILES = {
    "job.toml": 'name = "x"\n[executor]\nmodule = "train"\n',
    "train.py": "def train(m, c): pass\n",
}


def zipped(entries: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def bad_crc() -> bytes:
    data = bytearray(zipped({name: text.encode() for name, text in GOOD_FILES.items()}))
    position = data.index(b"def train")  # stored, so the bytes are there as they are
    data[position] ^= 0x01
    return bytes(data)


def lying_size() -> bytes:
    """The central directory says train.py is 3 bytes long; it is longer."""
    data = bytearray(zipped({name: text.encode() for name, text in GOOD_FILES.items()}))
    central = data.index(b"PK\x01\x02", data.index(b"train.py") + 1)
    while data[central + 46 : central + 54] != b"train.py":
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24 : central + 28] = (3).to_bytes(4, "little")  # uncompressed size
    return bytes(data)


PACKAGES = {
    "not_a_zip": b"hello, site",
    "bad_crc": bad_crc(),
    "lying_size": lying_size(),
    "file_and_folder_share_a_name": zipped(
        {
            **{k: v.encode() for k, v in GOOD_FILES.items()},
            "lib": b"a file",
            "lib/inner.py": b"x = 1",
        }
    ),
    "escapes_the_folder": zipped(
        {**{k: v.encode() for k, v in GOOD_FILES.items()}, "../evil.py": b"x"}
    ),
}


class HostileServer:
    """Plays the server: welcomes the site, then sends what the test gives and records replies."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[dict[str, Any] | bytes] = asyncio.Queue()
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.heartbeats = 0
        self.sessions = 0

    async def session(self, stream, peer) -> None:
        hello = parse_site_message(await stream.receive() or {})
        assert isinstance(hello, Hello)
        self.sessions += 1
        await stream.send(encode(Welcome(site=hello.site)))

        async def pump() -> None:
            while True:
                await stream.send(await self.outbox.get())

        sender = asyncio.ensure_future(pump())
        try:
            while (message := await stream.receive()) is not None:
                parsed = parse_site_message(message)
                if isinstance(parsed, Heartbeat):
                    self.heartbeats += 1
                else:
                    await self.replies.put(parsed)
        finally:
            sender.cancel()

    async def reply(self, timeout_s: float = 20.0) -> Any:
        return await asyncio.wait_for(self.replies.get(), timeout_s)

    async def heartbeat_after(self, count: int, timeout_s: float = 20.0) -> None:
        async def wait() -> None:
            while self.heartbeats <= count:
                await asyncio.sleep(0.1)

        await asyncio.wait_for(wait(), timeout_s)


def task_for(job_id: str, task_id: str, manifest: dict | None = None) -> bytes:
    manifest = manifest or Manifest.build([("w", "F32", (4,))], 4096).to_json()
    return encode(
        Task(task_id=task_id, job_id=job_id, round=0, manifest=manifest, download="0" * 32)
    )


@pytest.fixture
def site_against_hostile_server(tmp_path):
    workspace = tmp_path / "poc"
    ok(hauler("poc", "prepare", "--workspace", workspace, "--sites", 1))
    edit_configs(workspace, "timeouts", {"heartbeat_interval": 0.5}, roles="sites")
    log = open(tmp_path / "site-1.log", "wb")
    site = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hauler",
            "client",
            "--config",
            str(workspace / "site-1" / "site.toml"),
        ],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        yield load_toml(ServerConfig, workspace / "server" / "server.toml"), site
    finally:
        site.kill()
        site.wait()
        log.close()


async def play(server_config: ServerConfig, script) -> HostileServer:
    hostile = HostileServer()

    async def nothing(request, peer):
        return {}

    async def no_events(request, peer):
        return
        yield

    control = ControlServer(session=hostile.session, call=nothing, watch=no_events)
    await control.start(server_config.host, server_config.control_port, server_config.tls)
    try:
        await asyncio.wait_for(_connected(hostile), 30)
        await script(hostile)
    finally:
        await control.stop(0)
    return hostile


async def _connected(hostile: HostileServer) -> None:
    while not hostile.sessions:
        await asyncio.sleep(0.1)


def test_broken_packages_and_messages_are_refused_and_the_site_stays_up(
    site_against_hostile_server,
):
    server_config, site = site_against_hostile_server

    async def script(hostile: HostileServer) -> None:
        for index, (kind, package) in enumerate(PACKAGES.items()):
            job_id = f"job{index}"
            await hostile.outbox.put(
                encode(
                    DeployJob(
                        job_id=job_id,
                        package_b64=base64.b64encode(package).decode(),
                        executor=EXECUTOR,
                    )
                )
            )
            await hostile.outbox.put(task_for(job_id, f"task{index}"))
            reply = await hostile.reply()
            assert isinstance(reply, TaskFailed) and reply.task_id == f"task{index}", (kind, reply)
            assert "job package" in reply.error, (kind, reply.error)
        for malformed in (
            {"type": "task"},
            {"type": "no such message"},
            {"type": "deploy_job", "job_id": 1},
            {"type": "upload_ready", "task_id": "unknown", "upload": "x"},
        ):
            await hostile.outbox.put(malformed)
        huge = Manifest.build(
            [("w", "F32", (1 << 44,))], 4096
        ).to_json()  # 64 TiB: over max_model_gib
        await hostile.outbox.put(
            encode(
                DeployJob(
                    job_id="good",
                    executor=EXECUTOR,
                    package_b64=base64.b64encode(
                        zipped({k: v.encode() for k, v in GOOD_FILES.items()})
                    ).decode(),
                )
            )
        )
        await hostile.outbox.put(task_for("good", "huge", huge))
        while (reply := await hostile.reply()).task_id != "huge":  # "unknown": no result to upload
            assert isinstance(reply, TaskFailed) and reply.task_id == "unknown", reply
        assert isinstance(reply, TaskFailed) and "max_model_gib" in reply.error, reply
        await hostile.heartbeat_after(hostile.heartbeats)  # the session is still up and beating
        assert hostile.sessions == 1

    asyncio.run(play(server_config, script))
    assert not process_gone(site.pid)
    site_jobs = Path(server_config.workspace).parent / "site-1" / "jobs"
    assert not list(site_jobs.glob("job*/app"))  # nothing of a refused package is left
