"""Workflows decide who receives what and when a round is complete; they never touch bytes."""

from collections.abc import Callable

from hauler.core.config import WorkflowConfig
from hauler.workflows.base import Evaluation, Federation, TrainResult, Workflow
from hauler.workflows.cross_site import CrossSiteEvaluation
from hauler.workflows.cyclic import Cyclic
from hauler.workflows.scatter_and_gather import ScatterAndGather

WORKFLOWS: dict[str, Callable[[WorkflowConfig, list[str] | None], Workflow]] = {
    "scatter_and_gather": ScatterAndGather,
    "cyclic": Cyclic,
    "cross_site_evaluation": CrossSiteEvaluation,
}


def workflow_for(config: WorkflowConfig, sites: list[str] | None) -> Workflow:
    """The workflow a job's `[workflow] name` says, over the sites the job names (or all)."""
    return WORKFLOWS[config.name](config, sites)


__all__ = [
    "CrossSiteEvaluation",
    "Cyclic",
    "Evaluation",
    "Federation",
    "ScatterAndGather",
    "TrainResult",
    "Workflow",
    "workflow_for",
]
