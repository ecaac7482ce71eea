"""hello-numpy's model: K float32 arrays, filled with a pattern the demo can check."""

import numpy as np

BLOCK = 1 << 22


def layout(config: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """Names, dtypes and shapes: `arrays` arrays of `array_mib` MiB each (or `array_bytes`)."""
    size = int(config.get("array_bytes", config.get("array_mib", 16) * 2**20)) // 4
    return [(f"array_{k}", "F32", (size,)) for k in range(int(config.get("arrays", 64)))]


def fill(name: str, out: np.ndarray, config: dict) -> None:
    """Fill one array in place, block by block: value = (k + index % 1000) / 1000."""
    k = int(name.split("_")[1])
    for start in range(0, out.size, BLOCK):
        block = out[start : start + BLOCK]
        np.add(np.arange(start, start + block.size) % 1000, k, out=block, casting="unsafe")
        block /= 1000
