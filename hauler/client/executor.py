"""What a job's training code sees, and how a site runs it.

Two entry points, one mechanism: a module's `train(model, context) -> TrainOutput` (and, if it
has one, `evaluate(model, context) -> metrics`), called once per task by a loop over the client
API, or a script that calls the API itself (`hauler.client.api`). `model` maps tensor names to
arrays viewing the site's model file: training in place (`array += update`) writes the file
directly and holds no copy in memory.
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
    in the simulator `site_index` and `num_sites` unless a settings file says more). `task` is
    "train", or "evaluate" for cross-site evaluation, where `model_name` says whose model it is:
    "global", or a site's name."""

    site: str
    job_id: str
    round: int
    config: dict[str, Any]
    workdir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    task: str = "train"
    model_name: str = ""


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
    """For every task, call the module's `evaluate(model, context)` (if it has one: on the
    received global model before training, and for cross-site evaluation) and `train(model,
    context)`, which trains in the site's file."""
    evaluate = getattr(module, "evaluate", None)
    while link.is_running():
        model, context, evaluating = link.receive(), link.context(), link.evaluating
        if evaluate is not None or evaluating:
            link.evaluate(_entry(module, "evaluate", "metrics")(model, context))
        if evaluating:
            continue
        output = _entry(module, "train", "TrainOutput")(model, context)
        if not isinstance(output, TrainOutput) or not output.weight > 0:
            raise JobError("train() must return TrainOutput(weight > 0, metrics={...})")
        link.send(model, weight=output.weight, metrics=output.metrics)


def _entry(module: Any, name: str, returns: str) -> Any:
    """The module's function `name`, which the task at hand needs."""
    function = getattr(module, name, None)
    if function is None or not inspect.isfunction(function):
        raise JobError(
            f"executor module {module.__name__} has no {name}(model, context) -> {returns} "
            "function, which this task needs"
        )
    return function
