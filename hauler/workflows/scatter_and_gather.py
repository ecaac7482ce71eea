"""ScatterAndGather (FedAvg): each round, send the global model to the sites, gather
their updates, and average them into the next global model.

A round is complete when every site answered, or when `min_clients` answered and
`wait_time_after_min_received` more seconds passed; stragglers are then cancelled
and contribute nothing. A site that fails only fails the round if fewer than
`min_clients` remain.
"""

from __future__ import annotations

import asyncio

from hauler.core.config import WorkflowConfig
from hauler.core.errors import HaulerError, JobError
from hauler.workflows.base import Federation, TrainResult


class ScatterAndGather:
    def __init__(
        self, config: WorkflowConfig, sites: list[str] | None = None, *, keep_local: bool = False
    ) -> None:
        """`keep_local`: the sites keep the model they train in the last round (cross-site
        evaluation asks for it afterwards)."""
        self.config = config
        self.sites = sites
        self.keep_local = keep_local

    async def run(self, federation: Federation, *, first_round: int = 0) -> None:
        """Run rounds `first_round` .. num_rounds-1."""
        for round in range(first_round, self.config.num_rounds):
            sites = await federation.wait_for_sites(self.config.min_clients, self.sites)
            federation.emit("round.started", round=round, sites=sites)
            await federation.begin_round(round)
            results = await self.gather(federation, sites, round)
            if len(results) < self.config.min_clients:
                raise JobError(
                    f"round {round}: {len(results)} of {len(sites)} sites returned a result, "
                    f"fewer than min_clients={self.config.min_clients}; "
                    "see the job's events for why"
                )
            await federation.end_round(round, results)
            federation.emit("round.complete", round=round, sites=[r.site for r in results])

    async def gather(
        self, federation: Federation, sites: list[str], round: int
    ) -> list[TrainResult]:
        """Train on every site at once; stop waiting once the round is complete."""
        results: list[TrainResult] = []

        keep_local = self.keep_local and round == self.config.num_rounds - 1

        async def train_one(site: str) -> None:
            try:
                results.append(await federation.train(site, round, keep_local=keep_local))
            except HaulerError as error:
                federation.emit("site.failed", round=round, site=site, error=error)

        async with asyncio.TaskGroup() as group:
            pending = {group.create_task(train_one(site)) for site in sites}
            while pending and len(results) < self.config.min_clients:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                _, pending = await asyncio.wait(
                    pending, timeout=self.config.wait_time_after_min_received
                )
            for task in pending:
                federation.emit("site.cancelled", round=round, reason="round complete without it")
                task.cancel()
        return results
