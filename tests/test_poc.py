"""`hauler poc prepare/start/stop` through real processes: configs written, start returns
once every site is connected, stop ends every process it recorded (and only those)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest
from helpers import edit_configs, hauler, ok, process_gone, wait_until

from hauler.admin import Admin
from hauler.admin.poc import admin_config
from hauler.core.config import AdminConfig, ServerConfig, SiteConfig, load_toml

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them


def processes_of(workspace: Path) -> list[psutil.Process]:
    """Live processes whose command line names a file of `workspace` (read-only scan)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and any(
                str(workspace) in part for part in process.info["cmdline"] or []
            ):
                found.append(process)
        except psutil.Error:
            continue
    return found


async def connected_sites(workspace: Path) -> list[str]:
    async with Admin(admin_config(workspace)) as admin:
        return sorted(site["name"] for site in await admin.sites())


def test_prepare_writes_configs_that_agree(tmp_path):
    workspace = tmp_path / "poc"
    result = ok(hauler("poc", "prepare", "--workspace", workspace, "--sites", 3))
    assert "prepared 3 sites" in result.stdout
    server = load_toml(ServerConfig, workspace / "server" / "server.toml")
    sites = [load_toml(SiteConfig, workspace / f"site-{k}" / "site.toml") for k in (1, 2, 3)]
    admin = load_toml(AdminConfig, workspace / "admin" / "admin.toml")
    assert [site.name for site in sites] == ["site-1", "site-2", "site-3"]
    assert (
        server.control_port > 0 and server.data_port > 0 and server.control_port != server.data_port
    )
    for peer in [*sites, admin]:
        assert (peer.control_port, peer.data_port) == (server.control_port, server.data_port)
    assert server.workspace == (workspace / "server").resolve()
    assert [site.workspace for site in sites] == [
        (workspace / f"site-{k}").resolve() for k in (1, 2, 3)
    ]
    assert not (workspace / "run").exists()  # nothing started


def test_prepare_refuses_zero_sites(tmp_path):
    result = hauler("poc", "prepare", "--workspace", tmp_path / "poc", "--sites", 0)
    assert result.returncode != 0
    assert not (tmp_path / "poc" / "server" / "server.toml").exists()


def test_start_returns_with_every_site_connected_and_stop_ends_every_process(tmp_path):
    workspace = tmp_path / "poc"
    ok(hauler("poc", "prepare", "--workspace", workspace, "--sites", 2))
    try:
        started = ok(hauler("poc", "start", "--workspace", workspace))
        pids = {
            line.split(":")[0]: int(line.split("pid")[1])
            for line in started.stdout.splitlines()
            if "pid" in line
        }
        assert sorted(pids) == ["server", "site-1", "site-2"]
        assert all(not process_gone(pid) for pid in pids.values())
        assert asyncio.run(connected_sites(workspace)) == [
            "site-1",
            "site-2",
        ]  # connected when start returned
        assert {p.stem: int(p.read_text()) for p in (workspace / "run").glob("*.pid")} == pids

        again = hauler("poc", "start", "--workspace", workspace)
        assert again.returncode != 0 and "already running" in again.stderr
        assert (
            hauler("poc", "prepare", "--workspace", workspace).returncode != 0
        )  # would clobber a live one
    finally:
        stopped = hauler("poc", "stop", "--workspace", workspace)
    assert "stopped server, site-1, site-2" in stopped.stdout
    wait_until(
        lambda: all(process_gone(pid) for pid in pids.values()), timeout_s=30, what="processes gone"
    )
    assert list((workspace / "run").glob("*.pid")) == []
    assert processes_of(workspace) == []
    assert "nothing" in ok(hauler("poc", "stop", "--workspace", workspace)).stdout


def test_start_that_fails_leaves_nothing_running(tmp_path):
    workspace = tmp_path / "poc"
    ok(hauler("poc", "prepare", "--workspace", workspace, "--sites", 2))
    edit_configs(
        workspace, "timeouts", {"streaming_red_timeout": 5}, roles="sites"
    )  # a typo in the sites' files
    try:
        result = hauler("poc", "start", "--workspace", workspace)
        assert result.returncode != 0
        assert "exited during startup" in result.stderr and str(workspace / "run") in result.stderr
        # The first site to exit names the key; start may stop the other before it has read its
        # file.
        logs = [(workspace / "run" / f"{site}.log").read_text() for site in ("site-1", "site-2")]
        assert any("streaming_red_timeout: unknown key" in log for log in logs)
        assert list((workspace / "run").glob("*.pid")) == []
        wait_until(lambda: processes_of(workspace) == [], timeout_s=30, what="no process left")
    finally:
        hauler("poc", "stop", "--workspace", workspace)
