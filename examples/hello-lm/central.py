"""What hello-lm's federation is measured against.

    python central.py                      # the same network trained centrally, on 4 sites' data
    python central.py --sites 8            # ... on what 8 sites hold together
    python central.py global.safetensors   # the validation loss of a job's global model

The central run starts from the same initial network and trains on every site's bytes
together, with the sites' AdamW settings and batch size, for as many steps as all the sites
take together (rounds x local_steps x sites): the same number of tokens as the federation.
It prints the validation loss after every local_steps x sites steps, one "round".
"""

import argparse
import json
import tomllib
from pathlib import Path

import torch
from data import all_tokens, batches
from model import GPT, build, initial
from safetensors import safe_open
from train import evaluate, optimiser, train

HERE = Path(__file__).parent
TIES_KEY = "hauler.ties"  # where a Hauler model file lists its tied names


def load(path: Path, config: dict) -> GPT:
    """A network holding a Hauler model file's weights. The file stores a tied matrix once
    (`wte.weight`) and lists its other name (`lm_head.weight`) in its metadata."""
    with safe_open(path, "pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        ties = json.loads((file.metadata() or {}).get(TIES_KEY, "[]"))
    for alias, stored in ties:
        tensors[alias] = tensors[stored]
    net = build(config)
    net.load_state_dict(tensors)
    return net


def central(job: dict, sites: int) -> None:
    config = job["executor"]["config"]
    net = initial(job["model"]["config"])
    adamw = optimiser(net, config)
    generator = torch.Generator().manual_seed(int(config.get("seed", 0)))
    tokens = all_tokens(sites, float(config["site_mib"]))
    source = batches(tokens, net.context, int(config["batch_size"]), generator)
    steps = int(config["local_steps"]) * sites
    print(f"{sum(p.numel() for p in net.parameters())} parameters, {len(tokens)} tokens")
    print(f"round 0: val_loss {evaluate(net, config):.4f}")
    for round in range(1, job["workflow"]["num_rounds"] + 1):
        loss = train(net, adamw, source, steps)
        print(f"round {round}: train_loss {loss:.4f}, val_loss {evaluate(net, config):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="a global model to evaluate")
    parser.add_argument("--sites", type=int, default=4, help="whose data to train on together")
    arguments = parser.parse_args()
    job = tomllib.loads((HERE / "job.toml").read_text())
    if arguments.model is None:
        central(job, arguments.sites)
    else:
        net = load(arguments.model, job["model"]["config"])
        print(f"{arguments.model}: val_loss {evaluate(net, job['executor']['config']):.4f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
