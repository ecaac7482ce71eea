"""hello-numpy's local training: add `increment` to every array, in place."""

import numpy as np

from hauler.client import TrainContext, TrainOutput

BLOCK = 1 << 22


def train(model: dict[str, np.ndarray], context: TrainContext) -> TrainOutput:
    increment = float(context.config.get("increment", 0.1))
    for array in model.values():
        flat = array.reshape(-1)
        for start in range(0, flat.size, BLOCK):
            flat[start : start + BLOCK] += increment
    return TrainOutput(
        weight=float(context.config.get("steps", 10)), metrics={"increment": increment}
    )
