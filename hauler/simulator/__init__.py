"""The simulator: a job on N virtual sites taking turns on W workers, in this process and its
children or on a Ray cluster, through the same workflow, aggregation, client API and data
plane as a real federation (an in-process transport instead of sockets)."""

from hauler.simulator.runner import SimulationPlan, simulate, site_settings

__all__ = ["SimulationPlan", "simulate", "site_settings"]
