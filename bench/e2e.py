"""End-to-end benchmark: a real federation runs hello-numpy; figures printed and written as JSON.

    python -m bench.e2e --model-mib 1024 --arrays 64 --sites 2 --rounds 3 --json out.json

Starts a server and N sites as processes (as `hauler poc` does), samples every
process every 0.2 s, checks the final global model against initial + rounds x
increment, and times plain blocking sockets moving the same bytes for comparison.
`--workflow cyclic` relays the model through every site `--rounds` times (one increment a
hop); `--workflow cross_site_evaluation` then has every site evaluate the global model and
the other sites' local models (a pass over every value), and checks the matrix is complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from rich.console import Console
from rich.table import Table

import hauler
from bench.sampler import Sampler
from bench.sockets import blocking_socket_seconds
from hauler.admin import poc
from hauler.aggregate import OptimizerSettings, make_optimizer
from hauler.core.config import ServerConfig, SiteConfig, load_toml
from hauler.core.errors import JobError
from hauler.core.events import read_json_lines
from hauler.core.package import load_job, load_job_module
from hauler.model.rounds import RoundStore
from hauler.security import client_ssl_context, server_ssl_context

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello-numpy"
INCREMENT = 0.1
TOLERANCE = 1e-4  # float32 rounding over a few rounds
LOSSY_TOLERANCE = 2e-3  # what a lossy codec's error feedback still owes after the last round
BLOCK_ROWS = 4096
WORKFLOWS = ("scatter_and_gather", "cyclic", "cross_site_evaluation")
EVALUATE = '''

def evaluate(model, context):
    """The mean of every value, block by block: one pass over the model, as an evaluation."""
    total = count = 0
    for array in model.values():
        flat = array.reshape(-1)
        for start in range(0, flat.size, BLOCK):
            total += float(flat[start : start + BLOCK].sum(dtype=np.float64))
        count += flat.size
    return {"mean": total / count}
'''
console = Console()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model-mib", type=float, default=1024, help="model size in MiB")
    parser.add_argument("--arrays", type=int, default=64, help="number of float32 arrays")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--workspace", type=Path, help="federation folder (default: a temporary one)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    parser.add_argument("--plaintext", action="store_true", help="no TLS (to measure its cost)")
    parser.add_argument(
        "--connections",
        type=int,
        help="parallel connections per transfer (server default if absent)",
    )
    parser.add_argument("--upload", default="none", help="[transfer] upload codec of the job")
    parser.add_argument("--download", default="none", help="[transfer] download codec of the job")
    parser.add_argument("--optimizer", default="fedavg", help="[workflow] server optimizer")
    parser.add_argument("--workflow", default=WORKFLOWS[0], choices=WORKFLOWS)
    parser.add_argument(
        "--max-update-norm",
        type=float,
        help="[workflow] max_update_norm of the job (unchecked if absent)",
    )
    return parser.parse_args(argv)


def write_job(
    folder: Path,
    *,
    arrays: int,
    array_bytes: int,
    rounds: int,
    sites: int,
    max_update_norm: float | None = None,
    upload: str = "none",
    download: str = "none",
    optimizer: str = "fedavg",
    workflow: str = WORKFLOWS[0],
) -> Path:
    """Copy hello-numpy and size it: `arrays` float32 arrays of `array_bytes` each, with the
    codecs, server optimizer and workflow given (cross-site evaluation: with EVALUATE)."""
    job_dir = folder / "hello-numpy"
    shutil.copytree(EXAMPLE, job_dir, ignore=shutil.ignore_patterns("__pycache__"))
    if workflow == "cross_site_evaluation":
        with open(job_dir / "train.py", "a") as module:
            module.write(EVALUATE)
    config = {
        "name": "hello-numpy",
        "workflow": {
            "name": workflow,
            "num_rounds": rounds,
            "min_clients": sites,
            "wait_time_after_min_received": 10,
            **({"max_update_norm": max_update_norm} if max_update_norm else {}),
            "optimizer": optimizer,
        },
        "transfer": {"upload": upload, "download": download},
        "model": {"module": "model", "config": {"arrays": arrays, "array_bytes": array_bytes}},
        "executor": {"module": "train", "config": {"increment": INCREMENT, "steps": 10}},
    }
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    load_job(job_dir)
    return job_dir


def run_job(workspace: Path, job_dir: Path) -> tuple[str, str, float]:
    """Submit, follow progress until the job ends; returns id, final event and wall seconds."""
    with hauler.connect(workspace=workspace) as session:
        started = time.perf_counter()
        job = session.submit(job_dir)
        try:
            job.wait(progress=True, console=console)
        except JobError:
            pass  # the outcome says it
        return job.id, f"job.{job.record()['status']}", time.perf_counter() - started


def expected_increment(optimizer: str, rounds: int) -> float:
    """How far every value moves in `rounds` rounds: each site adds INCREMENT, so every round's
    averaged update is INCREMENT, and the server optimizer turns it into its steps."""
    stepper = make_optimizer(OptimizerSettings(optimizer))
    state = {name: np.full(1, stepper.initial_state(name)) for name in stepper.state_names}
    total, step = 0.0, np.zeros(1)
    for _ in range(rounds):
        stepper.step(np.full(1, INCREMENT), state, step)
        total += float(step[0])
    return total


def model_rounds(args: argparse.Namespace) -> int:
    """The job's rounds of the model: cyclic's are hops, a round per site per pass."""
    return args.rounds * args.sites if args.workflow == "cyclic" else args.rounds


def moved_bytes(args: argparse.Namespace, model_bytes: int) -> int:
    """What the job moves: a download and an upload per site and round (cyclic: per hop); cross-
    site evaluation adds every site's local model up and every model down to every site."""
    per_round = 1 if args.workflow == "cyclic" else args.sites
    moved = 2 * per_round * model_rounds(args) * model_bytes
    if args.workflow == "cross_site_evaluation":
        moved += (args.sites + args.sites**2) * model_bytes
    return moved


def evaluation_figures(workspace: Path, job_id: str, metrics: list[dict]) -> dict[str, Any]:
    """Cross-site evaluation's phases from the job's events (the local models' uploads, then
    the evaluations) and its cells from its metrics."""
    events = read_json_lines(workspace / "server" / "jobs" / job_id / "events.jsonl")
    at = {e["event"]: e["time_s"] for e in events}  # the last of each name
    cells = [row for row in metrics if row.get("kind") == "evaluation"]
    return {
        "submit_s": round(at["evaluation.started"] - at["round.complete"], 3),
        "evaluate_s": round(at["evaluation.complete"] - at["evaluation.started"], 3),
        "cells": len(cells),
        "missing": sum(1 for row in cells if "missing" in row),
    }


def max_abs_error(
    workspace: Path, job_dir: Path, job_id: str, rounds: int, increment: float
) -> float:
    """Largest |global - (initial + rounds x increment)| over the final global model, period by
    period."""
    model_module = load_job_module(job_dir, "bench", "model")
    store = RoundStore(workspace / "server" / "jobs" / job_id, keep_rounds=2)
    worst = 0.0
    with store.open(rounds) as model:
        for name, array in model.arrays().items():
            expected = model_module.pattern(int(name.split("_")[1])) + np.float32(increment)
            flat, period = array.reshape(-1), expected.size
            whole = flat.size // period * period
            rows = flat[:whole].reshape(-1, period)
            for start in range(0, rows.shape[0], BLOCK_ROWS):
                worst = max(
                    worst,
                    float(np.abs(rows[start : start + BLOCK_ROWS] - expected).max(initial=0.0)),
                )
            worst = max(
                worst, float(np.abs(flat[whole:] - expected[: flat.size - whole]).max(initial=0.0))
            )
    return worst


def tls_contexts(workspace: Path) -> dict[str, ssl.SSLContext]:
    """The server's and a site's TLS contexts from their kits, for the socket yardstick (none if
    plaintext)."""
    server = load_toml(ServerConfig, workspace / "server" / "server.toml")
    site = load_toml(SiteConfig, workspace / "site-1" / "site.toml")
    if server.tls is None or site.tls is None:
        return {}
    return {
        "server_context": server_ssl_context(server.tls),
        "client_context": client_ssl_context(site.tls),
    }


def summarize(
    args: argparse.Namespace,
    model_bytes: int,
    wall_s: float,
    outcome: str,
    error: float,
    metrics: list[dict],
    sampler: Sampler,
    baseline_s: float,
) -> dict[str, Any]:
    rounds = [
        {
            **{
                key: row[key]
                for key in ("round", "download_s", "train_s", "upload_s", "aggregate_s", "round_s")
            },
            **wire_bytes(metrics, row["round"]),
        }
        for row in metrics
        if row.get("kind") == "round"
    ]
    lossy = {args.upload, args.download} - {"none", "zstd"}
    tolerance = LOSSY_TOLERANCE if lossy else TOLERANCE
    return {
        "model_bytes": model_bytes,
        "arrays": args.arrays,
        "sites": args.sites,
        "tls": not args.plaintext,
        "upload": args.upload,
        "download": args.download,
        "optimizer": args.optimizer,
        "workflow": args.workflow,
        "max_update_norm": args.max_update_norm,
        "wall_s": round(wall_s, 3),
        "outcome": outcome,
        "rounds": rounds,
        "peak_rss_bytes": {role: s.peak_rss_bytes for role, s in sampler.series.items()},
        "peak_rss_anon_bytes": {role: s.peak_rss_anon_bytes for role, s in sampler.series.items()},
        "correct": outcome == "job.finished" and error <= tolerance,
        "max_abs_error": error,
        "baseline_socket_s": round(baseline_s, 3),
        "efficiency": round(baseline_s / wall_s, 3),
    }


def wire_bytes(metrics: list[dict], round: int) -> dict[str, int]:
    """The bytes a round's transfers put on the wire, per direction, summed over its sites."""
    sites = [row for row in metrics if row.get("kind") == "site" and row["round"] == round]
    return {
        f"{direction}_wire_bytes": sum(
            int(row[direction].get("wire_bytes", row[direction]["bytes"])) for row in sites
        )
        for direction in ("download", "upload")
    }


def show(result: dict[str, Any]) -> None:
    sites_a_round = 1 if result["workflow"] == "cyclic" else result["sites"]
    per_site = result["model_bytes"] * sites_a_round / 1e6
    table = Table(
        "round",
        "download s",
        "MB/s",
        "train s",
        "upload s",
        "MB/s",
        "aggregate s",
        "round s",
        title=f"hello-numpy, {result['model_bytes'] / 2**20:.0f} MiB model, "
        f"{result['sites']} sites",
    )
    for row in result["rounds"]:
        table.add_row(
            str(row["round"]),
            f"{row['download_s']:.2f}",
            f"{per_site / row['download_s']:.0f}",
            f"{row['train_s']:.2f}",
            f"{row['upload_s']:.2f}",
            f"{per_site / row['upload_s']:.0f}",
            f"{row['aggregate_s']:.2f}",
            f"{row['round_s']:.2f}",
        )
    console.print(table)
    memory = Table("process", "peak RSS MiB", "peak RssAnon MiB", title="memory")
    for role, rss in result["peak_rss_bytes"].items():
        memory.add_row(
            role, f"{rss / 2**20:.0f}", f"{result['peak_rss_anon_bytes'][role] / 2**20:.0f}"
        )
    console.print(memory)
    kind = "TLS" if result["tls"] else "plain"
    console.print(
        f"wall {result['wall_s']:.2f} s (submit to finished); {kind} blocking sockets moving "
        f"the same bytes: {result['baseline_socket_s']:.2f} s; "
        f"efficiency {result['efficiency']:.2f}"
    )
    if "evaluation" in result:
        figures = result["evaluation"]
        console.print(
            f"cross-site evaluation: local models uploaded in {figures['submit_s']:.2f} s, "
            f"{figures['cells']} evaluations ({figures['missing']} missing) in "
            f"{figures['evaluate_s']:.2f} s"
        )
    verdict = "result verified" if result["correct"] else f"RESULT WRONG ({result['outcome']})"
    console.print(f"{verdict}: max |error| = {result['max_abs_error']:.2e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    array_bytes = int(args.model_mib * 2**20 / args.arrays) // 4 * 4
    model_bytes = array_bytes * args.arrays
    workspace = (args.workspace or Path(tempfile.mkdtemp(prefix="hauler-e2e-"))).resolve()
    job_dir = write_job(
        workspace,
        arrays=args.arrays,
        array_bytes=array_bytes,
        rounds=args.rounds,
        sites=args.sites,
        max_update_norm=args.max_update_norm,
        upload=args.upload,
        download=args.download,
        optimizer=args.optimizer,
        workflow=args.workflow,
    )
    dataplane = {"connections": args.connections} if args.connections else None
    poc.prepare(workspace, args.sites, plaintext=args.plaintext, dataplane=dataplane)
    console.print(f"starting a server and {args.sites} sites in {workspace}")
    pids = poc.start(workspace)
    try:
        with Sampler(pids) as sampler:
            job_id, outcome, wall_s = run_job(workspace, job_dir)
        metrics = read_json_lines(workspace / "server" / "jobs" / job_id / "metrics.jsonl")
        rounds = model_rounds(args)
        increment = expected_increment(args.optimizer, rounds)
        error = (
            max_abs_error(workspace, job_dir, job_id, rounds, increment)
            if outcome == "job.finished"
            else float("inf")
        )
        evaluation = (
            evaluation_figures(workspace, job_id, metrics)
            if args.workflow == "cross_site_evaluation" and outcome == "job.finished"
            else None
        )
    finally:
        poc.stop(workspace)
    console.print("timing plain blocking sockets on the same bytes ...")
    baseline_s = blocking_socket_seconds(moved_bytes(args, model_bytes), **tls_contexts(workspace))
    result = summarize(args, model_bytes, wall_s, outcome, error, metrics, sampler, baseline_s)
    if evaluation is not None:
        result["evaluation"] = evaluation
        result["correct"] &= evaluation["missing"] == 0 and evaluation["cells"] == args.sites**2
    show(result)
    save(result, args.json, workspace, keep=args.keep)
    return 0 if result["correct"] else 1


def save(result: dict[str, Any], path: Path | None, workspace: Path, *, keep: bool) -> None:
    """Write a benchmark's figures as JSON (if asked), and remove its workspace unless `keep`."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    if not keep:
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
