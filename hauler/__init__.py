"""Hauler: federated learning for models larger than memory, over slow and unreliable links.

A job's training script uses the client API straight from here: `hauler.is_running()`,
`hauler.receive()`, `hauler.send()`, `hauler.context()` (see hauler.client.api).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["context", "is_running", "receive", "send"]


def __getattr__(name: str) -> Any:
    """The client API, imported on first use so `import hauler` stays light for the server and CLI."""
    if name in __all__:
        from hauler.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'hauler' has no attribute {name!r}")
