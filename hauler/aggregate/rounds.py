"""A job's rounds as a federation runs them, the same on a server and in the simulator: round
r's global model is opened to be served, every update folds into round r+1's file, and
`finish` makes that file round r+1 (with the server optimizer's state and, with a download
codec, the encoded delta from round r), hashed, committed, its memory given back."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from hauler.aggregate import integers
from hauler.aggregate.fedavg import Contribution, FedAvg
from hauler.aggregate.finish import DownloadEncoder, RoundFinish
from hauler.aggregate.optimizers import OptimizerSettings, ServerOptimizer, make_optimizer
from hauler.aggregate.state import RESIDUAL, RoundState, wide_manifest
from hauler.core.config import JobConfig
from hauler.core.errors import ConfigError, LocalProtocolError
from hauler.core.resources import release_free_memory
from hauler.model import VARIATE_PREFIX, ChunkPlan, Manifest, ModelFile
from hauler.model.codecs import DEFAULT_BLOCK_ELEMENTS, make_codec
from hauler.model.encoded import EncodedWriter, encoded_limit
from hauler.model.rounds import RoundStore


@dataclass(frozen=True)
class Recipe:
    """How a round's updates become the next global model: the server optimizer, the codec the
    new model's change is downloaded with, and the policies of non-float tensors; a `relay`
    (cyclic) makes the round's one contribution the next model exactly."""

    optimizer: OptimizerSettings = OptimizerSettings()
    download: str = "none"
    error_feedback: bool = True
    block_elements: int = DEFAULT_BLOCK_ELEMENTS
    integers: dict[str, str] = field(default_factory=dict)
    relay: bool = False

    @classmethod
    def of(cls, job: JobConfig) -> Recipe:
        """A job's recipe, checked: an unknown optimizer setting is a ConfigError now."""
        settings = job.workflow.optimizer.model_dump()
        recipe = cls(
            OptimizerSettings(**settings),
            job.transfer.download,
            job.transfer.error_feedback,
            job.transfer.block_elements,
            dict(job.workflow.integers),
            relay=job.workflow.name == "cyclic",
        )
        make_optimizer(recipe.optimizer)
        return recipe

    def check_model(self, manifest: Manifest) -> None:
        """SCAFFOLD's control variates must be averaged as they are, which only fedavg does."""
        if self.optimizer.name != "fedavg" and any(
            name.startswith(VARIATE_PREFIX) for name in manifest.names
        ):
            raise ConfigError(
                f"job.toml: [workflow] optimizer {self.optimizer.name!r} cannot run SCAFFOLD: the "
                f"model holds control variates ({VARIATE_PREFIX}...), which the server must "
                'average as they are; use optimizer = "fedavg" (the default)'
            )

    def state_kinds(self, optimizer: ServerOptimizer) -> tuple[str, ...]:
        """What the server carries between rounds: the optimizer's state, and the download
        residual when a lossy download codec keeps error feedback."""
        lossy = self.download != "none" and make_codec(self.download).lossy
        return optimizer.state_names + ((RESIDUAL,) if lossy and self.error_feedback else ())


class RoundAggregate:
    """The round being run: its global model, read-only, and the aggregate of its updates."""

    def __init__(
        self,
        job_dir: Path,
        *,
        keep_rounds: int,
        memory_budget_bytes: int,
        recipe: Recipe | None = None,
    ) -> None:
        self.job_dir = job_dir
        self.rounds = RoundStore(job_dir, keep_rounds)
        self.memory_budget_bytes = memory_budget_bytes
        self.recipe = recipe or Recipe()
        self.optimizer = make_optimizer(self.recipe.optimizer)
        self._global: ModelFile | None = None
        self._output: ModelFile | None = None
        self._states: tuple[ModelFile | None, ModelFile | None] = (None, None)
        self._writer: EncodedWriter | None = None
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
        """Open round `round`'s global model (and state) and round + 1's files to fold and
        finish into; returns the former."""
        self.close()
        self._global = self.rounds.open(round)
        manifest = self._global.manifest
        if self._fedavg is None:
            self.recipe.check_model(manifest)
            policies = integers.resolve(self.recipe.integers, manifest.names)
            self._fedavg = FedAvg(
                manifest,
                workdir=self.job_dir,
                memory_budget_bytes=self.memory_budget_bytes,
                integer_policies=policies,
            )
        self._output = self.rounds.create(round + 1, manifest)
        self._fedavg.begin(self._output, base=self._global)
        self._begin_state(round, manifest)
        if self.recipe.download != "none":
            writer = self.rounds.delta_writer(
                round + 1, self.recipe.download, self.recipe.block_elements
            )
            self._writer = writer
        return self._global

    def _begin_state(self, round: int, manifest: Manifest) -> None:
        kinds = self.recipe.state_kinds(self.optimizer)
        if kinds:
            previous = self.rounds.open_state(round)
            current = self.rounds.create_state(round + 1, wide_manifest(manifest, kinds))
            self._states = (previous, current)

    def contribution(
        self, weight: float, *, update: bool = False, max_update_norm: float | None = None
    ) -> Contribution:
        """A site's contribution; a relay's is folded with weight 1, so that the average of one
        model (x 1, then / 1) is that model bit for bit, whatever weight the site said."""
        weight = 1.0 if self.recipe.relay else weight
        return self.fedavg.contribution(weight, update=update, max_update_norm=max_update_norm)

    def finish(self, round: int) -> Manifest:
        """Average, step, encode, hash and commit round + 1 (blocking: run it in a worker
        thread)."""
        RoundFinish(self.fedavg, self.optimizer, self._state(), self._encoder()).run()
        assert self._output is not None
        manifest = self._output.compute_digests()
        previous, current = self._states
        state = current.compute_digests() if current is not None else None
        delta = None
        if self._writer is not None:
            delta = replace(self._writer.close(), base=self.global_model.manifest.digest)
        self._writer = None
        self.rounds.commit(round + 1, manifest, state=state, delta=delta)
        release_free_memory()  # what the round's transfers freed; else the heap creeps up
        return manifest

    def _state(self) -> RoundState | None:
        previous, current = self._states
        if current is None:
            return None
        kinds = self.recipe.state_kinds(self.optimizer)
        initial = {
            kind: self.optimizer.initial_state(kind) if kind != RESIDUAL else 0.0 for kind in kinds
        }
        return RoundState(self.fedavg.manifest, current, previous, initial)

    def _encoder(self) -> DownloadEncoder | None:
        if self._writer is None:
            return None
        codec = make_codec(self.recipe.download, block_elements=self.recipe.block_elements)
        plan = ChunkPlan(self.fedavg.manifest)
        largest = max((encoded_limit(codec, plan)(c) for c in plan.manifest.chunks()), default=0)
        return DownloadEncoder(codec, self._writer, largest)

    def close(self) -> None:
        for model in (self._global, self._output, *self._states):
            if model is not None:
                model.close()
        if self._writer is not None:
            self._writer.close()
        self._global = self._output = self._writer = None
        self._states = (None, None)
