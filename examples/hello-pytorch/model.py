"""hello-pytorch's model: a two-layer perceptron over the 8x8 digits, and its initial weights."""

import numpy as np
import torch
from torch import nn

from hauler.algorithms import scaffold

INPUTS, CLASSES = 64, 10


class Net(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(INPUTS, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def initial(config: dict) -> Net:
    """The same initial network on every call (the server builds round 0 from it)."""
    torch.manual_seed(int(config.get("seed", 0)))
    return Net(int(config.get("hidden", 64)))


def layout(config: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """The network's tensors; with `algorithm = "scaffold"`, SCAFFOLD's server variates too."""
    rows = [
        (name, "F32", tuple(tensor.shape)) for name, tensor in initial(config).state_dict().items()
    ]
    return scaffold.layout(rows) if config.get("algorithm") == "scaffold" else rows


def fill(name: str, out: np.ndarray, config: dict) -> None:
    if scaffold.is_variate(name):
        out[...] = 0  # SCAFFOLD's server control variate starts at zero
    else:
        out[...] = initial(config).state_dict()[name].numpy()
