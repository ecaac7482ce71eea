"""Sites' last local models of a job, kept once each for cross-site evaluation:
`local/<site>.safetensors` with `local/<site>.manifest.json` beside it.

The manifest (with the digests the site announced and every landed tensor was checked against)
is written last, atomically, so its presence means the file is complete. A site's name holds no
`/` (its certificate's name, checked at hello), so its files stay in this folder.
`EvaluatedModels` opens the models a job serves for evaluation by name: GLOBAL, its latest
round, or a site's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hauler.core.errors import JobError
from hauler.core.files import replace_json
from hauler.model.file import ModelFile
from hauler.model.manifest import Manifest
from hauler.model.rounds import RoundStore, opened

GLOBAL = "global"  # the name of the job's final global model among the models evaluated


class LocalModels:
    def __init__(self, job_dir: Path) -> None:
        self.directory = job_dir / "local"

    def path(self, site: str) -> Path:
        return self.directory / f"{site}.safetensors"

    def manifest_path(self, site: str) -> Path:
        return self.directory / f"{site}.manifest.json"

    def create(self, site: str, manifest: Manifest) -> ModelFile:
        """A writable file for `site`'s model (the one it had stored, if any, is no more)."""
        self.manifest_path(site).unlink(missing_ok=True)
        return ModelFile.create(self.path(site), manifest)

    def commit(self, site: str, manifest: Manifest) -> None:
        """`site`'s file is complete and checked: say so, with its digests."""
        replace_json(self.manifest_path(site), manifest.to_json())

    def adopt(self, site: str, path: Path, manifest: Manifest) -> None:
        """Take the complete, checked file at `path` (on this file system) as `site`'s model."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest_path(site).unlink(missing_ok=True)
        os.replace(path, self.path(site))
        self.commit(site, manifest)

    def open(self, site: str) -> ModelFile:
        """`site`'s stored model, read-only, with its digests."""
        manifest = Manifest.from_json(json.loads(self.manifest_path(site).read_text()))
        return opened(self.path(site), manifest)


def open_local(path: Path, layout: Manifest, whose: str) -> ModelFile:
    """The local model `whose` kept at `path` (where its training code wrote it), read-only,
    with its digests; it must have the job's model's layout."""
    if not path.exists():
        raise JobError(
            f"{whose} has no local model of this job: it did not train the round before "
            "cross-site evaluation, or its files were removed"
        )
    model = ModelFile.open(path, chunk_bytes=layout.chunk_bytes)
    if not model.manifest.same_layout(layout):
        model.close()
        raise JobError(f"{whose}'s local model does not have the job's model's tensors")
    model.compute_digests()
    return model


class EvaluatedModels:
    """The models a job serves for evaluation, each opened once (read-only, with digests):
    GLOBAL, its latest round, or a site's local model."""

    def __init__(self, rounds: RoundStore, local: LocalModels) -> None:
        self.rounds, self.local = rounds, local
        self._opened: dict[str, ModelFile] = {}

    def get(self, name: str) -> ModelFile:
        if name not in self._opened:
            self._opened[name] = (
                self.rounds.open(self.rounds.latest() or 0)
                if name == GLOBAL
                else self.local.open(name)
            )
        return self._opened[name]

    def close(self) -> None:
        for model in self._opened.values():
            model.close()
        self._opened.clear()
