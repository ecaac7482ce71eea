"""Cross-site evaluation: train with ScatterAndGather for `num_rounds` (none: evaluate round 0,
a given model), then every site evaluates, on its own data, the final global model and every
other site's last local model.

1. In the last training round every site keeps the model it trained (its local model).
2. Every site is asked for it at once; the federation keeps each one once, in the job's folder.
   A site whose config keeps its model (`share_local_model = false`) declines: its model is
   not evaluated, and it evaluates the global model only (local models are shared among the
   sites that share theirs).
3. Every site walks through the models in turn, all sites at once; each model reaches it over
   the data plane and it answers with metrics only.

Nothing is lost to one site: a cell that fails is marked missing with why and the site goes on
with the next model; a site that is gone (its session lost, or silent past the timeouts) has
the rest of its row marked missing at once, and a model its site could not hand over has its
column marked missing. The matrix of every metric ends in the job's metrics (`cross_site`).
"""

from __future__ import annotations

import asyncio

from hauler.core.config import WorkflowConfig
from hauler.core.errors import (
    ConnectionLost,
    HaulerError,
    JobCodeError,
    TaskRefused,
    TransferTimeout,
)
from hauler.model.local_models import GLOBAL
from hauler.workflows.base import Federation
from hauler.workflows.records import evaluation_record, matrix_record
from hauler.workflows.scatter_and_gather import ScatterAndGather

GONE = (ConnectionLost, TransferTimeout)  # the site itself is gone, not one evaluation


class CrossSiteEvaluation:
    def __init__(self, config: WorkflowConfig, sites: list[str] | None = None) -> None:
        self.config = config
        self.sites = sites
        self._cells: dict[tuple[str, str], dict[str, float]] = {}
        self._unavailable: dict[str, str] = {}  # site -> why its model could not be had

    async def run(self, federation: Federation, *, first_round: int = 0) -> None:
        """Train (from `first_round`, a resumed job's), collect the local models, evaluate."""
        training = ScatterAndGather(self.config, self.sites, keep_local=True)
        await training.run(federation, first_round=first_round)
        sites = await federation.wait_for_sites(self.config.min_clients, self.sites)
        trained = self.config.num_rounds > 0  # else no site has a local model
        kept = await self._collect(federation, sites) if trained else []
        models = [GLOBAL, *(site for site in sites if trained and site not in kept)]
        federation.emit("evaluation.started", sites=sites, models=models, kept=kept)
        async with asyncio.TaskGroup() as group:
            for site in sites:
                row = [GLOBAL] if site in kept else [m for m in models if m != site]
                group.create_task(self._row(federation, site, row))
        federation.record(matrix_record(sites, models, self._cells, kept=kept))
        federation.emit("evaluation.complete", sites=sites, models=models)

    async def _collect(self, federation: Federation, sites: list[str]) -> list[str]:
        """Ask every site for its local model at once; returns the sites that keep theirs."""
        kept: list[str] = []

        async def collect(site: str) -> None:
            try:
                await federation.submit_local_model(site)
            except TaskRefused:
                kept.append(site)
                federation.emit("model.kept", site=site)
            except HaulerError as error:
                self._unavailable[site] = f"{site}'s model could not be had: {_reason(error)}"
                federation.emit("model.missing", site=site, error=error)

        async with asyncio.TaskGroup() as group:
            for site in sites:
                group.create_task(collect(site))
        return [site for site in sites if site in kept]

    async def _row(self, federation: Federation, site: str, models: list[str]) -> None:
        """`site` evaluates `models` in turn; a failure marks its cell missing, a site gone the
        rest of its row."""
        gone = ""
        for model in models:
            missing = gone or self._unavailable.get(model, "")
            if missing:
                federation.record(evaluation_record(site, model, None, missing))
            else:
                gone = await self._cell(federation, site, model)

    async def _cell(self, federation: Federation, site: str, model: str) -> str:
        """`site` evaluates `model`, its cell recorded either way; returns why the site is gone,
        if it is."""
        try:
            evaluation = await federation.evaluate(site, model)
        except HaulerError as error:
            federation.emit("evaluation.failed", site=site, model=model, error=error)
            federation.record(evaluation_record(site, model, None, _reason(error)))
            return f"{site} is gone: {_reason(error)}" if isinstance(error, GONE) else ""
        self._cells[site, model] = evaluation.metrics
        federation.emit("evaluation.result", site=site, model=model, metrics=evaluation.metrics)
        federation.record(evaluation_record(site, model, evaluation))
        return ""


def _reason(error: HaulerError) -> str:
    """Why, for the job's metrics, which every reader of the job sees: what the job's own code
    said stays in the events (shown to its submitter and project admins only)."""
    return (
        "the job's code failed; see the job's events"
        if isinstance(error, JobCodeError)
        else str(error)
    )
