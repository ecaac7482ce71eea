"""hello-pytorch with FedAvg, FedProx (a few mu) and SCAFFOLD: test accuracy after every round.

    python -m bench.algorithms [--sites 3] [--workers 2] [--rounds 5] [--seeds 3] [--json OUT]

Runs examples/hello-pytorch (split non-IID by label) under `hauler simulate` once per
algorithm and seed; a seed changes the initial network, the train/test split, the split across
sites and the batch order, the same for every algorithm. The accuracy after round r < R is the
one the sites report for the global model they receive in round r (`hauler.evaluate`); after
the last round it is the final model's, on the same test set. The README's algorithm table
comes from here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import hauler
from bench.codec_accuracy import accuracy_of, copy_example

CONFIGURATIONS: list[tuple[str, float | None]] = [
    ("fedavg", None),
    ("fedprox", 0.01),
    ("fedprox", 0.1),
    ("fedprox", 1.0),
    ("scaffold", None),
]
console = Console(width=120)  # the table's rows unwrapped, on a terminal or not


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.algorithms", description=__doc__)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="runs per algorithm: seeds 0..N-1")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def label(algorithm: str, mu: float | None) -> str:
    return algorithm if mu is None else f"{algorithm} mu={mu:g}"


def job_for(folder: Path, algorithm: str, mu: float | None, seed: int, rounds: int) -> Path:
    """hello-pytorch running `algorithm` (in both its model and executor configs) from `seed`."""

    def edit(config: dict[str, Any]) -> None:
        config["workflow"]["num_rounds"] = rounds
        config["model"]["config"].update(algorithm=algorithm, seed=seed)
        config["executor"]["config"].update(algorithm=algorithm, seed=seed)
        if mu is not None:
            config["executor"]["config"]["mu"] = mu

    name = f"hello-pytorch-{label(algorithm, mu).replace(' ', '-')}-seed-{seed}"
    return copy_example(folder, name, edit)


def accuracies(job: Any, seed: int) -> list[float]:
    """The global model's test accuracy after each round."""
    rounds = job.record()["rounds_done"]
    reported = {
        r["round"]: r["validation"]["accuracy"] for r in job.metrics() if r["kind"] == "site"
    }
    final = accuracy_of(job.folder.folder / "global" / f"round-{rounds}.safetensors", seed)
    return [reported[r] for r in range(1, rounds)] + [final]


def run(
    folder: Path, algorithm: str, mu: float | None, seed: int, args: argparse.Namespace
) -> dict:
    console.print(f"{label(algorithm, mu)}, seed {seed} ...")
    job_dir = job_for(folder, algorithm, mu, seed, args.rounds)
    job = hauler.simulate(job_dir, sites=args.sites, workers=args.workers, workspace=folder / "sim")
    return {"algorithm": algorithm, "mu": mu, "seed": seed, "accuracy": accuracies(job, seed)}


def summary(runs: list[dict]) -> list[dict]:
    """Per configuration: the mean accuracy over seeds after each round, and the lowest and
    highest final accuracy."""
    rows = []
    for algorithm, mu in CONFIGURATIONS:
        mine = [r["accuracy"] for r in runs if (r["algorithm"], r["mu"]) == (algorithm, mu)]
        finals = [accuracy[-1] for accuracy in mine]
        rows.append(
            {
                "label": label(algorithm, mu),
                "mean": [statistics.fmean(values) for values in zip(*mine)],
                "final_range": (min(finals), max(finals)),
            }
        )
    return rows


def show(rows: list[dict], args: argparse.Namespace) -> None:
    table = Table(
        "algorithm",
        *(f"round {r}" for r in range(1, args.rounds + 1)),
        "final: lowest-highest",
        title=f"hello-pytorch, {args.sites} non-IID sites: test accuracy after each round "
        f"(mean of {args.seeds} seeds)",
    )
    for row in rows:
        low, high = row["final_range"]
        table.add_row(row["label"], *(f"{a:.3f}" for a in row["mean"]), f"{low:.3f}-{high:.3f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="hauler-algorithms-"))
    try:
        runs = [
            run(folder, algorithm, mu, seed, args)
            for seed in range(args.seeds)
            for algorithm, mu in CONFIGURATIONS
        ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = summary(runs)
    show(rows, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {"sites": args.sites, "rounds": args.rounds, "summary": rows, "runs": runs}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
