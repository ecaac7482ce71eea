"""Round 0 of a job, built by the job's own model module.

    python -m hauler.model.initial APP_DIR MODULE CONFIG_JSON CHUNK_BYTES OUT_FILE

The module gives `layout(config)`, a list of (name, dtype, shape), and `fill(name, out, config)`,
which writes one tensor in place. `write_initial_model` packs the layout into a manifest, creates
the safetensors file, has every tensor filled, hashes it and renames it into place. The entry
point runs it in a child process: unconfined where the job is submitted (the author's own code
on the author's machine), confined on a server (`hauler.security.sandbox`). Exit status 0 once
OUT_FILE is complete; otherwise 1, with the error and its frames in the job's code on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from types import ModuleType

from hauler.core.errors import HaulerError, JobError
from hauler.core.package import load_job_module
from hauler.model.file import ModelFile
from hauler.model.manifest import Manifest
from hauler.model.rounds import INITIAL_ROUND, RoundStore

JOB_ID = "initial"  # the private package the module is imported into: hauler_job_initial
_FRAMES = 4  # frames of the job's own code shown with its error
ERROR_TAIL_BYTES = 4000  # what is kept of a child's reason


def write_initial_model(
    app_dir: Path, module: str, config: dict, chunk_bytes: int, out_file: Path
) -> Manifest:
    """Write `out_file` from the module's layout and fill; return its digested manifest.

    The file is written under a temporary name beside `out_file` and renamed at the end, so a
    crash never leaves a partial file under the final name."""
    code = load_job_module(Path(app_dir), JOB_ID, module)
    layout = [(name, dtype, tuple(shape), *tie) for name, dtype, shape, *tie in code.layout(config)]
    manifest = Manifest.build(layout, chunk_bytes)
    out_file = Path(out_file)
    partial = out_file.with_name(out_file.name + ".partial")
    try:
        with ModelFile.create(partial, manifest) as model:
            _fill(code, model, config)
            manifest = model.compute_digests()
            model.flush()
        os.replace(partial, out_file)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return manifest


def _fill(code: ModuleType, model: ModelFile, config: dict) -> None:
    """Each stored tensor by the module's fill, in file order (a tied name shares its tensor's
    values, filled once); the views die with this frame."""
    for index, tensor in enumerate(model.manifest.tensors):
        code.fill(tensor.name, model.array(index), config)


def import_initial_model(
    rounds: RoundStore, source: Path, chunk_bytes: int, *, move: bool
) -> Manifest:
    """Make `source` round 0 (moved, or copied so the original stays as it is), after checking it
    as untrusted input; returns round 0's manifest, with digests."""
    final = rounds.path(INITIAL_ROUND)
    partial = final.with_suffix(".partial")
    try:
        ModelFile.open(source, chunk_bytes=chunk_bytes).close()  # refuses a malformed file first
        if move:
            os.replace(source, partial)
        else:
            shutil.copyfile(source, partial)
        with ModelFile.open(partial, chunk_bytes=chunk_bytes) as model:
            manifest = model.compute_digests()
    except (HaulerError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise JobError(f"the initial model {source.name} cannot be used: {error}") from None
    os.replace(partial, final)
    rounds.commit(INITIAL_ROUND, manifest)
    return manifest


def describe(error: BaseException, app_dir: Path) -> str:
    """`TypeName: message`, then the last frames of the traceback that are in the job's code."""
    root = os.path.join(os.path.realpath(app_dir), "")
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if os.path.realpath(frame.filename).startswith(root)
    ][-_FRAMES:]
    text = f"{type(error).__name__}: {error}"
    return text + ("\n" + "".join(traceback.format_list(frames)).rstrip() if frames else "")


async def build_in_child(
    app_dir: Path, module: str, config: dict, chunk_bytes: int, out_file: Path
) -> Path:
    """Run the entry point below in a child process, unconfined: where a job is submitted or
    simulated, the job's code is its author's own. Raises JobError with the child's reason."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hauler.model.initial",
        str(Path(app_dir).resolve()),
        module,
        json.dumps(config),
        str(chunk_bytes),
        str(out_file),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await child.communicate()
    if child.returncode != 0:
        reason = stderr.decode(errors="replace").strip()[-ERROR_TAIL_BYTES:]
        raise JobError(
            f"building the initial model with {module}.py failed: "
            f"{reason or f'exit status {child.returncode}'}"
        )
    return Path(out_file)


def main(argv: list[str]) -> int:
    """The child's entry point: 0 once the file is complete, 1 with the reason on stderr."""
    if len(argv) != 5:
        print(
            "usage: python -m hauler.model.initial APP_DIR MODULE CONFIG_JSON CHUNK_BYTES OUT_FILE",
            file=sys.stderr,
        )
        return 2
    app_dir, module, config, chunk_bytes, out_file = argv
    try:
        write_initial_model(
            Path(app_dir), module, json.loads(config), int(chunk_bytes), Path(out_file)
        )
    except BaseException as error:  # the job's code may raise anything, SystemExit included
        print(describe(error, Path(app_dir)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
