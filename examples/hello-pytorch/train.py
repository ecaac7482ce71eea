"""hello-pytorch's training script: each round, receive the global model, train on this
site's digits, send the new weights back with the number of samples as FedAvg weight.

The accuracy reported as `global_accuracy` is the received global model's, on the common test
set: round r shows how good the model aggregated after round r - 1 is.
"""

import torch
from data import site_set, test_set
from model import Net
from torch import nn

import hauler

torch.set_num_threads(1)  # several sites share a small machine


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).float().mean())


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, config: dict, round: int) -> float:
    """Plain SGD for a few epochs; returns the last epoch's mean loss."""
    optimiser = torch.optim.SGD(net.parameters(), lr=float(config["lr"]))
    generator = torch.Generator().manual_seed(int(config.get("seed", 0)) * 1000 + round)
    loss_function, batch = nn.CrossEntropyLoss(), int(config["batch_size"])
    for _ in range(int(config["epochs"])):
        order, total = torch.randperm(len(y), generator=generator), 0.0
        for start in range(0, len(y), batch):
            index = order[start : start + batch]
            optimiser.zero_grad()
            loss = loss_function(net(x[index]), y[index])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
    return total / len(y)


def shard(settings: dict) -> tuple[int, int]:
    """Which share of the data this site holds: its site's [job_settings] say (`hauler poc
    prepare` writes them; the simulator gives them to every virtual site)."""
    try:
        return int(settings["site_index"]), int(settings["num_sites"])
    except KeyError:
        raise SystemExit(
            "hello-pytorch needs site_index and num_sites in the site's [job_settings]"
        ) from None


def main() -> None:
    net, x_test, y_test = None, *test_set()
    while hauler.is_running():
        context = hauler.context()
        config = context.config
        site, sites = shard(
            context.settings
        )  # read every round: a simulator's worker serves many sites
        x, y = site_set(site, sites, float(config["own_share"]), int(config.get("seed", 0)))
        if len(y) == 0:
            raise SystemExit(
                f"site {site + 1} of {sites} holds no training samples: use fewer sites"
            )
        model = hauler.receive("torch")  # tensors viewing the site's model file
        net = net or Net(hidden=model["layers.0.bias"].shape[0])
        net.load_state_dict(model)  # copies the global weights into the network
        global_accuracy = accuracy(net, x_test, y_test)
        loss = train(net, x, y, config, context.round)
        hauler.send(
            net.state_dict(),
            weight=len(y),
            metrics={
                "global_accuracy": global_accuracy,
                "loss": loss,
                "local_accuracy": accuracy(net, x_test, y_test),
            },
        )


if __name__ == "__main__":  # the site runs this file as __main__; baseline.py imports it
    main()
