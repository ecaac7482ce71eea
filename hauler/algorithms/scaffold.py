"""SCAFFOLD (Karimireddy et al. 2020, option II): control variates that correct client drift.

The server's control variate c is part of the global model: a float tensor `scaffold.c/<name>`
per float model tensor, which `layout` adds to a model module's layout (its `fill` writes
zeros). So c is stored with the model in the server's round files, travels to the sites with
it, and is folded chunk by chunk with the uploads like every other tensor: the server has no
code of its own for SCAFFOLD. A site keeps its own variate c_i in its work folder, in
`scaffold/` (`SiteVariates`: memory-mapped files, zeros at first, kept across rounds, never sent
as such).

Each local step's gradient is corrected, g <- g + c - c_i (`Scaffold.correct`, after backward).
After K steps at learning rate eta, from the global model x to the local model y:

    c_i+ = c_i - c + (x - y) / (K eta)

The site writes c_i+ to its file and sends c + (c_i+ - c_i) in the variate slots of the same
upload, so the server's FedAvg of those slots is c + the weighted mean of the sites' changes
(c_i+ - c_i): the paper's rule with a global step size of 1 when every site takes part with
equal weights; with weights (sample counts, say) it is their weighted mean, as Hauler weighs
the model, and with partial participation the mean over the sites that took part (the paper
scales it by their share). The server optimizer must therefore be fedavg, which the server
checks. With an upload codec the slots travel as deltas, c_i+ - c_i, like any update.

A site's c_i advances once per global model it trains: c_i+ is written to a new file, and a
small state file, replaced atomically, names it, the one before it and the global model it was
trained from. A site that trains the same global model again (it restarted, or its upload was
lost and the round is retried) starts again from the c_i before, so its variate does not
advance twice; a crash while c_i+ is written leaves the state naming whole files. A site
dropped from a round whose others went on keeps its advanced c_i (it cannot tell). Under
`hauler simulate --ray` a virtual site's work folder is its Ray worker's, so its c_i starts
again from zero whenever it trains on another worker than the round before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import xxhash

from hauler.client.tensors import layout_of, to_numpy, to_torch
from hauler.core.errors import ConfigError, JobError
from hauler.core.files import replace_json
from hauler.model import VARIATE_PREFIX, Manifest, ModelFile, is_float

SITE_FOLDER = "scaffold"  # a site's own variates c_i, in its job work folder
CHUNK_BYTES = 4 << 20  # the site files' manifest needs one; they never travel
Value = TypeVar("Value")


def variate_name(name: str) -> str:
    """The name of model tensor `name`'s control variate."""
    return VARIATE_PREFIX + name


def is_variate(name: str) -> bool:
    """Whether `name` is a control variate rather than a model tensor."""
    return name.startswith(VARIATE_PREFIX)


def layout(base: Sequence[tuple], names: Iterable[str] | None = None) -> list[tuple]:
    """A model module's `layout(config)` with the server's control variate added: a tensor
    `scaffold.c/<name>` (float32; float64 for float64) for every float tensor of `base`, or
    only for those in `names` (the trained parameters, if the model has float buffers)."""
    wanted = None if names is None else set(names)
    return [
        *base,
        *(
            (variate_name(name), "F64" if dtype == "F64" else "F32", tuple(shape))
            for name, dtype, shape, *tie in base
            if is_float(dtype) and not tie and (wanted is None or name in wanted)
        ),
    ]


def weights(model: Mapping[str, Value]) -> dict[str, Value]:
    """The model without its control variates: what the network loads."""
    return {name: value for name, value in model.items() if not is_variate(name)}


def variates(model: Mapping[str, Value]) -> dict[str, Value]:
    """The model's control variates alone."""
    return {name: value for name, value in model.items() if is_variate(name)}


class Scaffold:
    """One round of SCAFFOLD on a site: `net` (loaded from `global_model`, the received
    tensors) trained with plain SGD at learning rate `lr`, its variate kept in `workdir`."""

    def __init__(
        self, net: Any, global_model: Mapping[str, Any], workdir: Path, *, lr: float
    ) -> None:
        self._slots = variates(global_model)
        if not self._slots:
            raise ConfigError(
                "SCAFFOLD: the global model has no control variates; build it with "
                "hauler.algorithms.scaffold.layout() in the job's model module"
            )
        if not lr > 0:
            raise ConfigError(f"SCAFFOLD needs the local learning rate (> 0), got {lr}")
        self.lr, self.steps = lr, 0
        self._store = SiteVariates(Path(workdir) / SITE_FOLDER)
        self._received = model_digest(global_model)
        self._base = self._store.base_for(self._received)
        self._site = self._store.open(self._base, self._slots)
        site = to_torch(self._site.arrays())
        self._terms = [
            (variate, w, global_model[name], self._slots[variate], site[variate])
            for name, w in net.named_parameters()
            if (variate := variate_name(name)) in self._slots
        ]

    def correct(self) -> None:
        """grad <- grad + c - c_i for every parameter: call it after each backward, before the
        optimizer's step (it also counts the steps K)."""
        self.steps += 1
        for _, w, _, c, c_site in self._terms:
            if w.grad is not None:
                w.grad.add_(c.to(w.device)).sub_(c_site.to(w.device))

    def update(self) -> dict[str, Any]:
        """After training: c_i+ = c_i - c + (x - y)/(K lr) into a new site file, and the
        variate slots to send, c + (c_i+ - c_i), written over the received variates (send them
        as they are, not with delta=True: call this last, right before hauler.send)."""
        if self.steps == 0:
            raise JobError("Scaffold.update(): no steps taken; call correct() after each backward")
        version, advanced = self._store.create_copy(self._site)
        with advanced:
            new = to_torch(advanced.arrays())
            for variate, w, x, c, _ in self._terms:
                change = x.to(c.dtype) - w.detach().to("cpu", c.dtype)
                change.div_(self.steps * self.lr).sub_(c)  # c_i+ - c_i = (x - y)/(K lr) - c
                new[variate].add_(change)
                c.add_(change)
            advanced.flush()
        self._terms = []
        self._site.close()
        self._store.commit(version, before=self._base, trained_on=self._received)
        return dict(self._slots)


class SiteVariates:
    """A site's variates c_i in `folder`: whole files `c-<k>.safetensors` (c-0 is zeros) and
    `state.json`, which names the current one, the one before it, and the digest of the global
    model the current one was trained from. A file is written in full before the state names
    it, and the state is replaced atomically, so a crash leaves it naming whole files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.current, self.before, self.trained_on = self._read_state()

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def path(self, version: int) -> Path:
        return self.folder / f"c-{version}.safetensors"

    def base_for(self, received: str) -> int:
        """The version to train from: the one before the current if the current was trained
        from this very global model (the round is trained again; that update did not count),
        else the current."""
        return self.before if received == self.trained_on else self.current

    def open(self, version: int, slots: Mapping[str, Any]) -> ModelFile:
        """Version `version` for these slots (version 0 is made, zeros, if missing)."""
        path = self.path(version)
        if version and not path.exists():
            raise JobError(f"{path}, named by {self.state_path}, is gone: {self._start_again}")
        self.folder.mkdir(parents=True, exist_ok=True)
        return open_site_variates(path, slots)

    def create_copy(self, base: ModelFile) -> tuple[int, ModelFile]:
        """A new version, not named by the state yet, holding a copy of `base`."""
        version = max(self.current, self.before) + 1
        copy = ModelFile.create(self.path(version), base.manifest)
        copy.copy_from(base)
        return version, copy

    def commit(self, version: int, *, before: int, trained_on: str) -> None:
        """Name `version` (written and flushed) as the current one, then remove the others."""
        replace_json(
            self.state_path, {"current": version, "before": before, "trained_on": trained_on}
        )
        self.current, self.before, self.trained_on = version, before, trained_on
        for path in self.folder.glob("c-*.safetensors"):
            if path not in (self.path(version), self.path(before)):
                path.unlink(missing_ok=True)

    def _read_state(self) -> tuple[int, int, str]:
        if not self.state_path.exists():
            return 0, 0, ""
        try:
            state = json.loads(self.state_path.read_text())
            return int(state["current"]), int(state["before"]), str(state["trained_on"])
        except (ValueError, KeyError, TypeError) as error:
            reason = f"{self.state_path}: unreadable ({error})"
            raise JobError(f"{reason}: {self._start_again}") from None

    @property
    def _start_again(self) -> str:
        return f"remove {self.folder} to start this site's variates again at zero"


def model_digest(model: Mapping[str, Any]) -> str:
    """A digest of every tensor's name and bytes: which global model a site trains from."""
    digest = xxhash.xxh3_128()
    for name, array in sorted(to_numpy(model).items()):
        digest.update(name.encode() + b"\0")
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def open_site_variates(path: Path, slots: Mapping[str, Any]) -> ModelFile:
    """The site's variate file for these slots: zeros when new, else as the last round left it."""
    manifest = Manifest.build(layout_of(slots), CHUNK_BYTES)
    if not path.exists():
        return ModelFile.create(path, manifest)
    site = ModelFile.open(path, writable=True, chunk_bytes=CHUNK_BYTES)
    if not site.manifest.same_layout(manifest):
        site.close()
        raise JobError(f"{path} holds the variates of another model: remove it to start at zero")
    return site
