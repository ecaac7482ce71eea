"""Cyclic: the model travels from site to site, each training it in turn, `num_rounds` times
through every site (in a fixed order, or shuffled each round).

Each turn (a hop) is one round of the federation with one site: the site downloads the round's
model, trains it, uploads it, and its upload, folded alone with weight 1, is the next round's
model bit for bit (`aggregate.Recipe.relay`). So the server relays the model on the data plane
from one round file to the next, with the resume, timeouts, checks and records of any round.
A site that fails its turn is skipped: the next one takes the same model; the job fails only if
every site in a row fails.
"""

from __future__ import annotations

import random

from hauler.core.config import WorkflowConfig
from hauler.core.errors import HaulerError, JobError
from hauler.workflows.base import Federation


class Cyclic:
    def __init__(self, config: WorkflowConfig, sites: list[str] | None = None) -> None:
        self.config = config
        self.sites = sites

    async def run(self, federation: Federation, *, first_round: int = 0) -> None:
        """Pass the model on from hop `first_round` (a resumed job's) to the last one."""
        sites = await self._members(federation)
        hops = self.config.num_rounds * len(sites)
        federation.emit("rounds.planned", rounds=hops, sites=sites)
        hop, failures = first_round, 0
        for turn in range(first_round, hops):
            cycle, position = divmod(turn, len(sites))
            site = self.order(sites, cycle)[position]
            if await self._hop(federation, site, hop, cycle):
                hop, failures = hop + 1, 0
            else:
                failures += 1
            if failures == len(sites):
                raise JobError(
                    f"round {hop}: every site of the cycle failed in turn; see the job's events"
                )

    async def _members(self, federation: Federation) -> list[str]:
        """The sites of the cycle: those connected at the start, in the job's order if it lists
        them."""
        chosen = await federation.wait_for_sites(self.config.min_clients, self.sites)
        return [site for site in self.sites if site in chosen] if self.sites else chosen

    def order(self, sites: list[str], cycle: int) -> list[str]:
        """The sites' order in round `cycle`: as they are, or shuffled by the seed and the round
        (the same every time, so a resumed job goes on where it was)."""
        if self.config.order == "fixed":
            return sites
        shuffled = list(sites)
        random.Random(f"{self.config.seed}:{cycle}").shuffle(shuffled)
        return shuffled

    async def _hop(self, federation: Federation, site: str, hop: int, cycle: int) -> bool:
        """One site's turn; False if it failed (the model stays as it was)."""
        federation.emit("round.started", round=hop, sites=[site], cycle=cycle)
        await federation.begin_round(hop)
        try:
            result = await federation.train(site, hop)
        except HaulerError as error:
            federation.emit("site.failed", round=hop, site=site, error=error)
            return False
        await federation.end_round(hop, [result])
        federation.emit("round.complete", round=hop, sites=[site], cycle=cycle)
        return True
