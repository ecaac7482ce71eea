"""Simulator benchmark: wall per round and peak RssAnon of `hauler simulate`, beside Flower's
simulation.

    python -m bench.simulate                       # the whole suite, table and
    .demo/bench-simulate.json
    python -m bench.simulate --sites 64 --workers 2 --model-mib 8 --rounds 3 --json out.json

Runs `python -m hauler simulate` as a child process on hello-numpy sized to the model (or
hello-pytorch), and samples every process of its tree every 0.2 s: the peak RssAnon of each
process and of their sum. Then runs the same FedAvg job (every array + 0.1 per site and round,
weight 10) on the same float32 arrays with Flower 1.42's simulation engine, installed into a
virtualenv of its own (skipped, saying why, if it cannot be installed), sampled the same way.
The suite checks the issue's targets and prints pass or fail for each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w
from rich.console import Console
from rich.table import Table

from bench.e2e import INCREMENT, save, write_job
from bench.sampler import Periodic
from hauler.core.events import read_json_lines
from hauler.core.resources import rss_anon_bytes

ROOT = Path(__file__).resolve().parent.parent
PYTORCH = ROOT / "examples" / "hello-pytorch"
FLOWER_VENV = ROOT / ".demo" / "flwr-venv"
FLOWER_REQUIREMENTS = ["flwr[simulation]==1.42.0", "numpy"]
DEFAULT_JSON = ROOT / ".demo" / "bench-simulate.json"
CAP_S = 600.0  # a run still going after this is stopped, and said to be capped
MEMORY_SHARE = (
    0.75  # a tree whose RssAnon passes this share of the memory available at its start is stopped,
)
MEMORY_FLOOR = (
    2 << 30
)  # as is one while the machine has less than this available (Ray's /dev/shm counts)
MiB = 2**20
console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Case:
    """One configuration: a job on `sites` virtual sites, `workers` at once, `rounds` rounds."""

    sites: int
    workers: int = 2
    model_mib: float = 8
    rounds: int = 3
    arrays: int = 8
    job: str = "hello-numpy"  # or hello-pytorch (its own model; no Flower twin)
    # hello-numpy's [executor] mode: a training child process per worker, or in_process
    mode: str = "subprocess"

    @property
    def label(self) -> str:
        if self.job == "hello-pytorch":
            return f"hello-pytorch N={self.sites} W={self.workers} R={self.rounds}"
        mode = "" if self.mode == "subprocess" else f" {self.mode}"
        size = f"{self.model_mib:g} MiB"
        return f"hello-numpy {size} N={self.sites} W={self.workers} R={self.rounds}{mode}"


SUITE = [Case(8), Case(64), Case(256), Case(8, model_mib=1024), Case(64, job="hello-pytorch")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.simulate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--sites", type=int, help="virtual sites (one configuration; without it, the suite)"
    )
    parser.add_argument("--workers", type=int, default=2, help="sites training at once")
    parser.add_argument(
        "--model-mib", type=float, default=8, help="hello-numpy's model size in MiB"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arrays", type=int, default=8, help="number of float32 arrays")
    parser.add_argument("--job", choices=["hello-numpy", "hello-pytorch"], default="hello-numpy")
    parser.add_argument(
        "--mode",
        choices=["subprocess", "in_process"],
        default="subprocess",
        help="hello-numpy's training code: a child process per worker, or a thread",
    )
    parser.add_argument(
        "--suite", action="store_true", help="the whole suite (the default without --sites)"
    )
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's simulation")
    parser.add_argument(
        "--cap-s", type=float, default=CAP_S, help="stop a run after this many seconds"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- sampling a process tree


@dataclass
class TreeSampler(Periodic):
    """Samples a process and all its descendants every `interval_s`: each process's peak RssAnon
    (by PID, with its command line) and the peak of their sum. Past `limit_bytes` summed, it stops
    the tree (or when the machine runs short), so a run that would exhaust the memory ends as
    `over_limit`."""

    root: int
    limit_bytes: int
    interval_s: float = 0.2
    peaks: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    peak_sum: int = 0
    over_limit: bool = False

    def sample(self) -> None:
        try:
            tree = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for process in tree:
            try:
                anon = rss_anon_bytes(process.pid)
                if process.pid not in self.names:
                    self.names[process.pid] = " ".join(process.cmdline())[:100] or process.name()
            except (psutil.Error, OSError):
                continue
            self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), anon)
            total += anon
        self.peak_sum = max(self.peak_sum, total)
        starved = psutil.virtual_memory().available < MEMORY_FLOOR
        if (total > self.limit_bytes or starved) and not self.over_limit:
            self.over_limit = True
            stop_tree(self.root, list(self.peaks))

    def figures(self) -> dict[str, Any]:
        heaviest = sorted(self.peaks.items(), key=lambda item: -item[1])
        return {
            "peak_rss_anon_sum_bytes": self.peak_sum,
            "peak_rss_anon_max_process_bytes": heaviest[0][1] if heaviest else 0,
            "processes": len(self.peaks),
            "per_process": [
                {"pid": pid, "cmd": self.names.get(pid, "?"), "peak_rss_anon_bytes": peak}
                for pid, peak in heaviest
            ],
        }


def stop_tree(root: int, seen: list[int]) -> None:
    """End the run we started: its process group, then any process of its tree still alive (by
    PID)."""
    with _quiet():
        os.killpg(root, signal.SIGTERM)
    time.sleep(2)
    for pid in [root, *seen]:
        with _quiet():
            psutil.Process(pid).kill()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, *rest: object) -> bool:
        return kind is not None and issubclass(
            kind, (ProcessLookupError, PermissionError, psutil.Error)
        )


def run_sampled(
    command: list[str], log: Path, cap_s: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `command` (its output into `log`), sampling its tree; returns exit code, wall and
    memory."""
    limit = int(psutil.virtual_memory().available * MEMORY_SHARE)
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        with TreeSampler(process.pid, limit) as sampler:
            try:
                code = process.wait(timeout=cap_s)
                capped = False
            except subprocess.TimeoutExpired:
                code, capped = None, True
            stop_tree(process.pid, list(sampler.peaks))  # what is left of it (Ray's daemons, say)
            process.wait()
    return {
        "exit_code": code,
        "capped": capped,
        "over_memory_limit": sampler.over_limit,
        "memory_limit_bytes": limit,
        "wall_s": round(time.perf_counter() - started, 2),
        **sampler.figures(),
    }


def summarize_rounds(rounds: list[dict[str, Any]], outcome: dict[str, Any]) -> dict[str, Any]:
    """Mean round wall, and of the rounds after the first (which starts the workers or actors)."""
    walls = [row["round_s"] for row in rounds]
    ok = outcome["exit_code"] == 0 and not outcome["capped"] and not outcome["over_memory_limit"]
    return {
        "ok": ok,
        "rounds": rounds,
        "rounds_done": len(rounds),
        "mean_round_s": _mean(walls),
        "mean_later_round_s": _mean(walls[1:]),
        **outcome,
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


# ---------------------------------------------------------------- Hauler


def hauler_job(case: Case, folder: Path) -> Path:
    """The job to simulate: hello-numpy of `case.arrays` arrays totalling the model's size, or
    hello-pytorch with `case.rounds` rounds."""
    if case.job == "hello-pytorch":
        job_dir = folder / "hello-pytorch"
        shutil.copytree(PYTORCH, job_dir, ignore=shutil.ignore_patterns("__pycache__"))
        config = tomllib.loads((job_dir / "job.toml").read_text())
        config["workflow"]["num_rounds"] = case.rounds
        (job_dir / "job.toml").write_text(tomli_w.dumps(config))
        return job_dir
    job_dir = write_job(
        folder,
        arrays=case.arrays,
        array_bytes=array_bytes(case),
        rounds=case.rounds,
        sites=case.sites,
    )
    config = tomllib.loads((job_dir / "job.toml").read_text())
    config["executor"]["mode"] = case.mode
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    return job_dir


def array_bytes(case: Case) -> int:
    return int(case.model_mib * MiB / case.arrays) // 4 * 4


def run_hauler(case: Case, folder: Path, cap_s: float) -> dict[str, Any]:
    """`python -m hauler simulate` on the case; per-round wall from the job's `round` records."""
    job_dir, workspace = hauler_job(case, folder), folder / "sim"
    command = [
        sys.executable,
        "-m",
        "hauler",
        "simulate",
        str(job_dir),
        "--sites",
        str(case.sites),
        "--workers",
        str(case.workers),
        "--workspace",
        str(workspace),
    ]
    outcome = run_sampled(command, folder / "hauler.log", cap_s, env={"COLUMNS": "120"})
    rounds = []
    for metrics in (workspace / "jobs").glob("*/metrics.jsonl"):
        rounds = [
            {
                "round": row["round"],
                "round_s": round(row["round_s"], 3),
                "sites": len(row["sites"]),
                **{
                    key: round(row[key], 3)
                    for key in ("download_s", "train_s", "upload_s", "aggregate_s")
                    if key in row
                },
            }
            for row in read_json_lines(metrics)
            if row.get("kind") == "round"
        ]
    return summarize_rounds(rounds, outcome)


# ---------------------------------------------------------------- Flower

FLOWER_APP = '''
"""hello-numpy in Flower: every client adds INCREMENT to every float32 array, FedAvg with
weight 10."""
import json, sys, time
import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

SITES, WORKERS, ROUNDS, ARRAYS, ARRAY_BYTES, INCREMENT, OUT = sys.argv[1:8]
SITES, WORKERS, ROUNDS, ARRAYS = int(SITES), int(WORKERS), int(ROUNDS), int(ARRAYS)
ARRAY_BYTES, INCREMENT = int(ARRAY_BYTES), float(INCREMENT)

def pattern(k, size):
    return ((np.arange(size, dtype=np.int32) % 1000 + k) / np.float32(1000)).astype(np.float32)

class Site(NumPyClient):
    def fit(self, parameters, config):
        for array in parameters:
            array += np.float32(INCREMENT)
        return parameters, 10, {}

class TimedFedAvg(FedAvg):
    def configure_fit(self, server_round, parameters, client_manager):
        self.started = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        aggregated = super().aggregate_fit(server_round, results, failures)
        first = parameters_to_ndarrays(aggregated[0])[0][:1000]
        expected = pattern(0, 1000) + np.float32(server_round * INCREMENT)
        error = float(np.abs(first - expected).max())
        round_s = round(time.perf_counter() - self.started, 3)
        with open(OUT, "a") as out:
            out.write(json.dumps({"round": server_round, "round_s": round_s, "sites": len(results),
                                  "failures": len(failures), "max_abs_error": error}) + "\\n")
        return aggregated

def server_fn(context: Context) -> ServerAppComponents:
    initial = ndarrays_to_parameters([pattern(k, ARRAY_BYTES // 4) for k in range(ARRAYS)])
    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=SITES,
                           min_evaluate_clients=0, min_available_clients=SITES,
                           initial_parameters=initial)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))

if __name__ == "__main__":
    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=lambda context: Site().to_client()),
                   num_supernodes=SITES,
                   backend_config={"init_args": {"num_cpus": WORKERS},
                                   "client_resources": {"num_cpus": 1}})
'''


def flower_python() -> Path | str:
    """The Flower virtualenv's python, made on first use; or why it cannot be had."""
    python = FLOWER_VENV / "bin" / "python"
    check = [str(python), "-c", "import flwr, ray, numpy; assert flwr.__version__ == '1.42.0'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    console.print(f"installing {' '.join(FLOWER_REQUIREMENTS)} into {FLOWER_VENV} ...")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(FLOWER_VENV)],
        [str(python), "-m", "pip", "install", "-q", *FLOWER_REQUIREMENTS],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return f"`{' '.join(step)}` failed: {last}"
    return (
        python
        if subprocess.run(check, capture_output=True).returncode == 0
        else "flwr 1.42.0 did not import"
    )


def run_flower(case: Case, folder: Path, python: Path, cap_s: float) -> dict[str, Any]:
    """The same FedAvg job in Flower's simulation engine, W clients at once (Ray, one CPU each)."""
    app, out = folder / "flower_app.py", folder / "flower-rounds.jsonl"
    app.write_text(FLOWER_APP)
    command = [
        str(python),
        str(app),
        str(case.sites),
        str(case.workers),
        str(case.rounds),
        str(case.arrays),
        str(array_bytes(case)),
        str(INCREMENT),
        str(out),
    ]
    outcome = run_sampled(command, folder / "flower.log", cap_s, env={"RAY_DEDUP_LOGS": "0"})
    rounds = read_json_lines(out) if out.exists() else []
    result = summarize_rounds(rounds, outcome)
    result["ok"] = (
        result["ok"]
        and len(rounds) == case.rounds
        and all(row["failures"] == 0 and row["max_abs_error"] < 1e-4 for row in rounds)
    )
    return result


# ---------------------------------------------------------------- suite, targets, table


def run_case(
    case: Case, workspace: Path, flower: Path | str | None, cap_s: float
) -> dict[str, Any]:
    folder = (
        workspace / f"{case.job}-n{case.sites}-w{case.workers}-{case.model_mib:g}mib-{case.mode}"
    )
    folder.mkdir(parents=True)
    console.print(f"[bold]{case.label}[/]: hauler simulate ...")
    result: dict[str, Any] = {"case": asdict(case), "hauler": run_hauler(case, folder, cap_s)}
    if isinstance(flower, Path) and case.job == "hello-numpy":
        console.print(f"[bold]{case.label}[/]: Flower's simulation ...")
        result["flower"] = run_flower(case, folder, flower, cap_s)
    return result


def find(results: list[dict[str, Any]], **case: Any) -> dict[str, Any] | None:
    return next(
        (r for r in results if all(r["case"][key] == value for key, value in case.items())), None
    )


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, for those of its configurations that ran."""
    checks = []
    small, large = (
        find(results, sites=8, model_mib=8, job="hello-numpy"),
        find(results, sites=256, model_mib=8),
    )
    if small and large and small["case"]["workers"] == large["case"]["workers"]:
        a, b = (
            small["hauler"]["peak_rss_anon_sum_bytes"],
            large["hauler"]["peak_rss_anon_sum_bytes"],
        )
        checks.append(
            {
                "target": "peak RssAnon (sum) at N=256 within 10 % of N=8, 8 MiB",
                "ok": b <= 1.10 * a,
                "figure": f"{b / MiB:.0f} vs {a / MiB:.0f} MiB ({100 * (b / a - 1):+.1f} %)",
            }
        )
    torch = find(results, job="hello-pytorch", sites=64)
    if torch:
        wall = torch["hauler"]["wall_s"]
        checks.append(
            {
                "target": f"hello-pytorch, 64 sites, {torch['case']['rounds']} rounds under 60 s",
                "ok": torch["hauler"]["ok"] and wall < 60,
                "figure": f"{wall:.1f} s"
                + ("" if torch["hauler"]["ok"] else f", {_status(torch['hauler'])}"),
            }
        )
    gib = find(results, sites=8, model_mib=1024, workers=2)
    if gib:
        limit = 0.1 * 1024 * MiB + 128 * MiB
        worst = gib["hauler"]["peak_rss_anon_max_process_bytes"]
        checks.append(
            {
                "target": "1 GiB, N=8, W=2: RssAnon per process under 0.1 x M + 128 MiB (230 MiB)",
                "ok": worst < limit,
                "figure": f"largest process {worst / MiB:.0f} MiB",
            }
        )
    for result in results:
        if "flower" in result:
            ours, theirs = result["hauler"], result["flower"]
            faster = ours["ok"] and (
                not theirs["ok"]
                or all(
                    ours[key] is not None and theirs[key] is not None and ours[key] < theirs[key]
                    for key in ("mean_round_s", "mean_later_round_s", "wall_s")
                )
            )
            checks.append(
                {
                    "target": f"faster than Flower: {Case(**result['case']).label}",
                    "ok": faster,
                    "figure": f"per round {_s(ours['mean_round_s'])} vs "
                    f"{_s(theirs['mean_round_s'])}, "
                    f"after the first {_s(ours['mean_later_round_s'])} vs "
                    f"{_s(theirs['mean_later_round_s'])}; in all {ours['wall_s']:.1f} vs "
                    f"{theirs['wall_s']:.1f} s"
                    + ("" if theirs["ok"] else f" (Flower {_status(theirs)})"),
                }
            )
    return checks


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _status(run: dict[str, Any]) -> str:
    if run["capped"]:
        return "capped"
    if run["over_memory_limit"]:
        limit = run["memory_limit_bytes"] / 2**30
        return f"stopped: memory (> {limit:.0f} GiB or < {MEMORY_FLOOR >> 30} GiB free)"
    return "ok" if run["ok"] else f"failed (exit {run['exit_code']})"


def show(results: list[dict[str, Any]], checks: list[dict[str, Any]], note: str) -> None:
    table = Table(
        "configuration",
        "runtime",
        "status",
        "rounds",
        "s/round",
        "later s/round",
        "each round s",
        "total s",
        "peak RssAnon sum MiB",
        "max process MiB",
        "processes",
        title="simulation: Hauler vs Flower 1.42",
    )
    for result in results:
        label = Case(**result["case"]).label
        for name in ("hauler", "flower"):
            if name in result:
                run = result[name]
                table.add_row(
                    label if name == "hauler" else "",
                    name,
                    _status(run),
                    str(run["rounds_done"]),
                    _s(run["mean_round_s"]).removesuffix(" s"),
                    _s(run["mean_later_round_s"]).removesuffix(" s"),
                    " ".join(f"{row['round_s']:.2f}" for row in run["rounds"]),
                    f"{run['wall_s']:.1f}",
                    f"{run['peak_rss_anon_sum_bytes'] / MiB:.0f}",
                    f"{run['peak_rss_anon_max_process_bytes'] / MiB:.0f}",
                    str(run["processes"]),
                )
    console.print(table)
    if note:
        console.print(note)
    verdicts = Table("target", "figure", "verdict", title="targets")
    for check in checks:
        verdicts.add_row(
            check["target"], check["figure"], "[green]pass[/]" if check["ok"] else "[red]FAIL[/]"
        )
    if checks:
        console.print(verdicts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = (
        SUITE
        if args.suite or args.sites is None
        else [
            Case(
                args.sites,
                args.workers,
                args.model_mib,
                args.rounds,
                args.arrays,
                args.job,
                args.mode,
            )
        ]
    )
    flower: Path | str | None = None if args.no_flower else flower_python()
    note = (
        f"Flower skipped: {flower}"
        if isinstance(flower, str)
        else ("Flower skipped (--no-flower)" if flower is None else "")
    )
    if note:
        console.print(note)
    workspace = Path(tempfile.mkdtemp(prefix="hauler-bench-simulate-")).resolve()
    results = [run_case(case, workspace, flower, args.cap_s) for case in cases]
    checks = targets(results)
    show(results, checks, note)
    save(
        {
            "results": results,
            "targets": checks,
            "flower": str(flower) if flower else None,
            "cap_s": args.cap_s,
            "cpus": os.cpu_count(),
        },
        args.json,
        workspace,
        keep=args.keep,
    )
    console.print(
        f"figures written to {args.json}"
        + (f"; workspace kept in {workspace}" if args.keep else "")
    )
    return 0 if all(check["ok"] for check in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
