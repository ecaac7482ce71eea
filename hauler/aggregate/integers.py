"""How non-float tensors (integers, flags) are aggregated: a policy per name pattern.

A weighted average makes no sense for a counter such as BatchNorm's `num_batches_tracked`,
so every non-float tensor follows one of these, chosen by the first `[workflow] integers`
pattern (fnmatch) that matches its name, "mean" when none does:

- `mean`: the weighted mean of the sites' values, rounded half to even (the default);
- `sum`: the global value plus the sum of every site's change to it (total batches seen);
- `max`: the largest value any site sent;
- `keep`: the global value, whatever the sites sent.

Results are clipped to the dtype's range (a bool is 0 or 1). Non-float tensors always travel
as values, never as deltas, and no codec touches them. Each policy is a fold into a float64
side accumulator (exact for integers up to 2^53) and a finish from it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import numpy as np

DEFAULT_POLICY = "mean"
EXACT = 2**53  # the largest integer every float64 below it counts exactly


def resolve(patterns: Mapping[str, str], names: list[str]) -> list[str]:
    """The policy of each tensor name: the first matching pattern's, else the default."""
    return [
        next((p for pattern, p in patterns.items() if fnmatch.fnmatchcase(name, pattern)), None)
        or DEFAULT_POLICY
        for name in names
    ]


def fold(
    policy: str,
    accumulator: np.ndarray,
    values: np.ndarray,
    base: np.ndarray,
    weight: float,
    first: bool,
    scratch: np.ndarray,
) -> None:
    """Fold one piece of a site's values into its accumulator (float64), through `scratch`
    (float64, at least as large)."""
    if policy == "keep":
        return
    if policy == "max":
        if first:
            np.copyto(accumulator, values, casting="unsafe")
        else:
            np.maximum(accumulator, values, out=accumulator, casting="unsafe")
        return
    change = scratch[: values.size]
    if policy == "sum":
        np.subtract(values, base, out=change, dtype=np.float64, casting="unsafe")
    else:
        np.multiply(values, weight, out=change, dtype=np.float64, casting="unsafe")
    if first:
        np.copyto(accumulator, change)
    else:
        np.add(accumulator, change, out=accumulator)


def finish(
    policy: str, accumulator: np.ndarray, base: np.ndarray, total_weight: float, out: np.ndarray
) -> None:
    """Write the piece's new values into `out` (the tensor's dtype) from its accumulator."""
    if policy == "keep":
        np.copyto(out, base)
        return
    if policy == "mean":
        np.multiply(accumulator, 1.0 / total_weight, out=accumulator)
        np.rint(accumulator, out=accumulator)
    elif policy == "sum":
        np.add(accumulator, base, out=accumulator, casting="unsafe")
    low, high = _range(out.dtype)
    np.clip(accumulator, low, high, out=accumulator)
    np.copyto(out, accumulator, casting="unsafe")


def _range(dtype: np.dtype) -> tuple[float, float]:
    """What the dtype holds, within what float64 counts exactly."""
    if dtype == np.bool_:
        return 0.0, 1.0
    info = np.iinfo(dtype)
    return float(max(info.min, -EXACT)), float(min(info.max, EXACT))
