"""Streaming aggregators: fold contributions into a running weighted sum, then finish."""

from hauler.aggregate.fedavg import AggregateStatistics, Contribution, FedAvg

__all__ = ["AggregateStatistics", "Contribution", "FedAvg"]
