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

import json
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

from hauler.core.package import load_job_module
from hauler.model.file import ModelFile
from hauler.model.manifest import Manifest

JOB_ID = "initial"  # the private package the module is imported into: hauler_job_initial
_FRAMES = 4  # frames of the job's own code shown with its error


def write_initial_model(app_dir: Path, module: str, config: dict, chunk_bytes: int,
                        out_file: Path) -> Manifest:
    """Write `out_file` from the module's layout and fill; return its digested manifest.

    The file is written under a temporary name beside `out_file` and renamed at the end, so a
    crash never leaves a partial file under the final name."""
    code = load_job_module(Path(app_dir), JOB_ID, module)
    layout = [(name, dtype, tuple(shape)) for name, dtype, shape in code.layout(config)]
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
    """Each tensor by the module's fill, in file order; the views die with this frame."""
    for name, array in model.arrays().items():
        code.fill(name, array, config)


def describe(error: BaseException, app_dir: Path) -> str:
    """`TypeName: message`, then the last frames of the traceback that are in the job's code."""
    root = os.path.join(os.path.realpath(app_dir), "")
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if os.path.realpath(frame.filename).startswith(root)][-_FRAMES:]
    text = f"{type(error).__name__}: {error}"
    return text + ("\n" + "".join(traceback.format_list(frames)).rstrip() if frames else "")


def main(argv: list[str]) -> int:
    """The child's entry point: 0 once the file is complete, 1 with the reason on stderr."""
    if len(argv) != 5:
        print("usage: python -m hauler.model.initial APP_DIR MODULE CONFIG_JSON CHUNK_BYTES "
              "OUT_FILE", file=sys.stderr)
        return 2
    app_dir, module, config, chunk_bytes, out_file = argv
    try:
        write_initial_model(Path(app_dir), module, json.loads(config), int(chunk_bytes),
                            Path(out_file))
    except BaseException as error:  # the job's code may raise anything, SystemExit included
        print(describe(error, Path(app_dir)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
