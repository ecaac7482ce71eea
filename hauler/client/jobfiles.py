"""A site's files of one job, in `jobs/<id>/`: pre-sized once, overwritten in place every round.

- `global.safetensors`: the global model the site received, its digests checked; with it,
  `global.json` names the model (its digest), written only once the file is verified and
  removed before the file changes, so it never names a model the file does not hold, even
  after a crash. A site holding round r downloads round r + 1 as an encoded delta.
- `model.safetensors`: the copy the job's code trains on, when the job has a codec: the
  global model must survive training, both as the base the update is taken from and as the
  base the next round's delta is added to. This costs a second model-sized file on disk and
  one copy of the model per round (memcpy speed, a fraction of any transfer it saves); a job
  without codecs trains on the received file itself, as it always did.
- `residual.safetensors`: what the upload codec dropped, carried to the next round (error
  feedback), memory-mapped.
- `update.bin`: the encoded update, uploaded from there (again, if the server asks).
- `local.safetensors`: the model the site trained in the last round before cross-site
  evaluation, written by its training code on `send()`, uploaded if the server asks for it.
- `evaluate.safetensors`: where models to evaluate land (cross-site evaluation), one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

from hauler.core.config import TransferConfig
from hauler.core.files import replace_json
from hauler.model import Manifest, ModelFile
from hauler.model.local_models import open_local
from hauler.model.updates import RESIDUAL, open_residual, wide_manifest


class JobFiles:
    """The model files one job keeps on a site."""

    def __init__(self, folder: Path, transfer: TransferConfig) -> None:
        self.folder, self.transfer = folder, transfer
        self.separate = transfer.upload != "none" or transfer.download != "none"
        self.received: ModelFile | None = None
        self._training: ModelFile | None = None
        self._residual: ModelFile | None = None
        self._evaluated: ModelFile | None = None
        self._local: ModelFile | None = None
        self._manifest: Manifest | None = None

    def manifest_of(self, data: object) -> Manifest:
        """A task's manifest (JSON from the server): rows compared with the last task's, which
        was validated, so a model of thousands of tensors is not parsed anew every round; any
        other layout is parsed and validated in full."""
        last = self._manifest
        self._manifest = Manifest.from_json(data) if last is None else last.like(data)
        return self._manifest

    @property
    def marker(self) -> Path:
        return self.folder / "global.json"

    @property
    def update_path(self) -> Path:
        return self.folder / "update.bin"

    @property
    def local_path(self) -> Path:
        return self.folder / "local.safetensors"

    def held(self) -> str | None:
        """The digest of the verified global model the site holds, if any."""
        try:
            return str(json.loads(self.marker.read_text())["digest"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def global_file(self, manifest: Manifest) -> ModelFile:
        """The file the global model is received into, re-created only if the layout changes;
        it no longer holds a verified model from now on."""
        self.marker.unlink(missing_ok=True)
        self.received = _same_layout(self.received, self.folder / "global.safetensors", manifest)
        return self.received

    def mark_received(self, manifest: Manifest) -> None:
        """The global file holds `manifest`'s model, every tensor checked: say so. Not synced
        to disk first (a whole model's msync before training): the marker only picks the base
        of the next round's delta, whose every tensor is checked, and a mismatch downloads the
        whole model."""
        assert self.received is not None
        self.received.manifest = manifest
        replace_json(self.marker, {"digest": manifest.digest})

    def training_copy(self) -> ModelFile:
        """The model the job's code trains on: a copy of the received one, or (without codecs)
        the received file itself, which then no longer holds the global model."""
        assert self.received is not None
        if not self.separate:
            self.marker.unlink(missing_ok=True)
            return self.received
        manifest = self.received.manifest
        self._training = _same_layout(self._training, self.folder / "model.safetensors", manifest)
        self._training.manifest = manifest
        self._training.copy_from(self.received)
        return self._training

    def evaluated(self, manifest: Manifest) -> ModelFile:
        """The file a model to evaluate lands in, re-created only if the layout changes."""
        self._evaluated = _same_layout(
            self._evaluated, self.folder / "evaluate.safetensors", manifest
        )
        return self._evaluated

    def local_model(self, manifest: Manifest) -> ModelFile:
        """The site's local model, read-only, with its digests; it must have `manifest`'s
        layout (the job's model). Kept open until the job's files close."""
        if self._local is not None:
            self._local.close()
        self._local = open_local(self.local_path, manifest, "this site")
        return self._local

    def residual(self, manifest: Manifest) -> ModelFile | None:
        """The upload codec's residual (zero at first), if the job keeps error feedback."""
        if self.transfer.upload == "none" or not self.transfer.error_feedback:
            return None
        if self._residual is None or not _residual_of(self._residual, manifest):
            if self._residual is not None:
                self._residual.close()
            self._residual = open_residual(self.folder / "residual.safetensors", manifest)
        return self._residual

    def close(self) -> None:
        for model in (self.received, self._training, self._residual, self._evaluated, self._local):
            if model is not None:
                model.close()
        self.received = self._training = self._residual = self._evaluated = self._local = None

    def remove(self) -> None:
        """The job ended: its model files are of no more use here."""
        self.close()
        for name in ("global.safetensors", "global.json", "model.safetensors", "update.bin"):
            (self.folder / name).unlink(missing_ok=True)
        for name in ("local.safetensors", "evaluate.safetensors"):
            (self.folder / name).unlink(missing_ok=True)
        (self.folder / "residual.safetensors").unlink(missing_ok=True)


def _residual_of(residual: ModelFile, manifest: Manifest) -> bool:
    return residual.manifest.same_layout(wide_manifest(manifest, [RESIDUAL]))


def _same_layout(model: ModelFile | None, path: Path, manifest: Manifest) -> ModelFile:
    """`model` if it has `manifest`'s layout, else a new file for it at `path`."""
    if model is not None and model.manifest.same_layout(manifest):
        return model
    if model is not None:
        model.close()
    return ModelFile.create(path, manifest)
