"""The site process, and the API a job's training code sees.

`Site` is imported on first use: a training script's child process needs only the API, not the
site's gRPC stack.
"""

from typing import Any

from hauler.client.executor import TrainContext, TrainOutput

__all__ = ["Site", "TrainContext", "TrainOutput"]


def __getattr__(name: str) -> Any:
    if name == "Site":
        from hauler.client.app import Site

        return Site
    raise AttributeError(f"module 'hauler.client' has no attribute {name!r}")
