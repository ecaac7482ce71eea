"""Who may do what, on a real TLS server on loopback: foreign certificates, other sites'
transfers, admin roles, hostile job packages. The test plays sites and admins with their
own startup kits, over real gRPC and data-plane connections."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from hauler.admin import Admin
from hauler.core.config import AdminConfig, ServerConfig, SiteConfig, load_toml
from hauler.core.errors import ConnectionLost, HaulerError, SecurityError
from hauler.core.messages import (
    Hello,
    ResultReady,
    Task,
    TaskFailed,
    UploadReady,
    Welcome,
    encode,
    parse_server_message,
)
from hauler.core.package import pack
from hauler.model import ChunkPlan, Manifest, ModelFile
from hauler.security import provision
from hauler.server import Server
from hauler.transfer import FileSink, Kind, ReceiveLedger
from hauler.transport import (
    ControlChannel,
    DataAddress,
    connect,
    fetch_model,
    open_transfer,
)
from hauler.transport.connection import Connection

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello-numpy"
FAST = {"communication_timeout": 5.0, "streaming_read_timeout": 5.0, "streaming_ack_wait": 5.0}


def _project(tmp_path: Path, name: str) -> Path:
    project = {
        "name": name,
        "server": {"host": "127.0.0.1", "control_port": 1, "data_port": 2},
        "sites": [{"name": "site-1", "org": "a"}, {"name": "site-2", "org": "b"}],
        "admins": [
            {"name": "alice", "org": "a", "role": "project_admin"},
            {"name": "oscar", "org": "b", "role": "org_admin"},
            {"name": "mike", "org": "a", "role": "member"},
        ],
    }
    folder = tmp_path / name
    folder.mkdir()
    (folder / "project.yml").write_text(yaml.safe_dump(project))
    provision(folder / "project.yml", folder / "kits")
    return folder / "kits"


@pytest.fixture
def kits(tmp_path):
    """Startup kits of our project, and of a foreign project with its own CA."""
    return _project(tmp_path, "ours"), _project(tmp_path, "theirs")


@contextlib.asynccontextmanager
async def serving(kits: Path, revoked: tuple[str, ...] = (), **settings: object):
    """A real TLS server from its kit, on free loopback ports, inside the test's event loop."""
    config = load_toml(
        ServerConfig,
        kits / "server" / "server.toml",
        control_port=0,
        data_port=0,
        timeouts=FAST,
        revoked=list(revoked),
        **settings,
    )
    server = Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.ready.wait(), 10)
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _site(kits: Path, name: str, server: Server) -> SiteConfig:
    return load_toml(
        SiteConfig,
        kits / name / "site.toml",
        control_port=server.control_port,
        data_port=server.data_port,
        timeouts=FAST,
    )


def _admin(kits: Path, name: str, server: Server) -> AdminConfig:
    return load_toml(
        AdminConfig,
        kits / name / "admin.toml",
        control_port=server.control_port,
        data_port=server.data_port,
        timeouts=FAST,
    )


def _job(tmp_path: Path) -> Path:
    job = tmp_path / "job"
    shutil.copytree(EXAMPLE, job, dirs_exist_ok=True)
    text = (
        (EXAMPLE / "job.toml")
        .read_text()
        .replace("arrays = 64, array_mib = 16", "arrays = 2, array_bytes = 40000")
    )
    (job / "job.toml").write_text(
        text.replace("num_rounds = 3", "num_rounds = 1").replace(
            "min_clients = 2", "min_clients = 1"
        )
    )
    return job


async def _join(config: SiteConfig):
    """Open a site session as `config` says and say hello; returns the stream and channel."""
    channel = ControlChannel(config.server_host, config.control_port, config.tls)
    stream = channel.session()
    await stream.send(encode(Hello(site=config.name)))
    return channel, stream


async def _next(stream, kind):
    while True:
        message = parse_server_message(await asyncio.wait_for(stream.receive(), 10))
        if isinstance(message, kind):
            return message


async def _refused_on_data_plane(connection: Connection) -> str:
    """The server's answer to a HELLO it must refuse: an ERROR frame, then the connection ends."""
    frame = await asyncio.wait_for(connection.next_frame(), 10)
    assert frame.header.kind is Kind.ERROR
    return frame.payload.decode()


async def test_foreign_missing_and_plaintext_clients_are_refused_on_both_planes(kits):
    kits, foreign = kits
    async with serving(kits) as server:
        await _foreign_missing_and_plaintext(kits, foreign, server)


async def _foreign_missing_and_plaintext(kits: Path, foreign: Path, server: Server) -> None:
    stranger = _site(foreign, "site-1", server)
    with pytest.raises((SecurityError, ConnectionLost)):
        channel, stream = await _join(stranger)
        await asyncio.wait_for(stream.receive(), 10)
    plaintext = stranger.model_copy(update={"tls": None})
    with pytest.raises(ConnectionLost):
        async with Admin(_admin(kits, "alice", server).model_copy(update={"tls": None})):
            pass
    for tls in (stranger.tls, None):
        with pytest.raises((SecurityError, ConnectionLost)):
            connection = await connect("127.0.0.1", server.data_port, tls=tls)
            connection.write(b"HLR1" + bytes(28))
            await asyncio.wait_for(connection.next_frame(), 10)
    assert plaintext.tls is None
    # The server still serves the legitimate participants.
    async with Admin(_admin(kits, "alice", server)) as admin:
        assert await admin.list_jobs() == []


async def test_a_site_cannot_use_another_sites_transfers(kits, tmp_path):
    async with serving(kits[0]) as server:
        await _other_sites_transfers(kits[0], server, tmp_path)


async def _other_sites_transfers(kits: Path, server: Server, tmp_path: Path) -> None:
    site_1, site_2 = _site(kits, "site-1", server), _site(kits, "site-2", server)
    channel_1, stream_1 = await _join(site_1)
    assert isinstance(parse_server_message(await stream_1.receive()), Welcome)
    async with Admin(_admin(kits, "alice", server)) as admin:
        await admin.submit(_job(tmp_path))
    task = await _next(stream_1, Task)
    intruder = await open_transfer("127.0.0.1", server.data_port, task.download, tls=site_2.tls)
    assert "site-2 may not use a transfer of site-1" in await _refused_on_data_plane(intruder)

    manifest = Manifest.from_json(task.manifest)
    with ModelFile.create(tmp_path / "site-1.safetensors", manifest) as model:
        address = DataAddress("127.0.0.1", server.data_port, site_1.tls, site_1.dataplane)
        plan = ChunkPlan(manifest)
        await fetch_model(
            address,
            task.download,
            ReceiveLedger(plan, task.lanes),
            FileSink(model, plan),
            timeouts=site_1.timeouts,
        )
        trained = model.compute_digests()
    await stream_1.send(
        encode(ResultReady(task_id=task.task_id, weight=1, manifest=trained.to_json()))
    )
    ready = await _next(stream_1, UploadReady)
    intruder = await open_transfer("127.0.0.1", server.data_port, ready.upload, tls=site_2.tls)
    assert "site-2 may not use a transfer of site-1" in await _refused_on_data_plane(intruder)
    await channel_1.close()


async def test_a_site_cannot_claim_another_sites_name(kits):
    async with serving(kits[0]) as server:
        impostor = _site(kits[0], "site-2", server).model_copy(update={"name": "site-1"})
        channel, stream = await _join(impostor)
        with pytest.raises(SecurityError, match="cannot act as site 'site-1'"):
            await asyncio.wait_for(stream.receive(), 10)
        await channel.close()


@pytest.mark.parametrize("operation", ["submit", "abort"])
async def test_a_member_can_read_but_not_submit_or_abort(kits, tmp_path, operation):
    kits = kits[0]
    async with serving(kits) as server:
        async with Admin(_admin(kits, "alice", server)) as alice:
            job_id = await alice.submit(_job(tmp_path))
        async with Admin(_admin(kits, "mike", server)) as mike:
            assert [job["id"] for job in await mike.list_jobs()] == [job_id]
            with pytest.raises(SecurityError, match="mike .member, a. may not"):
                await (mike.submit(_job(tmp_path)) if operation == "submit" else mike.abort(job_id))


async def test_an_org_admin_manages_only_its_organisations_jobs(kits, tmp_path):
    kits = kits[0]
    async with serving(kits) as server:
        async with Admin(_admin(kits, "alice", server)) as alice:
            job_id = await alice.submit(_job(tmp_path))
        async with Admin(_admin(kits, "oscar", server)) as oscar:
            with pytest.raises(SecurityError, match="may not abort this job"):
                await oscar.abort(job_id)
            own = await oscar.submit(_job(tmp_path))
            await oscar.abort(own)


def _package(entries: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("entry", ["../evil.py", "/etc/evil.py", "app/../../evil.py"])
async def test_a_job_package_escaping_its_folder_is_refused_naming_the_entry(kits, tmp_path, entry):
    async with serving(kits[0]) as server:
        await _escaping_package(kits[0], server, tmp_path, entry)


async def _escaping_package(kits: Path, server: Server, tmp_path: Path, entry: str) -> None:
    honest = base64.b64decode(pack(_job(tmp_path), 1 << 20))
    entries = {
        info.filename: zipfile.ZipFile(io.BytesIO(honest)).read(info)
        for info in zipfile.ZipFile(io.BytesIO(honest)).infolist()
    }
    admin = _admin(kits, "alice", server)
    channel = ControlChannel(admin.server_host, admin.control_port, admin.tls)
    with pytest.raises(HaulerError, match=json.dumps(entry)[1:-1].replace(".", r"\.")):
        await channel.call("submit", package_b64=_package({**entries, entry: b"print('pwned')"}))
    await channel.close()
    assert not (tmp_path / "evil.py").exists()


async def test_a_revoked_site_is_refused_at_connect(kits):
    async with serving(kits[0], revoked=("site-2",)) as server:
        channel, stream = await _join(_site(kits[0], "site-2", server))
        with pytest.raises(SecurityError, match="revoked"):
            await asyncio.wait_for(stream.receive(), 10)
        await channel.close()


async def test_what_a_job_s_code_said_is_shown_to_its_submitter_and_project_admins_only(
    kits, tmp_path
):
    kits = kits[0]
    async with serving(kits) as server:
        channel_1, stream_1 = await _join(_site(kits, "site-1", server))
        assert isinstance(parse_server_message(await stream_1.receive()), Welcome)
        async with Admin(_admin(kits, "oscar", server)) as oscar:  # org b submits
            job_id = await oscar.submit(_job(tmp_path))
        task = await _next(stream_1, Task)
        await stream_1.send(
            encode(TaskFailed(task_id=task.task_id, error="KeyError: the secret is 42"))
        )
        for name, sees in (
            ("alice", True),
            ("oscar", True),
            ("mike", False),
        ):  # mike: a member of org a
            async with Admin(_admin(kits, name, server)) as admin:
                events = [event async for event in admin.watch(job_id)]
                failure = next(e["error"] for e in events if e["event"] == "site.failed")
                assert ("the secret is 42" in failure) == sees, (name, failure)
                assert sees or "shown to the job's submitter and project admins" in failure
                assert (await admin.status(job_id))["job"]["status"] == "failed"
        await channel_1.close()


async def test_a_job_whose_own_code_failed_says_why_only_to_its_submitter_and_project_admins(
    kits, tmp_path
):
    kits = kits[0]
    job = _job(tmp_path)
    (job / "model.py").write_text(
        (job / "model.py").read_text() + "\n\ndef fill(name, out, config):\n"
        "    raise RuntimeError('the secret is 42')\n"
    )
    (job / "job.toml").write_text(
        (job / "job.toml").read_text().replace("[model]\n", '[model]\nbuild = "server"\n')
    )
    async with serving(kits, allow_custom_code=True) as server:
        async with Admin(_admin(kits, "oscar", server)) as oscar:
            job_id = await oscar.submit(job)
            assert [e async for e in oscar.watch(job_id)][-1]["event"] == "job.failed"
        for name, sees in (("alice", True), ("oscar", True), ("mike", False)):
            async with Admin(_admin(kits, name, server)) as admin:
                error = (await admin.status(job_id))["job"]["error"]
                listed = next(j["error"] for j in await admin.list_jobs() if j["id"] == job_id)
                ending = [e async for e in admin.watch(job_id)][-1]["error"]
                for said in (error, listed, ending):
                    assert ("the secret is 42" in said) == sees, (name, said)
