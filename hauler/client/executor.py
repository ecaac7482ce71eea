"""What a job's training code sees, and how a site runs it.

Two entry points, one mechanism: a module's `train(model, context) -> TrainOutput`, called
once per round by a loop over the client API, or a script that calls the API itself
(`hauler.client.api`). `model` maps tensor names to arrays viewing the site's model file:
training in place (`array += update`) writes the file directly and holds no copy in memory.
"""

from __future__ import annotations

import inspect
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hauler.core.config import ExecutorConfig
from hauler.core.errors import JobError
from hauler.core.package import load_job_module

if TYPE_CHECKING:
    from hauler.client.api import TrainerLink


@dataclass(frozen=True)
class TrainContext:
    """Who and where this round is. `config` is the job's [executor] config, the same on every
    site; `settings` is the site's own (its config's [job_settings], e.g. where its data lives;
    in the simulator `site_index` and `num_sites` unless a settings file says more)."""

    site: str
    job_id: str
    round: int
    config: dict[str, Any]
    workdir: Path
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainOutput:
    """`weight` is what FedAvg weighs this site by (e.g. its steps); `metrics` are reported."""

    weight: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


def run_executor(executor: ExecutorConfig, app_dir: Path, job_id: str, link: TrainerLink) -> None:
    """Run a job's training code against `link` until it returns (normally: once the job ended)."""
    if executor.module is not None:
        train_loop(load_job_module(app_dir, job_id, executor.module), link)
        return
    script = app_dir / str(executor.script)
    if not script.is_file():
        raise JobError(
            f"job {job_id}: the executor script {executor.script!r} is not in the job folder"
        )
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))  # the script imports its sibling modules by name
    runpy.run_path(str(script), run_name="__main__")


def train_loop(module: Any, link: TrainerLink) -> None:
    """Call the module's `train(model, context)` for every round, training in the site's file."""
    train = getattr(module, "train", None)
    if train is None or not inspect.isfunction(train):
        raise JobError(f"executor module {module.__name__} has no train(model, context) function")
    while link.is_running():
        model = link.receive()
        output = train(model, link.context())
        if not isinstance(output, TrainOutput) or not output.weight > 0:
            raise JobError("train() must return TrainOutput(weight > 0, metrics={...})")
        link.send(model, weight=output.weight, metrics=output.metrics)
