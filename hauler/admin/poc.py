"""Proof-of-concept federations: a server and N sites as local processes in one folder,
provisioned like a real deployment (project CA, mutual TLS, one kit per participant).

    DIR/project.yml          DIR/ca/ (the CA; its key stays here)
    DIR/server/server.toml   DIR/site-<k>/site.toml   DIR/admin/admin.toml   (kits)
    DIR/run/<role>.pid       DIR/run/<role>.log
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w
import yaml

from hauler.admin.client import Admin
from hauler.core.config import AdminConfig, load_toml
from hauler.core.errors import ConfigError, ConnectionLost, HaulerError
from hauler.security import provision

HOST = "127.0.0.1"


def site_names(count: int) -> list[str]:
    return [f"site-{k}" for k in range(1, count + 1)]


def prepare(
    workspace: Path,
    sites: int,
    *,
    control_port: int = 0,
    data_port: int = 0,
    timeouts: dict[str, float] | None = None,
    dataplane: dict[str, float] | None = None,
    plaintext: bool = False,
) -> list[Path]:
    """Provision a local federation with mutual TLS: a project CA and a kit per participant.

    Ports of 0 are picked free now. Each kit folder is also its role's workspace.
    `plaintext` drops TLS from every config, to measure what it costs; never for real data."""
    if sites < 1:
        raise ConfigError("--sites must be at least 1")
    workspace = workspace.resolve()
    if running(workspace):
        raise ConfigError(f"{workspace}: a federation is running there; `hauler poc stop` it first")
    free = iter(_free_ports(2))
    project = {
        "name": "poc",
        "server": {
            "host": HOST,
            "control_port": control_port or next(free),
            "data_port": data_port or next(free),
        },
        "sites": [{"name": name, "org": "poc"} for name in site_names(sites)],
        "admins": [{"name": "admin", "org": "poc", "role": "project_admin"}],
    }
    workspace.mkdir(parents=True, exist_ok=True)
    project_file = workspace / "project.yml"
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    kits = provision(project_file, workspace, overwrite=True)
    extra = {"timeouts": timeouts} if timeouts else {}
    # On loopback one connection per transfer is fastest (1 GiB, 2 sites, TLS: efficiency 0.51
    # with 1, 0.45 with 4); the parallel lanes real deployments default to are for long links.
    dataplane = {"connections": 1, **(dataplane or {})}
    for config in [*workspace.glob("server/server.toml"), *workspace.glob("site-*/site.toml")]:
        amend_config(
            config, {"workspace": ".", **extra, "dataplane": dataplane}, drop_tls=plaintext
        )
    for index, name in enumerate(site_names(sites)):  # which share of a data set each site holds
        amend_config(
            workspace / name / "site.toml",
            {"job_settings": {"site_index": index, "num_sites": sites}},
        )
    amend_config(workspace / "admin" / "admin.toml", extra, drop_tls=plaintext)
    return kits


def amend_config(config: Path, values: dict, *, drop_tls: bool = False) -> None:
    """Merge top-level `values` into a TOML config; `drop_tls` removes its [tls] (measuring
    only)."""
    data = {**tomllib.loads(config.read_text()), **values}
    if drop_tls:
        data.pop("tls", None)
    config.write_text(tomli_w.dumps(data))


def admin_config(workspace: Path) -> AdminConfig:
    return load_toml(AdminConfig, workspace / "admin" / "admin.toml")


def roles(workspace: Path) -> list[tuple[str, list[str]]]:
    """(role name, command) for the server and every site of the workspace."""
    if not (workspace / "server" / "server.toml").exists():
        raise ConfigError(
            f"{workspace}: not a POC workspace; run `hauler poc prepare --workspace {workspace}`"
        )
    commands = [("server", ["server", "--config", str(workspace / "server" / "server.toml")])]
    for config in sorted(
        workspace.glob("site-*/site.toml"), key=lambda p: int(p.parent.name.split("-")[1])
    ):
        commands.append((config.parent.name, ["client", "--config", str(config)]))
    return commands


def start(workspace: Path, *, wait_s: float = 60.0) -> dict[str, int]:
    """Start the server and every site in the background; return once all sites are connected."""
    workspace = workspace.resolve()
    run_dir = workspace / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    if running(workspace):
        raise ConfigError(
            f"{workspace}: already running; `hauler poc stop --workspace {workspace}` first"
        )
    (server, server_command), *sites = roles(workspace)
    pids = {server: _spawn(run_dir, server, server_command)}
    try:
        config = admin_config(workspace)
        asyncio.run(
            _wait_for_sites(config, pids, wait_s)
        )  # the server first, so sites find it listening
        pids.update({role: _spawn(run_dir, role, command) for role, command in sites})
        asyncio.run(_wait_for_sites(config, pids, wait_s))
    except HaulerError as error:
        stop(workspace)
        raise HaulerError(f"{error}; see the logs in {run_dir}") from None
    return pids


def _spawn(run_dir: Path, role: str, arguments: list[str]) -> int:
    """Start `hauler ARGUMENTS` in the background, logging to run/<role>.log; returns its PID."""
    with open(run_dir / f"{role}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hauler", *arguments],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (run_dir / f"{role}.pid").write_text(str(process.pid))
    return process.pid


async def _wait_for_sites(config: AdminConfig, pids: dict[str, int], wait_s: float) -> None:
    """Poll the server until every site has joined; fail early if a process dies."""
    deadline = time.monotonic() + wait_s
    expected = len(pids) - 1
    while True:
        dead = [role for role, pid in pids.items() if not _alive(pid)]
        if dead:
            raise HaulerError(f"{', '.join(dead)} exited during startup")
        if time.monotonic() > deadline:
            raise HaulerError(f"not all {expected} sites connected within {wait_s:g} s")
        try:
            quick = config.timeouts.model_copy(update={"communication_timeout": 1.0})
            async with Admin(config.model_copy(update={"timeouts": quick})) as admin:
                if sum(site["attached"] for site in await admin.sites()) >= expected:
                    return
        except ConnectionLost:
            pass
        await asyncio.sleep(0.1)


def running(workspace: Path) -> dict[str, int]:
    """Roles whose recorded process is alive."""
    alive = {}
    for pid_file in (workspace / "run").glob("*.pid"):
        pid = int(pid_file.read_text())
        if _alive(pid):
            alive[pid_file.stem] = pid
        else:
            pid_file.unlink()
    return alive


def stop(workspace: Path, *, grace_s: float = 10.0) -> list[str]:
    """Stop every process of the workspace by its recorded PID, the server first (so its running
    job stays running, to resume at the next start, rather than failing for want of sites), then
    the sites: SIGTERM, then SIGKILL after `grace_s`."""
    workspace = workspace.resolve()
    alive = running(workspace)
    server = {role: pid for role, pid in alive.items() if role == "server"}
    for group in (server, {role: pid for role, pid in alive.items() if role != "server"}):
        _terminate(group, grace_s)
    for role in alive:
        (workspace / "run" / f"{role}.pid").unlink(missing_ok=True)
    return sorted(alive)


def _terminate(processes: dict[str, int], grace_s: float) -> None:
    for pid in processes.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in processes.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in processes.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _free_ports(count: int) -> list[int]:
    """`count` different ports free now (all held at once while they are picked)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((HOST, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
