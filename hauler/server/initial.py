"""Round 0 built on the server by the job's own model module, confined.

The server runs job code only where its operator allows it (`allow_custom_code`), and then in
`hauler.security.sandbox`: the child sees the Python installation, the job's folder (read-only)
and one output folder, and nothing else of the server (no kit, no workspace, no process, no
network). The file it leaves is untrusted input, to be validated by the caller before use.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
from pathlib import Path

from hauler.core.errors import JobCodeError
from hauler.security import sandbox

OUTPUT_NAME = "initial.safetensors"
STDERR_TAIL_BYTES = 4096  # what is kept of the child's stderr, however much it writes


async def build_on_server(
    app_dir: Path, module: str, config: dict, chunk_bytes: int, out_dir: Path
) -> Path:
    """Run the job's `module` confined to write `out_dir/initial.safetensors`; return its path.

    Raises JobCodeError (the job's code failed: its message is for the job's submitter and
    project admins only) or SecurityError (this server cannot confine job code)."""
    app_dir, out_dir = Path(app_dir).resolve(), Path(out_dir).resolve()
    await asyncio.to_thread(_fresh_folder, out_dir)
    out = out_dir / OUTPUT_NAME
    command = [
        sys.executable,
        "-m",
        "hauler.model.initial",
        str(app_dir),
        module,
        json.dumps(config),
        str(chunk_bytes),
        str(out),
    ]
    argv = sandbox.confined_command(command, readable=[app_dir], writable=[out_dir])
    status, stderr = await _run(argv)
    if status == sandbox.CANNOT_CONFINE:
        raise sandbox.unavailable(stderr)
    if status != 0:
        raise JobCodeError(
            f"building round 0 with {module}.py failed: {stderr or f'exit status {status}'}"
        )
    _check_output(out, module)
    return out


async def _run(argv: list[str]) -> tuple[int, str]:
    """The child's exit status and the tail of its stderr; killed if we are cancelled."""
    child = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stderr is not None
        tail = bytearray()
        while chunk := await child.stderr.read(1 << 16):
            tail += chunk
            del tail[:-STDERR_TAIL_BYTES]
        status = await child.wait()
    finally:
        if child.returncode is None:  # cancelled: the launcher's death takes the namespace
            child.kill()
            await child.wait()
    return status, tail.decode(errors="replace").strip()


def _fresh_folder(folder: Path) -> None:
    """An empty folder of the server's own: nothing an earlier attempt left is kept."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True)


def _check_output(out: Path, module: str) -> None:
    """The child's output must be a regular file (not a link, fifo or device it planted)."""
    try:
        info = os.lstat(out)
    except FileNotFoundError:
        raise JobCodeError(
            f"building round 0 with {module}.py ended without writing {out.name}"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise JobCodeError(
            f"building round 0 with {module}.py left {out.name} as something "
            "other than a regular file"
        )
