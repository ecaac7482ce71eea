"""Soak: a long job on many sites, watching the server's anonymous memory round by round.

    python -m bench.soak --sites 20 --rounds 100 --model-mib 8 --json out.json

Starts a POC federation (a server and N sites as processes, mutual TLS), runs hello-numpy for
R rounds and reads, per round, the server's RssAnon once the round is aggregated (what the
server keeps; it records it in the round's metrics) and its peak during the round (plus what
the round's transfers have in flight, sampled every 50 ms). Fails (exit 1) if, after round
WARMUP, the former grows by more than 10 % over round WARMUP's, or if the job fails.
With `--tracemalloc DIR` the server records allocations and writes a snapshot into DIR at
every round's end (SIGUSR1), so what grows can be found with `tracemalloc` afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.e2e import save, write_job
from bench.sampler import Sampler
from hauler.admin import Admin, poc
from hauler.core.events import read_json_lines

WARMUP = 10
SAMPLE_S = 0.05
GROWTH_LIMIT = 0.10
console = Console()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--model-mib", type=float, default=8)
    parser.add_argument("--arrays", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--tracemalloc", type=Path, help="folder for the server's allocation snapshots"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    return parser.parse_args(argv)


def peak_since(sampler: Sampler, seen: list[int]) -> int:
    """The server's largest RssAnon sampled since the last call (`seen` keeps how many were
    read)."""
    samples = sampler.series["server"].samples
    new, seen[0] = samples[seen[0] :], len(samples)
    return max((anon for _, _, anon in new), default=0)


async def follow_rounds(
    workspace: Path, job_dir: Path, server_pid: int, dump_snapshots: bool
) -> tuple[str, list[dict[str, Any]]]:
    """Submit the job; per round, the server's RssAnon once the round is aggregated (the figure
    it records in the round's metrics, before the next round starts) and the peak sampled."""
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    metrics = None
    seen = [0]
    with Sampler({"server": server_pid}, interval_s=SAMPLE_S) as sampler:
        async with Admin(poc.admin_config(workspace)) as admin:
            job_id = await admin.submit(job_dir)
            metrics = workspace / "server" / "jobs" / job_id / "metrics.jsonl"
            final = ""
            async for event in admin.watch(job_id):
                final = event["event"]
                if final == "round.complete":
                    retained = _round_record(metrics, event["round"])["server_rss_anon_bytes"]
                    rows.append(
                        {
                            "round": event["round"],
                            "t_s": round(time.monotonic() - started, 1),
                            "rss_anon_bytes": retained,
                            "rss_anon_peak_bytes": peak_since(sampler, seen),
                        }
                    )
                    console.print(
                        f"round {event['round']:4d}  {rows[-1]['t_s']:8.1f} s  server RssAnon "
                        f"{retained / 2**20:7.1f} MiB at the round's end, peak "
                        f"{rows[-1]['rss_anon_peak_bytes'] / 2**20:7.1f} MiB",
                        highlight=False,
                    )
                    if dump_snapshots:
                        os.kill(server_pid, signal.SIGUSR1)
    return final, rows


def _round_record(metrics: Path, round: int) -> dict[str, Any]:
    return next(
        r for r in read_json_lines(metrics) if r.get("kind") == "round" and r["round"] == round
    )


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth of the server's RssAnon at the rounds' ends after round WARMUP, against round
    WARMUP's."""
    if len(rows) <= WARMUP:
        return {"growth": None, "ok": False}
    baseline = rows[WARMUP]["rss_anon_bytes"]
    later = max(row["rss_anon_bytes"] for row in rows[WARMUP:])
    peaks = [row["rss_anon_peak_bytes"] for row in rows[WARMUP:]]
    growth = later / baseline - 1
    return {
        "baseline_bytes": baseline,
        "max_after_bytes": later,
        "growth": round(growth, 4),
        "peak_bytes": {"min": min(peaks), "max": max(peaks)},
        "ok": growth <= GROWTH_LIMIT,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workspace = Path(tempfile.mkdtemp(prefix="hauler-soak-")).resolve()
    array_bytes = int(args.model_mib * 2**20 / args.arrays) // 4 * 4
    job_dir = write_job(
        workspace, arrays=args.arrays, array_bytes=array_bytes, rounds=args.rounds, sites=args.sites
    )
    poc.prepare(workspace, args.sites)
    if args.tracemalloc:
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
        os.environ["HAULER_TRACEMALLOC_DIR"] = str(
            args.tracemalloc.resolve()
        )  # the server reads it
    console.print(f"starting a server and {args.sites} sites in {workspace}")
    pids = poc.start(workspace, wait_s=120)
    try:
        final, rows = asyncio.run(
            follow_rounds(workspace, job_dir, pids["server"], bool(args.tracemalloc))
        )
    finally:
        poc.stop(workspace)
    result = {
        "sites": args.sites,
        "rounds": args.rounds,
        "model_bytes": array_bytes * args.arrays,
        "outcome": final,
        "per_round": rows,
        **verdict(rows),
    }
    result["ok"] = result["ok"] and final == "job.finished"
    growth = "n/a" if result["growth"] is None else f"{100 * result['growth']:.1f} %"
    console.print(
        f"{final}: server RssAnon at the rounds' ends grew by {growth} after round {WARMUP} "
        f"(limit {100 * GROWTH_LIMIT:.0f} %): {'ok' if result['ok'] else 'FAILED'}"
    )
    save(result, args.json, workspace, keep=args.keep)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
