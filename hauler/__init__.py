"""Hauler: federated learning for models larger than memory, over slow and unreliable links.

A job's training script uses the client API straight from here: `hauler.is_running()`,
`hauler.receive()`, `hauler.send()`, `hauler.evaluate()`, `hauler.context()` (see
hauler.client.api). Scripts that
drive federations use `hauler.connect()` and `hauler.simulate()` (see hauler.admin.api).
"""

from typing import Any

__version__ = "0.1.0"
CLIENT_API = ["context", "evaluate", "is_running", "layout_of", "receive", "send"]
ADMIN_API = ["connect", "simulate"]
__all__ = [*CLIENT_API, *ADMIN_API]


def __getattr__(name: str) -> Any:
    """Imported on first use, so `import hauler` stays light for training code and the server."""
    if name in CLIENT_API:
        from hauler.client import api

        return getattr(api, name)
    if name in ADMIN_API:
        from hauler.admin import api

        return getattr(api, name)
    raise AttributeError(f"module 'hauler' has no attribute {name!r}")
