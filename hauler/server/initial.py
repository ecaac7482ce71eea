"""Round 0 of a job, built from the job's model module in a child process of the server.

    python -m hauler.server.initial JOB_DIR JOB_ID MODULE CONFIG_JSON CHUNK_BYTES KEEP_ROUNDS

The job's code (its imports, its memory, its crashes) stays out of the server: a job that
imports a framework to build its model costs the server nothing, and a job that fails here
fails alone. Exit status 0 once round 0 is committed; otherwise the reason is on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hauler.core.package import load_job_module
from hauler.model import Manifest
from hauler.server.rounds import RoundStore


def build_round_zero(job_dir: Path, job_id: str, module_name: str, config: dict, chunk_bytes: int,
                     keep_rounds: int) -> None:
    """Write and commit round 0: the module's layout(config), each tensor filled by fill(name, out, config)."""
    module = load_job_module(job_dir / "app", job_id, module_name)
    layout = module.layout(config)
    manifest = Manifest.build([(name, dtype, tuple(shape)) for name, dtype, shape in layout], chunk_bytes)
    rounds = RoundStore(job_dir, keep_rounds)
    with rounds.create(0, manifest) as model:
        for name, array in model.arrays().items():
            module.fill(name, array, config)
        rounds.commit(0, model.compute_digests())


def main(argv: list[str]) -> int:
    job_dir, job_id, module_name, config_json, chunk_bytes, keep_rounds = argv
    try:
        build_round_zero(Path(job_dir), job_id, module_name, json.loads(config_json), int(chunk_bytes),
                         int(keep_rounds))
    except Exception as error:  # the job's own code may raise anything: say what, to the server
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
