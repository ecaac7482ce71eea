"""JSON from peers, parsed with limits: an object at the top, nested at most MAX_DEPTH deep.

Python's parser recurses once per nesting level and raises RecursionError past its limit
(about a thousand levels), which is refused here; under that, the parsed value's depth is
measured level by level, a list comprehension per level, so a manifest of thousands of rows
costs a few milliseconds (a scan of the text in numpy, string escapes and all, took 25 ms for
5,000 rows: more than parsing it).
"""

from __future__ import annotations

import json
from typing import Any

from hauler.core.errors import RemoteProtocolError

MAX_DEPTH = 32  # a manifest is 4 levels deep, a job's executor config a few more


def parse_object(data: bytes | str, *, what: str, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """`data` as a JSON object; anything else, deeper or malformed, is the peer's protocol error."""
    try:
        value = json.loads(data if isinstance(data, str) else bytes(data))
    except (ValueError, RecursionError):
        raise RemoteProtocolError(f"{what} is not JSON, or nested too deeply") from None
    if nesting(value, max_depth) > max_depth:
        raise RemoteProtocolError(f"{what} is nested more than {max_depth} levels deep")
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    return value


def nesting(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and objects nest in parsed JSON `value` (counted up to `limit` + 1:
    deeper is refused anyway). The parser makes exact dicts and lists, hence `type() is`."""
    level, containers = 0, [value] if type(value) in (dict, list) else []
    while containers and level <= limit:
        level += 1
        containers = [
            child
            for container in containers
            for child in (container.values() if type(container) is dict else container)
            if type(child) is list or type(child) is dict
        ]
    return level
