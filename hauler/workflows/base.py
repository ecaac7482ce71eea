"""What a workflow may ask of a federation: decisions in, results out, never a byte.

The server implements `Federation` over real sites; tests may implement it in
memory. A workflow only chooses sites, starts rounds and decides when one is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TrainResult:
    """A site's accepted contribution to a round (already folded into the aggregate)."""

    site: str
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Federation(Protocol):
    async def wait_for_sites(self, count: int, wanted: list[str] | None) -> list[str]:
        """Sites to use, once at least `count` of the `wanted` ones (or any) are connected."""
        ...

    async def begin_round(self, round: int) -> None:
        """Prepare round `round`: its global model is the one tasks will carry."""
        ...

    async def train(self, site: str, round: int) -> TrainResult:
        """Send the round's model to `site`, and fold its update into the round's aggregate."""
        ...

    async def end_round(self, round: int, results: list[TrainResult]) -> None:
        """Turn the round's aggregate into the next global model."""
        ...

    def emit(self, name: str, **fields: Any) -> None:
        """Report an event of the job; an `error` field may be the exception itself, which the
        federation renders (and keeps from readers who may not see the job's own errors)."""
        ...
