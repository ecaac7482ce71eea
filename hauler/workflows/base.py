"""What a workflow may ask of a federation: decisions in, results out, never a byte.

The server implements `Federation` over real sites; tests may implement it in
memory. A workflow only chooses sites, starts rounds and decides when one is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TrainResult:
    """A site's accepted contribution to a round (already folded into the aggregate); its
    `validation` metrics are the round's global model's, measured by the site before training."""

    site: str
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """What a site measured of one model on its own data; `timings`: download_s, evaluate_s."""

    metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    started_s: float = 0.0  # unix time the site was asked


class Workflow(Protocol):
    async def run(self, federation: Federation, *, first_round: int = 0) -> None:
        """Run the job over `federation`, from round `first_round` (a resumed job's)."""
        ...


class Federation(Protocol):
    async def wait_for_sites(self, count: int, wanted: list[str] | None) -> list[str]:
        """Sites to use, once at least `count` of the `wanted` ones (or any) are connected."""
        ...

    async def begin_round(self, round: int) -> None:
        """Prepare round `round`: its global model is the one tasks will carry."""
        ...

    async def train(self, site: str, round: int, *, keep_local: bool = False) -> TrainResult:
        """Send the round's model to `site`, and fold its update into the round's aggregate;
        with `keep_local`, the site also keeps the model it trained as its local model."""
        ...

    async def submit_local_model(self, site: str) -> None:
        """Have `site` hand over its local model, kept once in the job's folder; TaskRefused if
        the site keeps it to itself."""
        ...

    async def evaluate(self, site: str, model: str) -> Evaluation:
        """Have `site` evaluate `model` on its own data: "global" (the job's latest global
        model) or the name of a site whose local model was handed over."""
        ...

    def record(self, record: dict[str, Any]) -> None:
        """Write a record into the job's metrics."""
        ...

    async def end_round(self, round: int, results: list[TrainResult]) -> None:
        """Turn the round's aggregate into the next global model."""
        ...

    def emit(self, name: str, **fields: Any) -> None:
        """Report an event of the job; an `error` field may be the exception itself, which the
        federation renders (and keeps from readers who may not see the job's own errors)."""
        ...
