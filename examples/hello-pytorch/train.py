"""hello-pytorch's training script: each round, receive the global model, train on this
site's digits, send the new weights back with the number of samples as FedAvg weight.

Before training, the script reports the received global model's accuracy with
`hauler.evaluate()` (per-round validation, `validation/...` in the job's figures): on the test
samples of this site's own digits (`accuracy`) and on the whole test set (`accuracy_all`, the
same on every site); round r shows how good the model aggregated after round r - 1 is. In
cross-site evaluation (`context.task == "evaluate"`) it reports the same of the model it is
given, and trains nothing.
"""

from pathlib import Path

import torch
from data import site_set, site_test_set, test_set
from model import Net
from torch import nn

import hauler
from hauler.algorithms import fedprox, scaffold

ALGORITHMS = ("fedavg", "fedprox", "scaffold")
LocalAlgorithm = fedprox.FedProx | scaffold.Scaffold | None

torch.set_num_threads(1)  # several sites share a small machine


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).float().mean())


def measured(net: nn.Module, site: int, sites: int, config: dict) -> dict[str, float]:
    """The model's accuracy on this site's own digits of the test set, and on all of it."""
    seed = int(config.get("seed", 0))
    own, every = site_test_set(site, sites, seed), test_set(seed)
    return {"accuracy": accuracy(net, *own), "accuracy_all": accuracy(net, *every)}


def train(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: dict,
    round: int,
    algorithm: LocalAlgorithm = None,
) -> float:
    """SGD for a few epochs, each step's gradients corrected by FedProx or SCAFFOLD if given;
    returns the last epoch's mean loss."""
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
            if algorithm is not None:
                algorithm.correct()
            optimiser.step()
            total += loss.item() * len(index)
    return total / len(y)


def local_algorithm(config: dict, net: nn.Module, model: dict, workdir: Path) -> LocalAlgorithm:
    """The executor config's `algorithm`: fedavg (plain SGD: None), fedprox (with `mu`) or
    scaffold (whose variates the model must hold: `algorithm = "scaffold"` in [model] too)."""
    name = config.get("algorithm", "fedavg")
    check_algorithm(name, bool(scaffold.variates(model)))
    if name == "fedprox":
        return fedprox.FedProx(net, model, mu=float(config["mu"]))
    if name == "scaffold":
        return scaffold.Scaffold(net, model, workdir, lr=float(config["lr"]))
    return None


def check_algorithm(name: str, has_variates: bool) -> None:
    """Refuse an unknown algorithm, and SCAFFOLD set on one side only."""
    if name not in ALGORITHMS:
        raise SystemExit(f"algorithm = {name!r}: choose one of {', '.join(ALGORITHMS)}")
    if (name == "scaffold") != has_variates:
        raise SystemExit(
            'SCAFFOLD needs algorithm = "scaffold" in both [model] config (the server\'s '
            "variates in the model) and [executor] config (the sites' training)"
        )


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
        net.load_state_dict(scaffold.weights(model))  # copies the global weights into the net
        hauler.evaluate(measured(net, site, sites, config))  # the received model's
        if context.task == "evaluate":  # cross-site evaluation: a model to judge, not to train
            continue
        algorithm = local_algorithm(config, net, model, context.workdir)
        loss = train(net, x, y, config, context.round, algorithm)
        hauler.send(
            net.state_dict() | (algorithm.update() if algorithm else {}),  # SCAFFOLD's variates
            weight=len(y),
            metrics={"loss": loss, "local_accuracy": accuracy(net, x_test, y_test)},
        )


if __name__ == "__main__":  # the site runs this file as __main__; baseline.py imports it
    main()
