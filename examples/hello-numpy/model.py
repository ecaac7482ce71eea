"""hello-numpy's model: K float32 arrays, filled with a pattern the demo can check."""

import numpy as np

PERIOD = 1000


def layout(config: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """Names, dtypes and shapes: `arrays` arrays of `array_mib` MiB each (or `array_bytes`)."""
    size = int(config.get("array_bytes", config.get("array_mib", 16) * 2**20)) // 4
    return [(f"array_{k}", "F32", (size,)) for k in range(int(config.get("arrays", 64)))]


def pattern(k: int) -> np.ndarray:
    """One period of array k: element i holds (k + i % 1000) / 1000."""
    return ((np.arange(PERIOD) + k) / PERIOD).astype(np.float32)


def fill(name: str, out: np.ndarray, config: dict) -> None:
    """Fill an array in place by broadcasting its period over it (no model-sized temporary)."""
    period, flat = pattern(int(name.split("_")[1])), out.reshape(-1)
    whole = flat.size // PERIOD * PERIOD
    flat[:whole].reshape(-1, PERIOD)[...] = period
    flat[whole:] = period[: flat.size - whole]
