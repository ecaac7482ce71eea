"""Peers with valid credentials that try to wear the server out, against a real POC federation
(server and site-1 as processes): idle data connections, too many connections, deeply nested
HELLOs, job packages that lie or are huge, and a second server on the same workspace. Each is
refused, logged at most once a minute per peer and kind, and the federation goes on serving."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import tomli_w
from helpers import REPO, edit_configs, federation, hello_job, process_gone

from hauler.admin import Admin, poc
from hauler.core.config import SiteConfig, load_toml
from hauler.core.errors import JobError
from hauler.core.package import pack
from hauler.transfer import Kind, control_frame
from hauler.transport import ControlChannel, connect

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

HELLO_TIMEOUT_S = 2
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def poc_federation(tmp_path_factory):
    """A server and site-1 running; site-2's kit is the hostile participant's."""
    workspace = tmp_path_factory.mktemp("hostile") / "poc"

    def configure(workspace: Path) -> None:
        edit_configs(
            workspace,
            "dataplane",
            {"hello_timeout_s": HELLO_TIMEOUT_S, "max_connections_per_peer": MAX_CONNECTIONS},
            roles="server",
        )
        (workspace / "site-2").rename(workspace / "hostile-site-2")

    with federation(workspace, sites=2, configure=configure) as pids:
        yield workspace, pids


def hostile_kit(workspace: Path) -> SiteConfig:
    return load_toml(SiteConfig, workspace / "hostile-site-2" / "site.toml")


def refusals_logged(workspace: Path, kind: str) -> list[dict]:
    lines = (workspace / "server" / "logs" / "server.log").read_text().splitlines()  # JSON lines
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [
        r
        for r in records
        if r.get("message") == "refused" and r.get("peer") == "site-2" and r.get("kind") == kind
    ]


async def open_idle(config: SiteConfig, count: int):
    return [
        await connect(config.server_host, config.data_port, tls=config.tls) for _ in range(count)
    ]


def test_idle_and_surplus_data_connections_are_dropped_and_refused(poc_federation):
    workspace, pids = poc_federation
    config = hostile_kit(workspace)

    async def attack() -> None:
        idle = await open_idle(config, MAX_CONNECTIONS)  # the most one peer may hold
        surplus = await connect(config.server_host, config.data_port, tls=config.tls)
        refusal = await asyncio.wait_for(surplus.next_frame(), 10)  # refused at once
        assert refusal.header.kind is Kind.ERROR and b"max_connections_per_peer" in refusal.payload
        for connection in idle:  # said nothing: each is dropped after hello_timeout_s
            await asyncio.wait_for(connection.wait_closed(), 10 * HELLO_TIMEOUT_S)
        again = await open_idle(config, MAX_CONNECTIONS)  # they were counted out again
        for connection in again:
            connection.abort()

    asyncio.run(attack())
    assert len(refusals_logged(workspace, "connections")) == 1
    assert (
        len(refusals_logged(workspace, "hello")) == 1
    )  # 4 dropped, one line: at most one a minute
    assert not process_gone(pids["server"])


@pytest.mark.parametrize(
    "payload",
    [
        b'{"transfer": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"transfer": {"a": {"b": [1]}}, "lane": 0}',
        b"\xff" * 100,
    ],
    ids=["nested_30000_deep", "nested_a_little", "not_json"],
)
def test_a_hostile_hello_is_refused_and_the_server_goes_on(poc_federation, payload):
    workspace, pids = poc_federation
    config = hostile_kit(workspace)

    async def attack() -> None:
        connection = await connect(config.server_host, config.data_port, tls=config.tls)
        connection.write(control_frame(Kind.HELLO, payload))
        await asyncio.wait_for(connection.wait_closed(), 10)
        async with Admin(poc.admin_config(workspace)) as admin:  # still answering
            assert [site["name"] for site in await admin.sites() if site["attached"]] == ["site-1"]

    asyncio.run(attack())
    assert not process_gone(pids["server"])


def package_of(entries: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return base64.b64encode(buffer.getvalue()).decode()


def lying_about_sizes(job: Path) -> str:
    """A valid job whose central directory says every file is 1 byte long."""
    data = bytearray(base64.b64decode(pack(job, 1 << 20)))
    position = data.find(b"PK\x01\x02")
    while position != -1:
        data[position + 24 : position + 28] = (1).to_bytes(4, "little")
        position = data.find(b"PK\x01\x02", position + 4)
    return base64.b64encode(bytes(data)).decode()


def test_hostile_packages_are_refused_with_their_reason_leaving_nothing(poc_federation, tmp_path):
    workspace, _ = poc_federation
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    many = {
        "job.toml": (job / "job.toml").read_bytes(),
        **{f"d/{k}.txt": b"" for k in range(120_000)},
    }
    jobs_dir = workspace / "server" / "jobs"
    before = set(jobs_dir.iterdir()) if jobs_dir.exists() else set()

    async def attack() -> None:
        admin = poc.admin_config(workspace)
        channel = ControlChannel(admin.server_host, admin.control_port, admin.tls)
        try:
            for package in (package_of(many), lying_about_sizes(job)):
                with pytest.raises(JobError, match="job package"):
                    await channel.call("submit", package_b64=package)
        finally:
            await channel.close()
        async with Admin(admin) as session:
            assert [site["name"] for site in await session.sites() if site["attached"]] == [
                "site-1"
            ]

    asyncio.run(attack())
    assert (set(jobs_dir.iterdir()) if jobs_dir.exists() else set()) == before


def test_a_second_server_on_the_same_workspace_exits_naming_the_first(poc_federation, tmp_path):
    workspace, pids = poc_federation
    config = tomllib.loads((workspace / "server" / "server.toml").read_text())
    other = workspace / "server" / "other-ports.toml"
    other.write_text(tomli_w.dumps({**config, "control_port": 0, "data_port": 0}))
    try:
        second = subprocess.run(
            [sys.executable, "-m", "hauler", "server", "--config", str(other)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
    finally:
        other.unlink()
    assert second.returncode != 0
    assert f"another server (PID {pids['server']}) runs on this workspace" in second.stderr, (
        second.stderr
    )

    async def still_there() -> list:
        async with Admin(poc.admin_config(workspace)) as admin:
            return await admin.list_jobs()

    asyncio.run(still_there())
