"""Real hosts: the server and two sites in separate network namespaces, over mutual TLS.

Each site reaches the server through its own veth pair into a bridge in the server's
namespace, so every byte crosses a real (virtual) network between three hosts with
their own addresses. Skipped where network namespaces cannot be made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import yaml
from helpers import wait_until

from hauler.security import provision

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

SERVER_ADDRESS = "10.200.0.1"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello-numpy"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _netns_usable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"hl-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as error:
        return f"`ip netns add` is not permitted here: {error.stderr.decode().strip()}"
    _ip("netns", "del", probe)
    return None


@pytest.fixture
def hosts():
    """Three namespaces: `server` with a bridge at 10.200.0.1, `site-1` and `site-2` on it."""
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    names = {role: f"hl-{role}-{tag}" for role in ("server", "site-1", "site-2")}
    try:
        for name in names.values():
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        server = names["server"]
        _ip("-n", server, "link", "add", "br0", "type", "bridge")
        _ip("-n", server, "addr", "add", f"{SERVER_ADDRESS}/24", "dev", "br0")
        _ip("-n", server, "link", "set", "br0", "up")
        for k, role in enumerate(("site-1", "site-2"), start=1):
            outer, inner = f"hv{k}{tag}", f"hs{k}{tag}"
            _ip(
                "link",
                "add",
                outer,
                "netns",
                server,
                "type",
                "veth",
                "peer",
                "name",
                inner,
                "netns",
                names[role],
            )
            _ip("-n", server, "link", "set", outer, "master", "br0", "up")
            _ip("-n", names[role], "addr", "add", f"10.200.0.{10 + k}/24", "dev", inner)
            _ip("-n", names[role], "link", "set", inner, "up")
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _in(namespace: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as output:
        return subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "hauler", *args],
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
        )


def _listening(server: subprocess.Popen, log: Path) -> bool:
    """Whether the server has logged that it listens, or has exited (the caller says why)."""
    return server.poll() is not None or (log.exists() and "server listening" in log.read_text())


def _run(namespace: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "hauler", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_two_round_job_across_three_hosts_over_mutual_tls(hosts, tmp_path):
    project = {
        "name": "netns",
        "server": {"host": SERVER_ADDRESS, "control_port": 18002, "data_port": 18003},
        "sites": [{"name": "site-1", "org": "a"}, {"name": "site-2", "org": "b"}],
        "admins": [{"name": "alice", "org": "a", "role": "project_admin"}],
    }
    (tmp_path / "project.yml").write_text(yaml.safe_dump(project))
    provision(tmp_path / "project.yml", tmp_path / "kits")
    job = tmp_path / "job"
    shutil.copytree(EXAMPLE, job)
    (job / "job.toml").write_text(
        (EXAMPLE / "job.toml")
        .read_text()
        .replace("num_rounds = 3", "num_rounds = 2")
        .replace("arrays = 64, array_mib = 16", "arrays = 3, array_bytes = 1000004")
    )
    kits, logs = tmp_path / "kits", tmp_path
    processes = [
        _in(
            hosts["server"],
            "server",
            "--config",
            str(kits / "server" / "server.toml"),
            log=logs / "server.log",
        )
    ]
    server_log = kits / "server" / "workspace" / "logs" / "server.log"  # its JSON lines
    try:
        # The sites retry until the server listens, but `submit` gives up after 3 s: wait for
        # it (a second idle, several on a busy machine) rather than for a fixed time.
        wait_until(lambda: _listening(processes[0], server_log), what="the server listening")
        assert processes[0].poll() is None, (logs / "server.log").read_text()
        processes += [
            _in(
                hosts[site],
                "client",
                "--config",
                str(kits / site / "site.toml"),
                log=logs / f"{site}.log",
            )
            for site in ("site-1", "site-2")
        ]
        submitted = _run(
            hosts["site-1"], "submit", str(job), "--kit", str(kits / "alice"), "--wait"
        )
        assert submitted.returncode == 0, (
            submitted.stdout + submitted.stderr + (logs / "server.log").read_text()
        )
        job_id = submitted.stdout.split("submitted job ")[1].split()[0]
        downloaded = _run(
            hosts["site-2"],
            "jobs",
            "download",
            job_id,
            "-o",
            str(tmp_path / "out"),
            "--kit",
            str(kits / "alice"),
        )
        assert downloaded.returncode == 0, downloaded.stderr
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)
    model = safetensors.numpy.load_file(tmp_path / "out" / "global.safetensors")
    assert sorted(model) == ["array_0", "array_1", "array_2"]
    for name, values in model.items():
        k = int(name.split("_")[1])
        expected = ((np.arange(values.size) % 1000 + k) / 1000).astype(np.float32) + np.float32(0.2)
        np.testing.assert_allclose(values, expected, atol=1e-5)
