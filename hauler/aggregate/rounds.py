"""A job's rounds as a federation runs them, the same on a server and in the simulator: round
r's global model is opened to be served, every update folds into round r+1's file, and
`finish` makes that file round r+1 (hashed, committed, its memory given back)."""

from __future__ import annotations

from pathlib import Path

from hauler.aggregate.fedavg import Contribution, FedAvg
from hauler.core.errors import LocalProtocolError
from hauler.core.resources import release_free_memory
from hauler.model import Manifest, ModelFile
from hauler.model.rounds import RoundStore


class RoundAggregate:
    """The round being run: its global model, read-only, and the aggregate of its updates."""

    def __init__(self, job_dir: Path, *, keep_rounds: int, memory_budget_bytes: int) -> None:
        self.job_dir = job_dir
        self.rounds = RoundStore(job_dir, keep_rounds)
        self.memory_budget_bytes = memory_budget_bytes
        self._global: ModelFile | None = None
        self._output: ModelFile | None = None
        self._fedavg: FedAvg | None = None

    @property
    def global_model(self) -> ModelFile:
        if self._global is None:
            raise LocalProtocolError("no round begun")
        return self._global

    @property
    def fedavg(self) -> FedAvg:
        if self._fedavg is None:
            raise LocalProtocolError("no round begun")
        return self._fedavg

    def begin(self, round: int) -> ModelFile:
        """Open round `round`'s global model and round + 1's file to fold into; returns the
        former."""
        self.close()
        self._global = self.rounds.open(round)
        manifest = self._global.manifest
        if self._fedavg is None:
            self._fedavg = FedAvg(
                manifest, workdir=self.job_dir, memory_budget_bytes=self.memory_budget_bytes
            )
        self._output = self.rounds.create(round + 1, manifest)
        self._fedavg.begin(self._output, base=self._global)
        return self._global

    def contribution(
        self, weight: float, *, delta: bool = False, max_update_norm: float | None = None
    ) -> Contribution:
        return self.fedavg.contribution(weight, delta=delta, max_update_norm=max_update_norm)

    def finish(self, round: int) -> Manifest:
        """Average, hash and commit round + 1 (blocking: run it in a worker thread)."""
        manifest = self.fedavg.finish()
        self.rounds.commit(round + 1, manifest)
        release_free_memory()  # what the round's transfers freed; else the heap creeps up
        return manifest

    def close(self) -> None:
        for model in (self._global, self._output):
            if model is not None:
                model.close()
        self._global = self._output = None
