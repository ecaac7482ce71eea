"""Job code on the server runs confined: real processes, real namespaces, no mocks.

A fake server lays out its kit, its workspace and another job's folder in tmp_path and listens
on a TCP port; the job's model module tries to reach each of them. Confined, every attempt
fails and round 0 is built; unconfined, the same module reads the key, so the test can fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import hauler
from hauler.core.errors import JobCodeError, SecurityError
from hauler.security import sandbox
from hauler.server.initial import build_on_server

SECRET = "-----BEGIN PRIVATE KEY----- the server's secret 7f3a9c"
CHUNK = 1 << 20

try:
    sandbox.check_available()
    UNAVAILABLE = ""
except SecurityError as error:
    UNAVAILABLE = str(error)
confined = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"no confinement here: {UNAVAILABLE}")

# Each attempt returns something true when it got through; raising means it was stopped.
ATTACK = """
import os
import socket

import numpy as np


def _attempts(c):
    key, pid = c["key"], c["pid"]
    yield "read the server's key", lambda: open(key).read()
    yield "list the server's kit", lambda: os.listdir(c["kit"])
    yield "read another job's file", lambda: open(c["other_secret"]).read()
    yield "list another job's folder", lambda: os.listdir(c["other_job"])
    yield "see another job in the jobs folder", lambda: "otherjob" in os.listdir(c["jobs"])
    yield "read the server's config", lambda: open(c["config"]).read()
    yield "connect to the server's port", lambda: socket.create_connection(
        ("127.0.0.1", c["port"]), timeout=2).close() or True
    yield "read the key through /proc/PID/root", lambda: open(f"/proc/{pid}/root{key}").read()
    yield "read the server's environ", lambda: open(f"/proc/{pid}/environ", "rb").read()
    yield "list the server's open files", lambda: os.listdir(f"/proc/{pid}/fd")


def layout(c):
    got = []
    for name, attempt in _attempts(c):
        try:
            value = attempt()
        except OSError:
            continue
        if value:
            got.append(f"{name} ({str(value)[:120]})")
    if got:
        raise RuntimeError("attacks got through: " + "; ".join(got))
    return [("w", "F32", [2, 3]), ("b", "I64", [4])]


def fill(name, out, c):
    out[...] = (np.arange(out.size) * c["scale"]).reshape(out.shape)
"""


@dataclass
class Server:
    root: Path
    kit: Path
    key: Path
    jobs: Path
    app: Path
    out: Path
    port: int

    def config(self, **extra: object) -> dict:
        return {
            "key": str(self.key),
            "kit": str(self.kit),
            "jobs": str(self.jobs),
            "other_job": str(self.jobs / "otherjob"),
            "config": str(self.kit / "server.toml"),
            "other_secret": str(self.jobs / "otherjob" / "secret.txt"),
            "port": self.port,
            "pid": os.getpid(),
            "app": str(self.app),
            "scale": 3,
            **extra,
        }

    def job(self, source: str) -> None:
        (self.app / "model.py").write_text(textwrap.dedent(source))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A server's kit and workspace, another job, this job's folders, and a listening port."""
    kit = tmp_path / "server" / "kit"
    kit.mkdir(parents=True)
    key = kit / "server.key"
    key.write_text(SECRET)
    key.chmod(0o600)
    (kit / "server.toml").write_text('[server]\nsecret = "config"\n')
    jobs = tmp_path / "server" / "workspace" / "jobs"
    (jobs / "otherjob").mkdir(parents=True)
    (jobs / "otherjob" / "secret.txt").write_text("another job's data")
    app, out = jobs / "thisjob" / "app", jobs / "thisjob" / "initial"
    app.mkdir(parents=True)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = Server(tmp_path, kit, key, jobs, app, out, listener.getsockname()[1])
        server.job(ATTACK)
        yield server


@confined
async def test_every_attack_fails_and_round_zero_is_built(server: Server) -> None:
    built = await build_on_server(server.app, "model", server.config(), CHUNK, server.out)
    assert built == server.out.resolve() / "initial.safetensors"
    tensors = load_file(str(built))
    np.testing.assert_array_equal(tensors["w"], np.arange(6, dtype=np.float32).reshape(2, 3) * 3)
    np.testing.assert_array_equal(tensors["b"], np.arange(4, dtype=np.int64) * 3)
    assert sorted(os.listdir(server.out)) == ["initial.safetensors"]


def test_the_same_job_unconfined_reads_the_key(server: Server) -> None:
    """Proof that the attacks are real: where the sandbox is not, they get through."""
    out = server.out / "initial.safetensors"
    server.out.mkdir()
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "hauler.model.initial",
            str(server.app),
            "model",
            json.dumps(server.config()),
            str(CHUNK),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 1
    for attack in (
        "read the server's key",
        "another job's file",
        "connect to the server's port",
        "through /proc/PID/root",
        "the server's environ",
    ):
        assert attack in child.stderr
    assert SECRET in child.stderr and not out.exists()


@confined
async def test_a_failing_job_raises_job_code_error_with_its_message(server: Server) -> None:
    server.job("""
        def layout(config):
            return [("w", "F32", [8])]

        def fill(name, out, config):
            raise ValueError("the fill broke: marker-4711")
    """)
    with pytest.raises(JobCodeError) as raised:
        await build_on_server(server.app, "model", {}, CHUNK, server.out)
    message = str(raised.value)
    assert "ValueError: the fill broke: marker-4711" in message
    assert "model.py" in message and "in fill" in message
    assert not (server.out / "initial.safetensors").exists()
    assert not (server.out / "initial.safetensors.partial").exists()


WRITER = """
    def layout(config):
        with open(config["target"], "w") as handle:
            handle.write("escaped")
        return [("w", "F32", [1])]

    def fill(name, out, config):
        out[...] = 1
"""


@confined
@pytest.mark.parametrize("where", ["app", "hauler_package"])
async def test_a_job_cannot_write_outside_its_output_folder(server: Server, where: str) -> None:
    """Neither into its own code nor into the server's: both are seen read-only."""
    target = (
        server.app / "planted.py"
        if where == "app"
        else Path(hauler.__file__).parent / f"escaped-{uuid.uuid4().hex}.py"
    )
    server.job(WRITER)
    try:
        with pytest.raises(JobCodeError, match="Read-only file system"):
            await build_on_server(server.app, "model", {"target": str(target)}, CHUNK, server.out)
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@confined
async def test_writes_beside_the_output_folder_never_reach_the_server(server: Server) -> None:
    """The job's own folder is only a path inside the sandbox; a write there stays there."""
    target = server.jobs / "thisjob" / "planted.txt"
    server.job(WRITER)
    try:
        await build_on_server(server.app, "model", {"target": str(target)}, CHUNK, server.out)
    except JobCodeError as error:
        assert "Read-only file system" in str(error)
    assert not target.exists()


@confined
async def test_a_job_has_no_privilege_to_undo_its_confinement(server: Server) -> None:
    server.job('''
        import ctypes, os

        libc = ctypes.CDLL(None, use_errno=True)
        RW = 32 | 4096 | 2 | 4 | (1 << 21)  # remount, bind, nosuid, nodev, relatime: not ro

        def _nested():
            """In a user namespace of its own, where it has every capability again."""
            pid = os.fork()
            if pid == 0:
                if libc.unshare(0x10000000 | 0x00020000) != 0:
                    os._exit(1)
                os._exit(0 if libc.mount(None, b"/usr", None, RW, None) == 0 else 1)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

        def layout(config):
            got = []
            if libc.mount(None, b"/usr", None, RW, None) == 0:
                got.append("remount /usr read-write")
            if libc.mount(b"tmpfs", b"/etc", b"tmpfs", 0, None) == 0:
                got.append("mount a tmpfs")
            if _nested():
                got.append("remount /usr read-write from a nested user namespace")
            try:
                open("/usr/escaped", "w").close()
                got.append("write into /usr")
            except OSError:
                pass
            if open("/proc/self/status").read().count("CapEff:\\t0000000000000000") != 1:
                got.append("keep capabilities")
            if got:
                raise RuntimeError("; ".join(got))
            return [("w", "F32", [1])]

        def fill(name, out, config):
            out[...] = 1
    ''')
    await build_on_server(server.app, "model", {}, CHUNK, server.out)
    assert not Path("/usr/escaped").exists()


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass  # gone meanwhile
    return found


@confined
async def test_a_cancelled_build_leaves_no_job_process(server: Server) -> None:
    """Cancelling kills the launcher; PID 1 dies with it, and every process of the job too."""
    marker = f"marker-{uuid.uuid4().hex}"
    server.job("""
        import os, subprocess, sys, time

        def layout(config):  # a grandchild too, to be killed with the namespace
            nap = "import time; time.sleep(60)"
            subprocess.Popen([sys.executable, "-c", nap, config["marker"]])
            open(os.path.join(config["out"], "started"), "w").close()
            time.sleep(60)
    """)
    config = {"out": str(server.out), "marker": marker}
    build = asyncio.create_task(build_on_server(server.app, "model", config, CHUNK, server.out))
    for _ in range(200):
        if (server.out / "started").exists():
            break
        await asyncio.sleep(0.05)
    assert (server.out / "started").exists() and len(_processes_with(marker)) == 3
    build.cancel()
    with pytest.raises(asyncio.CancelledError):
        await build
    for _ in range(100):
        if not _processes_with(marker):
            break
        await asyncio.sleep(0.05)
    assert not _processes_with(marker)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_without_user_namespaces_the_server_refuses_and_runs_nothing(server: Server) -> None:
    """Fail closed: where the kernel refuses a user namespace, no job code runs at all."""
    marker = server.root / "job-ran"
    server.job(WRITER)
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from hauler.core.errors import SecurityError\n"
        "from hauler.server.initial import build_on_server\n"
        "try:\n"
        f"    asyncio.run(build_on_server(Path({str(server.app)!r}), 'model', "
        f"{{'target': {str(marker)!r}}}, {CHUNK}, Path({str(server.out)!r})))\n"
        "except SecurityError as error:\n"
        "    print(error)\n"
        "    sys.exit(3)\n"
    )
    # a user namespace of the test's own, allowed to create no further one
    limit = "echo 0 > /proc/sys/user/max_user_namespaces"
    child = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            f'{limit} && exec "$0" -c "$1"',
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if child.returncode != 3 and "max_user_namespaces" in child.stderr:
        pytest.skip(f"cannot limit user namespaces here: {child.stderr.strip()}")
    assert child.returncode == 3, child.stdout + child.stderr
    assert "cannot confine job code" in child.stdout
    assert "--initial-model" in child.stdout
    assert not marker.exists() and not (server.out / "initial.safetensors").exists()


def test_confined_command_refuses_relative_or_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        sandbox.confined_command(["true"], readable=[Path("relative")])
    with pytest.raises(ValueError):
        sandbox.confined_command(["true"], writable=[tmp_path / "missing"])
