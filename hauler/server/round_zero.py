"""Where a job's round 0 comes from on the server, none of which runs the job's code here.

- Uploaded with the job (`hauler submit` built it from the job's model module on the
  submitter's machine, or `--initial-model FILE`): the upload lands in round 0's file and is
  verified chunk by chunk and against the announced digests, like any upload.
- A safetensors file the job names (`[model] file`) in one of the server's `model_dirs`:
  copied into round 0, so the operator's checkpoint is never overwritten by later rounds.
- Built by the job's own model module on the server, only where the server's config allows
  custom code, in a confined child (`server/initial.py`); its output is then untrusted input.

A file that becomes round 0 is checked like any safetensors file from outside (header,
dtypes, sizes, layout tiling the data region) before it is hashed and committed.
"""

from __future__ import annotations

from pathlib import Path

from hauler.core.errors import JobError
from hauler.model import Manifest


def resolve_model_file(name: str, model_dirs: list[Path]) -> Path:
    """The file `name` in one of `model_dirs` (relative names are looked up in each, in order);
    links may not lead out of them."""
    roots = [directory.resolve() for directory in model_dirs]
    for candidate in [Path(name)] if Path(name).is_absolute() else [root / name for root in roots]:
        real = candidate.resolve()
        if real.is_file() and any(real.is_relative_to(root) for root in roots):
            return real
    raise JobError(
        f"the job's initial model file {name!r} is not a file in the server's model_dirs; "
        "ask the server's operator to add it, or upload it with "
        "`hauler submit --initial-model FILE`"
    )


def check_initial_manifest(manifest: Manifest, *, chunk_bytes: int, max_bytes: int) -> None:
    """An initial model a submitter announces: the server's chunk size, within its size limit."""
    if manifest.chunk_bytes != chunk_bytes:
        raise JobError(
            f"the initial model's manifest uses chunks of {manifest.chunk_bytes} bytes; "
            f"this server's are {chunk_bytes} (ask it with the `info` call)"
        )
    if manifest.total_bytes > max_bytes:
        raise JobError(
            f"the initial model of {manifest.total_bytes / 2**30:.1f} GiB exceeds the "
            f"server's max_model_gib = {max_bytes / 2**30:g}"
        )
    if not manifest.tensors or any(not t.digest for t in manifest.tensors if t.length):
        raise JobError("the initial model's manifest must list its tensors with their digests")
