"""The site process, and the API a job's executor sees."""

from hauler.client.app import Site
from hauler.client.executor import TrainContext, TrainOutput

__all__ = ["Site", "TrainContext", "TrainOutput"]
