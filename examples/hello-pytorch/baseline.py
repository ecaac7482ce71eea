"""What hello-pytorch's federation is measured against.

    python baseline.py                    # the same network trained centrally on all the data
    python baseline.py global.safetensors # the test accuracy of a model downloaded from a job

The central run trains for as many epochs as the federation's rounds x epochs, with the same
optimiser, and prints the test accuracy after every `epochs` epochs (one "round").
"""

import sys
import tomllib
from pathlib import Path

import torch
from data import test_set, train_set
from model import initial
from safetensors.torch import load_file
from train import accuracy, train

from hauler.algorithms import scaffold

HERE = Path(__file__).parent


def main(argv: list[str]) -> None:
    job = tomllib.loads((HERE / "job.toml").read_text())
    net = initial(job["model"]["config"])
    x_test, y_test = test_set()
    if argv:
        net.load_state_dict(scaffold.weights(load_file(argv[0])))  # SCAFFOLD's variates aside
        print(f"{argv[0]}: test accuracy {accuracy(net, x_test, y_test):.3f}")
        return
    x, y = train_set()
    config = job["executor"]["config"]
    for round in range(job["workflow"]["num_rounds"]):
        loss = train(net, x, y, config, round)
        print(f"round {round}: loss {loss:.3f}, test accuracy {accuracy(net, x_test, y_test):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
