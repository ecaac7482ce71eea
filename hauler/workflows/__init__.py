"""Workflows decide who receives what and when a round is complete; they never touch bytes."""

from hauler.workflows.base import Federation, TrainResult
from hauler.workflows.scatter_and_gather import ScatterAndGather

__all__ = ["Federation", "ScatterAndGather", "TrainResult"]
