"""Job submission and management: the API behind `hauler submit` and `hauler jobs`."""

from hauler.admin.client import Admin

__all__ = ["Admin"]
