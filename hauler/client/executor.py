"""What a job's executor sees: its model as numpy views, and where it runs.

A job's executor module defines `train(model, context) -> TrainOutput`. `model`
maps tensor names to arrays that view the site's model file: training in place
(`array += update`) writes the file directly and holds no copy in memory.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from hauler.core.errors import JobError


@dataclass(frozen=True)
class TrainContext:
    site: str
    job_id: str
    round: int
    config: dict[str, Any]
    workdir: Path


@dataclass(frozen=True)
class TrainOutput:
    """`weight` is what FedAvg weighs this site by (e.g. its steps); `metrics` are reported."""

    weight: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


def run_train(module: ModuleType, model: dict[str, np.ndarray], context: TrainContext) -> TrainOutput:
    """Call the executor's `train` and check what it returns."""
    train = getattr(module, "train", None)
    if train is None or not inspect.isfunction(train):
        raise JobError(f"executor module {module.__name__} has no train(model, context) function")
    output = train(model, context)
    if not isinstance(output, TrainOutput) or not output.weight > 0:
        raise JobError("train() must return TrainOutput(weight > 0, metrics={...})")
    return output
