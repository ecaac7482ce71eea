"""Streaming aggregators: fold contributions into a running weighted sum, then finish."""

from hauler.aggregate.fedavg import AggregateStatistics, Contribution, FedAvg
from hauler.aggregate.rounds import RoundAggregate
from hauler.aggregate.screening import check_weight
from hauler.aggregate.uploads import UploadBuffers, folding

__all__ = [
    "AggregateStatistics",
    "Contribution",
    "FedAvg",
    "RoundAggregate",
    "UploadBuffers",
    "check_weight",
    "folding",
]
