"""Streaming aggregators: fold contributions into a running weighted sum, then finish."""

from hauler.aggregate.fedavg import AggregateStatistics, FedAvg

__all__ = ["AggregateStatistics", "FedAvg"]
