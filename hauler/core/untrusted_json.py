"""JSON from peers, parsed with limits: an object at the top, nested at most MAX_DEPTH deep.

Python's parser recurses once per nesting level, so a deeply nested payload raises
RecursionError; any real message of Hauler's is a few levels deep. The nesting is measured on
the text before it is parsed, in numpy (strings found by their unescaped quotes, brackets
counted outside them), so a manifest of thousands of rows costs a millisecond, not a walk.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from hauler.core.errors import RemoteProtocolError

MAX_DEPTH = 32  # a manifest is 4 levels deep, a job's executor config a few more


def parse_object(data: bytes | str, *, what: str, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """`data` as a JSON object; anything else, deeper or malformed, is the peer's protocol error."""
    text = data.encode() if isinstance(data, str) else bytes(data)
    if nesting(text) > max_depth:
        raise RemoteProtocolError(f"{what} is nested more than {max_depth} levels deep")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise RemoteProtocolError(f"{what} is not JSON, or nested too deeply") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    return value


def nesting(text: bytes) -> int:
    """How deeply lists and objects nest in JSON `text`: brackets counted outside strings, all
    in numpy (malformed text gives some number the parser then refuses anyway)."""
    codes = np.frombuffer(text, np.uint8)
    steps = (codes == ord("[")).astype(np.int32)
    steps += codes == ord("{")
    steps -= codes == ord("]")
    steps -= codes == ord("}")
    steps[_inside_strings(codes)] = 0
    return int(np.cumsum(steps).max(initial=0))


def _inside_strings(codes: np.ndarray) -> np.ndarray:
    """Where `codes` are inside a JSON string: after an opening quote, up to its closing one; a
    quote preceded by an odd number of backslashes is escaped and does not count."""
    positions = np.arange(codes.size)
    quotes = np.flatnonzero(codes == ord('"'))
    # the last character before each position that is not a backslash
    plain = np.maximum.accumulate(np.where(codes == ord("\\"), -1, positions))
    before = np.where(quotes > 0, plain[np.maximum(quotes - 1, 0)], -1)
    escaped = (quotes - 1 - before) % 2 == 1
    toggles = np.zeros(codes.size, np.int8)
    toggles[quotes[~escaped]] = 1
    return np.cumsum(toggles) % 2 == 1
