"""hello-pytorch with every codec: test accuracy after its rounds, and bytes moved per round.

    python -m bench.codec_accuracy [--sites 3] [--workers 2] [--json OUT]

Runs examples/hello-pytorch under `hauler simulate` once per configuration (no codec; each codec
both ways, with error feedback and, for the lossy ones, without), then reads the final global
model's accuracy on the common test set and, from the job's metrics, what each site moved per
round: the model's bytes and the bytes on the wire, each way (the first round downloads the
whole model; later ones the round's encoded delta). The README's codec table comes from here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console
from rich.table import Table

import hauler
from hauler.algorithms import scaffold
from hauler.model import ModelFile

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello-pytorch"
CONFIGURATIONS = [
    ("none", True),
    ("zstd", True),
    ("bf16", True),
    ("bf16", False),
    ("int8", True),
    ("int8", False),
    ("int4", True),
    ("int4", False),
]
console = Console()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.codec_accuracy", description=__doc__)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def copy_example(folder: Path, name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    """hello-pytorch copied to `folder / name`, its job.toml changed by `edit`."""
    job_dir = folder / name
    shutil.copytree(EXAMPLE, job_dir, ignore=shutil.ignore_patterns("__pycache__"))
    config = tomllib.loads((job_dir / "job.toml").read_text())
    edit(config)
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    return job_dir


def job_with(folder: Path, codec: str, feedback: bool) -> Path:
    """hello-pytorch with `codec` both ways."""
    transfer = {"upload": codec, "download": codec, "error_feedback": feedback}
    name = f"hello-pytorch-{codec}-{'ef' if feedback else 'noef'}"
    return copy_example(folder, name, lambda config: config.update(transfer=transfer))


def accuracy_of(round_file: Path, seed: int = 0) -> float:
    """The test accuracy of a round's model (SCAFFOLD's variates aside), with the example's own
    network and test set (that of the job's `seed`)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import torch
        from data import test_set
        from model import Net
        from train import accuracy

        with ModelFile.open(round_file) as model:
            arrays = model.arrays()
            net = Net(hidden=arrays["layers.0.bias"].shape[0])
            weights = scaffold.weights(arrays)
            net.load_state_dict({name: torch.from_numpy(a.copy()) for name, a in weights.items()})
        return accuracy(net, *test_set(seed))
    finally:
        sys.path.remove(str(EXAMPLE))


def run(folder: Path, codec: str, feedback: bool, sites: int, workers: int) -> dict[str, Any]:
    job_dir = job_with(folder, codec, feedback)
    console.print(f"{codec}, error feedback {'on' if feedback else 'off'} ...")
    job = hauler.simulate(job_dir, sites=sites, workers=workers, workspace=folder / "sim")
    rounds = job.record()["rounds_done"]
    records = [r for r in job.metrics() if r.get("kind") == "site"]
    later = [r for r in records if r["round"] > 0]
    return {
        "codec": codec,
        "error_feedback": feedback,
        "rounds": rounds,
        "accuracy": accuracy_of(job.folder.folder / "global" / f"round-{rounds}.safetensors"),
        "model_bytes": records[0]["download"]["bytes"],
        "upload_wire_bytes": _mean(r["upload"]["wire_bytes"] for r in records),
        "download_wire_bytes": _mean(r["download"]["wire_bytes"] for r in later),
    }


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def show(results: list[dict[str, Any]]) -> None:
    table = Table(
        "codec",
        "error feedback",
        "accuracy",
        "up KB/site/round",
        "down KB/site/round",
        title=f"hello-pytorch, {results[0]['rounds']} rounds "
        f"(model {results[0]['model_bytes'] / 1e3:.1f} KB)",
    )
    for row in results:
        table.add_row(
            row["codec"],
            "on" if row["error_feedback"] else "off",
            f"{row['accuracy']:.3f}",
            f"{row['upload_wire_bytes'] / 1e3:.1f}",
            f"{row['download_wire_bytes'] / 1e3:.1f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="hauler-codec-accuracy-"))
    try:
        results = [run(folder, c, f, args.sites, args.workers) for c, f in CONFIGURATIONS]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    show(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sites": args.sites, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
