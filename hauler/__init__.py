"""Hauler: federated learning for models larger than memory, over slow and unreliable links."""

__version__ = "0.1.0"
