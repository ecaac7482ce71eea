"""Streaming aggregators: fold contributions into a running weighted sum, then finish it into
the next global model (server optimizer, download codec) chunk by chunk."""

from hauler.aggregate.fedavg import Contribution, FedAvg
from hauler.aggregate.optimizers import (
    OPTIMIZER_NAMES,
    OptimizerSettings,
    ServerOptimizer,
    make_optimizer,
)
from hauler.aggregate.rounds import Recipe, RoundAggregate
from hauler.aggregate.screening import check_weight
from hauler.aggregate.uploads import UploadSink

__all__ = [
    "OPTIMIZER_NAMES",
    "Contribution",
    "FedAvg",
    "OptimizerSettings",
    "Recipe",
    "RoundAggregate",
    "ServerOptimizer",
    "UploadSink",
    "check_weight",
    "make_optimizer",
]
