"""SCAFFOLD (Karimireddy et al. 2020, option II): control variates that correct client drift.

The server's control variate c is part of the global model: a float tensor `scaffold.c/<name>`
per float model tensor, which `layout` adds to a model module's layout (its `fill` writes
zeros). So c is stored with the model in the server's round files, travels to the sites with
it, and is folded chunk by chunk with the uploads like every other tensor: the server has no
code of its own for SCAFFOLD. A site keeps its own variate c_i in `scaffold.safetensors` in its
work folder (memory-mapped, zeros at first, kept across rounds, never sent as such).

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

A site's c_i advances when it trains; a site dropped from a round (its upload not folded)
still keeps its advanced c_i, and a site that trains a round again starts from it. Under
`hauler simulate --ray` a virtual site's work folder is its Ray worker's, so its c_i starts
again from zero whenever it trains on another worker than the round before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hauler.client.tensors import layout_of, to_torch
from hauler.core.errors import ConfigError, JobError
from hauler.model import VARIATE_PREFIX, Manifest, ModelFile, is_float

SITE_FILE = "scaffold.safetensors"  # a site's own variate c_i, in its job work folder
CHUNK_BYTES = 4 << 20  # the site file's manifest needs one; it never travels
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
        self._site = open_site_variates(Path(workdir) / SITE_FILE, self._slots)
        site = to_torch(self._site.arrays())
        self._terms = [
            (w, global_model[name], self._slots[variate], site[variate])
            for name, w in net.named_parameters()
            if (variate := variate_name(name)) in self._slots
        ]

    def correct(self) -> None:
        """grad <- grad + c - c_i for every parameter: call it after each backward, before the
        optimizer's step (it also counts the steps K)."""
        self.steps += 1
        for w, _, c, c_site in self._terms:
            if w.grad is not None:
                w.grad.add_(c.to(w.device)).sub_(c_site.to(w.device))

    def update(self) -> dict[str, Any]:
        """After training: c_i <- c_i - c + (x - y)/(K lr) in the site's file, and the variate
        slots to send, c + that change, written over the received variates (send them as they
        are, not with delta=True: call this last, right before hauler.send)."""
        if self.steps == 0:
            raise JobError("Scaffold.update(): no steps taken; call correct() after each backward")
        for w, x, c, c_site in self._terms:
            change = x.to(c.dtype) - w.detach().to("cpu", c.dtype)
            change.div_(self.steps * self.lr).sub_(c)  # c_i+ - c_i = (x - y)/(K lr) - c
            c_site.add_(change)
            c.add_(change)
        self._terms = []
        self._site.flush()
        self._site.close()
        return dict(self._slots)


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
