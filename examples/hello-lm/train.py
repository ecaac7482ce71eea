"""hello-lm's training script: DiLoCo's inner loop at each site.

Each round a site receives the global model, measures its validation loss (`val_loss`: round
r shows the model the server made after round r - 1), trains it for `local_steps` steps of
AdamW on its own bytes, and sends it back weighted by the tokens it trained on. The server's
outer optimizer (Nesterov momentum, job.toml) turns the sites' averaged change into the next
global model. As in DiLoCo, each site keeps its AdamW state from round to round, in its own
work folder.
"""

import tomllib
from pathlib import Path

import torch
from data import batches, site_tokens, validation_windows
from model import GPT, build

import hauler

torch.set_num_threads(1)  # several sites share a small machine
HERE = Path(__file__).parent
OPTIMISER_FILE = "adamw.pt"  # in the site's work folder


def model_config() -> dict:
    """The network's shape: job.toml's [model] config, the same the server's round 0 used."""
    return tomllib.loads((HERE / "job.toml").read_text())["model"]["config"]


def evaluate(net: GPT, config: dict) -> float:
    """Mean loss (nats per byte) on the fixed validation windows."""
    windows = validation_windows(net.context, int(config["val_windows"]))
    net.eval()
    with torch.no_grad():
        losses = [net.loss(batch).item() * len(batch) for batch in windows.split(16)]
    net.train()
    return sum(losses) / len(windows)


def optimiser(net: GPT, config: dict, state: Path | None = None) -> torch.optim.AdamW:
    """The inner optimiser; with `state`, AdamW's moments from the site's previous round."""
    adamw = torch.optim.AdamW(
        net.parameters(),
        lr=float(config["lr"]),
        betas=(0.9, 0.95),
        weight_decay=float(config["weight_decay"]),
    )
    if state is not None and state.exists():
        adamw.load_state_dict(torch.load(state))
    return adamw


def train(net: GPT, adamw: torch.optim.AdamW, batch_source, steps: int) -> float:
    """`steps` steps of AdamW with clipped gradients; returns their mean loss."""
    total = 0.0
    for _, windows in zip(range(steps), batch_source):
        adamw.zero_grad()
        loss = net.loss(windows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        adamw.step()
        total += loss.item()
    return total / steps


def shard(settings: dict) -> tuple[int, int]:
    """Which share of the data this site holds: its site's [job_settings] say (`hauler poc
    prepare` writes them; the simulator gives them to every virtual site)."""
    try:
        return int(settings["site_index"]), int(settings["num_sites"])
    except KeyError:
        raise SystemExit(
            "hello-lm needs site_index and num_sites in the site's [job_settings]"
        ) from None


def main() -> None:
    net = build(model_config())
    while hauler.is_running():
        context = hauler.context()  # read every round: a simulator's worker serves many sites
        config, (site, sites) = context.config, shard(context.settings)
        net.load_state_dict(hauler.receive("torch"))  # copies; wte and lm_head stay one matrix
        val_loss = evaluate(net, config)
        state = context.workdir / OPTIMISER_FILE
        adamw = optimiser(net, config, state)
        generator = torch.Generator().manual_seed(
            int(config.get("seed", 0)) * 1_000_003 + site * 1000 + context.round
        )
        tokens = site_tokens(site, sites, float(config["site_mib"]))
        source = batches(tokens, net.context, int(config["batch_size"]), generator)
        steps = int(config["local_steps"])
        train_loss = train(net, adamw, source, steps)
        torch.save(adamw.state_dict(), state)
        hauler.send(
            net.state_dict(),  # wte.weight and lm_head.weight share memory: sent once
            weight=steps * int(config["batch_size"]) * net.context,  # tokens trained on
            metrics={"train_loss": train_loss, "val_loss": val_loss},
        )


if __name__ == "__main__":  # the site runs this file as __main__; central.py imports it
    main()
