"""JSON from peers, parsed with limits: an object at the top, nested at most MAX_DEPTH deep.

Python's parser recurses once per nesting level, so a deeply nested payload raises
RecursionError; any real message of Hauler's is a few levels deep.
"""

from __future__ import annotations

import json
from typing import Any

from hauler.core.errors import RemoteProtocolError

MAX_DEPTH = 32  # a manifest is 4 levels deep, a job's executor config a few more


def parse_object(data: bytes | str, *, what: str, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """`data` as a JSON object; anything else, deeper or malformed, is the peer's protocol error."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise RemoteProtocolError(f"{what} is not JSON, or nested too deeply") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    if depth(value, max_depth) > max_depth:
        raise RemoteProtocolError(f"{what} is nested more than {max_depth} levels deep")
    return value


def depth(value: Any, limit: int) -> int:
    """How deeply lists and objects nest in `value`, counting no further than limit + 1."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= limit:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, level + 1) for child in children)
    return deepest
