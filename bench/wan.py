"""Hauler over emulated wide-area links: transfer times, link utilisation, re-sent bytes.

    python -m bench.wan [--scenario seed] [--model-mib 512] [--json OUT]
    python -m bench.wan --compare none,int8 [--rounds 3] [--json OUT]
    python -m bench.wan --scenario path [--model-mib 4096] [--rounds 2] [--json OUT]

`seed`: the seed job across regions. site-1 is 30 ms one-way at 448 Mbit/s, site-2 120 ms at
92.8 Mbit/s. A real server and real sites run in their own network namespaces over mutual TLS,
first with the default timeouts, then with every silence timeout divided by 10, to show that
transfer time never counts against them (the default model is sized so that site-2's transfers
outlast the shortened timeouts). `--compare none,int8`: the seed's links once per codec (used
for uploads and downloads alike), each round's wall time and bytes on the wire side by side
(the first round downloads the whole model; later ones the encoded delta). `path`: one 50 ms,
1 Gbit/s path with 0.1 % loss; one TCP stream across it per congestion control and 8 parallel
BBR streams (what this machine and the emulator can carry at all), then a one-site Hauler job
over it, with both timeout settings. Utilisation is model bytes / (transfer seconds x link
rate): goodput, so TCP, IP and TLS headers count as lost capacity. Run as root (namespaces,
TUN devices); see bench/netem.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from bench import netem
from bench.e2e import INCREMENT, write_job
from bench.netem import LinkSpec, Topology
from hauler.admin.poc import amend_config
from hauler.core.config import DataPlane, Timeouts, parse
from hauler.core.events import read_json_lines
from hauler.core.package import load_job_module
from hauler.model.rounds import RoundStore
from hauler.security import provision

SEED_LINKS = {
    "site-1": LinkSpec(delay_ms=30, rate_mbit=448),
    "site-2": LinkSpec(delay_ms=120, rate_mbit=92.8),
}
PATH_LINKS = {"site-1": LinkSpec(delay_ms=50, rate_mbit=1000, loss=0.001)}
# path: 4 GiB, about 38 s a transfer, so 30 s timeouts are outlasted; two rounds, because the
# first writes every model file into fresh pages (CPU this 2-core machine shares with the
# emulator) while later rounds reuse them, as a federation does from its second round on.
DEFAULT_MODEL_MIB = {"seed": 512, "path": 4096}
DEFAULT_ROUNDS = {"seed": 1, "path": 2}
SILENCE_TIMEOUTS = ("streaming_read_timeout", "streaming_ack_wait", "communication_timeout")
CONTROL_PORT, DATA_PORT, TCP_PORT = 18102, 18103, 18104
ADMIN = "admin"
STREAM_BUFFER = 4 << 20
PARALLEL_STREAMS = 8  # as many as Hauler's lanes on long paths
SAMPLE = 1 << 16  # elements checked at each end of every array of the final model
START_WAIT_S = 30.0
STOP_GRACE_S = 20.0
TOLERANCE = 1e-4
LOSSY_TOLERANCE = 2e-3  # what error feedback still owes after the last round
console = Console()


@dataclass(frozen=True)
class Settings:
    """What every federated run of one invocation shares."""

    model_mib: float
    arrays: int
    rounds: int
    dataplane: dict[str, Any]
    job_timeout_s: float
    keep: bool
    plaintext: bool = False
    upload: str = "none"
    download: str = "none"

    @property
    def tolerance(self) -> float:
        lossy = {self.upload, self.download} - {"none", "zstd"}
        return LOSSY_TOLERANCE if lossy else TOLERANCE

    @property
    def array_bytes(self) -> int:
        return int(self.model_mib * 2**20 / self.arrays) // 4 * 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.wan", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--scenario", choices=("seed", "path"), default="seed")
    parser.add_argument("--model-mib", type=float, help="model size in MiB (seed: 512, path: 4096)")
    parser.add_argument("--arrays", type=int, default=16, help="number of float32 arrays")
    parser.add_argument("--rounds", type=int, help="FedAvg rounds (seed: 1, path: 2)")
    parser.add_argument(
        "--dataplane",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [dataplane] setting for the server and every site (repeatable)",
    )
    parser.add_argument(
        "--tcp-seconds", type=float, default=20.0, help="path: length of each TCP stream"
    )
    parser.add_argument(
        "--tcp-cc", default="cubic,bbr", help="path: congestion controls to try one stream with"
    )
    parser.add_argument(
        "--job-timeout", type=float, default=900.0, help="give up on a job after this many s"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--keep", action="store_true", help="keep kits, workspaces and logs afterwards"
    )
    parser.add_argument("--plaintext", action="store_true", help="no TLS, to measure what it costs")
    parser.add_argument("--upload", default="none", help="[transfer] upload codec of the job")
    parser.add_argument("--download", default="none", help="[transfer] download codec of the job")
    parser.add_argument(
        "--compare",
        help="seed: run once per codec of this comma list (both directions), e.g. none,int8",
    )
    return parser.parse_args(argv)


def dataplane_settings(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs (values read as TOML, else as strings), validated by Hauler's DataPlane."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            values[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = text
    parse(DataPlane, values, "--dataplane")
    return values


def scaled_timeouts(scale: float) -> dict[str, float]:
    """The silence timeouts at SCALE times their defaults."""
    defaults = Timeouts()
    return {name: getattr(defaults, name) * scale for name in SILENCE_TIMEOUTS}


def write_kits(
    folder: Path,
    sites: list[str],
    timeouts: dict[str, float],
    dataplane: dict[str, Any],
    plaintext: bool = False,
) -> Path:
    """Provision a project served at netem.SERVER_ADDRESS; every config gets TIMEOUTS, roles
    DATAPLANE
    (`plaintext` drops TLS, to measure what it costs)."""
    project = {
        "name": "wan",
        "server": {
            "host": netem.SERVER_ADDRESS,
            "control_port": CONTROL_PORT,
            "data_port": DATA_PORT,
        },
        "sites": [{"name": site, "org": "wan"} for site in sites],
        "admins": [{"name": ADMIN, "org": "wan", "role": "project_admin"}],
    }
    (folder / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    kits = folder / "kits"
    provision(folder / "project.yml", kits)
    for config in [kits / "server" / "server.toml", *(kits / site / "site.toml" for site in sites)]:
        amend_config(
            config,
            {"timeouts": timeouts, **({"dataplane": dataplane} if dataplane else {})},
            drop_tls=plaintext,
        )
    amend_config(kits / ADMIN / "admin.toml", {"timeouts": timeouts}, drop_tls=plaintext)
    return kits


def hauler(*arguments: str) -> list[str]:
    """The command line of `hauler ARGUMENTS` with this interpreter."""
    return [sys.executable, "-m", "hauler", *arguments]


def start_federation(topology: Topology, kits: Path, logs: Path) -> list[subprocess.Popen]:
    """Start `hauler server` in the server's namespace and, once it listens, `hauler client` in each
    site's."""
    server = _start(
        topology.server,
        hauler("-v", "server", "--config", str(kits / "server" / "server.toml")),
        logs / "server.log",
    )
    processes = [server]
    try:
        _wait_listening(topology.server, server, logs / "server.log")
        for site, namespace in topology.sites.items():
            command = hauler("-v", "client", "--config", str(kits / site / "site.toml"))
            processes.append(_start(namespace, command, logs / f"{site}.log"))
    except BaseException:
        stop(processes)
        raise
    return processes


def _start(namespace: str, command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as output:
        return netem.start_in(
            namespace, command, stdout=output, stderr=output, stdin=subprocess.DEVNULL
        )


def _wait_listening(namespace: str, server: subprocess.Popen, log: Path) -> None:
    """Poll the control port from inside the server's namespace until it accepts (fail if the server
    exits)."""
    deadline = time.monotonic() + START_WAIT_S
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}): {_tail(log)}")
        probe = netem.socket_in(namespace)
        try:
            probe.settimeout(1.0)
            probe.connect((netem.SERVER_ADDRESS, CONTROL_PORT))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not listen within {START_WAIT_S:g} s: {_tail(log)}"
                ) from None
            time.sleep(0.1)
        finally:
            probe.close()


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process by PID; SIGKILL what is still there after STOP_GRACE_S."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path, lines: int = 15) -> str:
    return (
        "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        if log.exists()
        else "(no log)"
    )


def submit(
    topology: Topology, kits: Path, job_dir: Path, logs: Path, timeout_s: float
) -> tuple[str, float]:
    """`hauler submit --wait` with the admin kit, from the server's namespace; returns job id and
    wall seconds."""
    log = logs / "submit.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        netem.run_in(
            topology.server,
            hauler("submit", str(job_dir), "--kit", str(kits / ADMIN), "--wait"),
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
        )
    wall_s = time.perf_counter() - started
    text = log.read_text()
    if "submitted job " not in text:
        raise RuntimeError(f"the job was not submitted: {_tail(log)}")
    return text.split("submitted job ")[1].split()[0], wall_s


def outcome(server_job: Path) -> tuple[str, str]:
    """How the job ended (its last `job.*` event) and the error it gave, from its events.jsonl."""
    ends = [
        event
        for event in read_json_lines(server_job / "events.jsonl")
        if event["event"].startswith("job.")
    ]
    return (ends[-1]["event"], ends[-1].get("error", "")) if ends else ("(no end event)", "")


def sampled_error(server_job: Path, job_dir: Path, rounds: int) -> float:
    """Largest |final - (initial + rounds x increment)| over SAMPLE elements at each end of every
    array."""
    pattern = load_job_module(job_dir, f"wan_{server_job.name}", "model").pattern
    worst = 0.0
    with RoundStore(server_job, keep_rounds=2).open(rounds) as model:
        for name, array in model.arrays().items():
            flat, period = array.reshape(-1), pattern(int(name.split("_")[1]))
            for start in (0, max(0, flat.size - SAMPLE)):
                index = np.arange(start, min(flat.size, start + SAMPLE))
                expected = period[index % period.size] + np.float32(rounds * INCREMENT)
                worst = max(worst, float(np.abs(flat[index] - expected).max(initial=0.0)))
    return worst


def site_rows(metrics: list[dict[str, Any]], links: dict[str, LinkSpec]) -> list[dict[str, Any]]:
    """Per round and site, per direction: seconds, bytes, re-sent bytes, reconnects, MB/s,
    utilisation."""
    rows = []
    for row in (row for row in metrics if row.get("kind") == "site"):
        rate = links[row["site"]].rate_bytes_per_s
        entry: dict[str, Any] = {"round": row["round"], "site": row["site"]}
        for direction in ("download", "upload"):
            stats, seconds = row.get(direction, {}), row[f"{direction}_s"]
            entry[direction] = {
                **stats,
                "seconds": seconds,
                "utilisation": stats.get("bytes", 0) / (seconds * rate) if seconds else 0.0,
            }
        rows.append(entry)
    return rows


def round_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: its wall time, and the bytes its transfers put on the wire each way."""
    rows = []
    for row in sorted((r for r in metrics if r.get("kind") == "round"), key=lambda r: r["round"]):
        sites = [r for r in metrics if r.get("kind") == "site" and r["round"] == row["round"]]
        wire = {
            f"{d}_wire_bytes": sum(s[d].get("wire_bytes", s[d]["bytes"]) for s in sites)
            for d in ("download", "upload")
        }
        rows.append({"round": row["round"], "round_s": row["round_s"], **wire})
    return rows


def federated_run(
    links: dict[str, LinkSpec], settings: Settings, label: str, timeout_scale: float
) -> dict[str, Any]:
    """Provision, start a server and one site per link in namespaces, run hello-numpy, read its
    metrics."""
    folder = Path(tempfile.mkdtemp(prefix="hauler-wan-"))
    timeouts = scaled_timeouts(timeout_scale)
    kits = write_kits(folder, list(links), timeouts, settings.dataplane, settings.plaintext)
    job_dir = write_job(
        folder,
        arrays=settings.arrays,
        array_bytes=settings.array_bytes,
        rounds=settings.rounds,
        sites=len(links),
        upload=settings.upload,
        download=settings.download,
    )
    console.print(
        f"[bold]{label}[/]: {settings.array_bytes * settings.arrays / 2**20:.0f} MiB model, "
        f"{settings.rounds} round(s), timeouts {min(timeouts.values()):g} s; logs in {folder}"
    )
    try:
        with netem.wan(links) as topology:
            processes = start_federation(topology, kits, folder)
            try:
                job_id, wall_s = submit(topology, kits, job_dir, folder, settings.job_timeout_s)
            finally:
                stop(processes)
    except BaseException:
        console.print(f"[red]{label} failed[/]; kits and logs kept in {folder}")
        raise
    server_job = kits / "server" / "workspace" / "jobs" / job_id
    ended, error = outcome(server_job)
    max_error = (
        sampled_error(server_job, job_dir, settings.rounds)
        if ended == "job.finished"
        else float("inf")
    )
    metrics = read_json_lines(server_job / "metrics.jsonl")
    rows = site_rows(metrics, links)
    result = {
        "label": label,
        "timeout_scale": timeout_scale,
        "timeouts": timeouts,
        "job_id": job_id,
        "outcome": ended,
        "error": error,
        "wall_s": round(wall_s, 3),
        "max_abs_error_sampled": max_error,
        "correct": max_error <= settings.tolerance,
        "upload": settings.upload,
        "download": settings.download,
        "rounds": round_rows(metrics),
        "sites": rows,
        "longest_transfer_s": max(
            (r[d]["seconds"] for r in rows for d in ("download", "upload")), default=0.0
        ),
        "emulator": {site: link.stats for site, link in topology.links.items()},
    }
    if settings.keep or not result["correct"]:
        console.print(f"kits, workspaces and logs kept in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def tcp_streams(
    topology: Topology, site: str, seconds: float, congestion_control: str, streams: int = 1
) -> dict[str, Any]:
    """STREAMS parallel TCP streams from SITE to the server for SECONDS, default buffers;
    receiver-side goodput."""
    listener = netem.socket_in(topology.server)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((netem.SERVER_ADDRESS, TCP_PORT))
    listener.listen(streams)
    results, sink_end = multiprocessing.Pipe(duplex=False)
    receiver = multiprocessing.get_context("fork").Process(
        target=_sink, args=(listener, streams, sink_end)
    )
    receiver.start()
    senders = [netem.socket_in(topology.sites[site]) for _ in range(streams)]
    try:
        started = time.perf_counter()
        for sender in senders:
            sender.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion_control.encode()
            )
            sender.connect((netem.SERVER_ADDRESS, TCP_PORT))
        connect_s = (time.perf_counter() - started) / streams
        deadline = time.perf_counter() + seconds
        threads = [threading.Thread(target=_source, args=(sender, deadline)) for sender in senders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for sender in senders:
            sender.close()
        listener.close()
    received = results.recv()
    receiver.join()
    rate = topology.links[site].spec.rate_bytes_per_s
    return {
        "congestion_control": congestion_control,
        "streams": streams,
        "connect_ms": round(connect_s * 1e3, 2),
        **received,
        "utilisation": received["bytes"] / received["seconds"] / rate,
        "steady_utilisation": received["steady_bytes_per_s"] / rate,
    }


def _source(sender: socket.socket, deadline: float) -> None:
    """Send one reused buffer over and over until DEADLINE (the GIL is released inside sendall)."""
    payload = memoryview(bytearray(STREAM_BUFFER))
    while time.perf_counter() < deadline:
        sender.sendall(payload)


def _sink(listener: socket.socket, streams: int, out: Connection) -> None:
    """Receive STREAMS connections in threads; send back bytes, seconds, and the second half's
    rate."""
    arrivals: list[tuple[float, int]] = []  # list.append is atomic: the threads share it

    def drain(connection: socket.socket) -> None:
        buffer = memoryview(bytearray(STREAM_BUFFER))
        while received := connection.recv_into(buffer):
            arrivals.append((time.perf_counter(), received))
        connection.close()

    threads = [threading.Thread(target=drain, args=(listener.accept()[0],)) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    arrivals.sort()
    first, last = arrivals[0][0], arrivals[-1][0]
    middle = (first + last) / 2
    total = sum(n for _, n in arrivals)
    steady = sum(n for t, n in arrivals if t >= middle)
    out.send(
        {
            "bytes": total,
            "seconds": last - first,
            "mbit_per_s": total * 8 / (last - first) / 1e6,
            "steady_bytes_per_s": steady / (last - middle),
        }
    )


def seed(settings: Settings) -> dict[str, Any]:
    """The seed job across regions, with the default timeouts and with every timeout divided by
    10."""
    runs = [
        federated_run(SEED_LINKS, settings, "default timeouts", 1.0),
        federated_run(SEED_LINKS, settings, "timeouts / 10", 0.1),
    ]
    return {"links": SEED_LINKS, "runs": runs}


def compare(settings: Settings, codecs: list[str]) -> dict[str, Any]:
    """The seed job across regions once per codec, uploads and downloads alike, and how each
    codec's rounds after the first compare with the first codec's."""
    runs = [
        federated_run(SEED_LINKS, replace(settings, upload=codec, download=codec), codec, 1.0)
        for codec in codecs
    ]
    return {"links": SEED_LINKS, "runs": runs, "time_ratios": time_ratios(runs)}


def time_ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each run's mean round time after the first, over the first run's."""

    def later(run: dict[str, Any]) -> float:
        times = [row["round_s"] for row in run["rounds"] if row["round"] > 0]
        return sum(times) / len(times) if times else float("nan")

    baseline = later(runs[0])
    return {run["label"]: round(later(run) / baseline, 3) for run in runs}


def show_comparison(result: dict[str, Any]) -> None:
    """Each round's wall time and wire bytes per codec, side by side."""
    runs = result["runs"]
    columns = [f"{run['label']} {what}" for run in runs for what in ("s", "down MB", "up MB")]
    table = Table("round", *columns, title="the seed's links, per codec (both directions)")
    for index, row in enumerate(runs[0]["rounds"]):
        cells = []
        for run in runs:
            other = run["rounds"][index] if index < len(run["rounds"]) else {}
            cells += [
                f"{other.get('round_s', 0):.1f}",
                f"{other.get('download_wire_bytes', 0) / 1e6:.0f}",
                f"{other.get('upload_wire_bytes', 0) / 1e6:.0f}",
            ]
        table.add_row(str(row["round"]), *cells)
    console.print(table)
    ratios = ", ".join(f"{label} {ratio:.2f}x" for label, ratio in result["time_ratios"].items())
    console.print(f"mean round time after the first, against {runs[0]['label']}: {ratios}")


def path(settings: Settings, seconds: float, congestion_controls: list[str]) -> dict[str, Any]:
    """TCP streams across the long fat lossy path, then Hauler over it with both timeout
    settings."""
    with netem.wan(PATH_LINKS) as topology:
        streams = []
        for congestion_control in congestion_controls:
            console.print(f"one {congestion_control} TCP stream for {seconds:g} s ...")
            streams.append(tcp_streams(topology, "site-1", seconds, congestion_control))
        console.print(
            f"{PARALLEL_STREAMS} parallel bbr TCP streams for {seconds:g} s "
            "(this machine's ceiling) ..."
        )
        streams.append(tcp_streams(topology, "site-1", seconds, "bbr", PARALLEL_STREAMS))
    runs = [
        federated_run(PATH_LINKS, settings, "default timeouts", 1.0),
        federated_run(PATH_LINKS, settings, "timeouts / 10", 0.1),
    ]
    return {"links": PATH_LINKS, "tcp_streams": streams, "runs": runs}


def show_run(run: dict[str, Any], links: dict[str, LinkSpec]) -> None:
    """A table of per-site transfer figures for one run, then its verdict on the timeouts."""
    links_text = "; ".join(f"{site}: {spec.describe()}" for site, spec in links.items())
    table = Table(
        "round",
        "site",
        "down s",
        "util",
        "resent",
        "up s",
        "util",
        "resent",
        "reconnects",
        title=f"{run['label']}: {run['outcome']}, wall {run['wall_s']:.1f} s",
        caption=f"{links_text}. Re-sent MiB; reconnects down/up.",
    )
    for row in run["sites"]:
        down, up = row["download"], row["upload"]
        table.add_row(
            str(row["round"]),
            row["site"],
            *_cells(down),
            *_cells(up),
            f"{down.get('reconnects', 0)}/{up.get('reconnects', 0)}",
        )
    console.print(table)
    if run["outcome"] != "job.finished":
        console.print(f"[red]the job did not finish[/]: {run['error']}")
    elif run["timeout_scale"] < 1:
        shortest, longest = min(run["timeouts"].values()), run["longest_transfer_s"]
        verdict = (
            "transfer time did not count against them"
            if longest > shortest
            else "every transfer was shorter than them (not conclusive)"
        )
        console.print(
            f"longest transfer {longest:.1f} s with timeouts of {shortest:g} s: {verdict}"
        )
    check = "verified" if run["correct"] else "WRONG"
    console.print(f"result {check} (sampled max |error| {run['max_abs_error_sampled']:.1e})")
    for site, stats in run["emulator"].items():
        console.print(
            f"emulator {site}: down {_dropped(stats.get('a_to_b', {}))}; "
            f"up {_dropped(stats.get('b_to_a', {}))}"
        )


def _dropped(direction: dict[str, int]) -> str:
    """Packets lost at random and dropped at the full queue, as shares of those offered to the
    link."""
    offered = max(
        1, sum(direction.get(key, 0) for key in ("packets", "lost", "queue_drops", "ring_drops"))
    )
    return (
        f"{direction.get('lost', 0) / offered:.2%} lost, "
        f"{direction.get('queue_drops', 0) / offered:.2%} dropped by the full queue"
    )


def _cells(direction: dict[str, Any]) -> list[str]:
    """Seconds, utilisation and re-sent MiB of one direction of a transfer."""
    return [
        f"{direction['seconds']:.2f}",
        f"{direction['utilisation']:.0%}",
        f"{direction.get('bytes_resent', 0) / 2**20:.1f}",
    ]


def show_streams(streams: list[dict[str, Any]], link: LinkSpec) -> None:
    table = Table(
        "congestion control",
        "streams",
        "connect ms",
        "Mbit/s",
        "utilisation",
        "2nd half utilisation",
        title=f"TCP streams, default buffers, {link.describe()}",
    )
    for stream in streams:
        table.add_row(
            stream["congestion_control"],
            str(stream["streams"]),
            f"{stream['connect_ms']:.1f}",
            f"{stream['mbit_per_s']:.0f}",
            f"{stream['utilisation']:.1%}",
            f"{stream['steady_utilisation']:.1%}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on `kill PID` too
    reason = netem.unavailable()
    if reason:
        console.print(f"cannot emulate links here: {reason}")
        return 2
    settings = Settings(
        model_mib=args.model_mib or DEFAULT_MODEL_MIB[args.scenario],
        arrays=args.arrays,
        rounds=args.rounds or DEFAULT_ROUNDS[args.scenario],
        dataplane=dataplane_settings(args.dataplane),
        job_timeout_s=args.job_timeout,
        keep=args.keep,
        plaintext=args.plaintext,
        upload=args.upload,
        download=args.download,
    )
    if args.compare:
        result = compare(settings, [codec for codec in args.compare.split(",") if codec])
    elif args.scenario == "seed":
        result = seed(settings)
    else:
        result = path(settings, args.tcp_seconds, [cc for cc in args.tcp_cc.split(",") if cc])
        if result["tcp_streams"]:
            show_streams(result["tcp_streams"], PATH_LINKS["site-1"])
    for run in result["runs"]:
        show_run(run, result["links"])
    if "time_ratios" in result:
        show_comparison(result)
    if args.json:
        figures = {
            "scenario": args.scenario,
            "model_bytes": settings.array_bytes * settings.arrays,
            "arrays": settings.arrays,
            "rounds": settings.rounds,
            "dataplane": settings.dataplane,
            **result,
            "links": {site: asdict(spec) for site, spec in result["links"].items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(run["correct"] for run in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
