"""Cyclic: the model travels from site to site, each training it in turn, `num_rounds` times
through every site (in a fixed order, or shuffled each round).

Each turn (a hop) is one round of the federation with one site: the site downloads the round's
model, trains it, uploads it, and its upload, folded alone with weight 1, is the next round's
model bit for bit (`aggregate.Recipe.relay`). So the server relays the model on the data plane
from one round file to the next, with the resume, timeouts, checks and records of any round.
A site that fails its turn is skipped for that hop: the next one in the order takes the same
model, and the hop after goes on where the order says. So which site takes a hop depends on
the hop alone (and on which sites failed it): a job resumed after a restart goes on with the
site it would have had. Every hop is made; the job fails only if every site fails the same hop.
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
        for hop in range(first_round, hops):
            await self._relay(federation, sites, hop)

    async def _relay(self, federation: Federation, sites: list[str], hop: int) -> None:
        """Hop `hop`, by the site the order gives it, or the next ones if it fails."""
        cycle, position = divmod(hop, len(sites))
        order = self.order(sites, cycle)
        for attempt in range(len(sites)):
            if await self._hop(federation, order[(position + attempt) % len(sites)], hop, cycle):
                return
        raise JobError(f"round {hop}: every site of the cycle failed it; see the job's events")

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
