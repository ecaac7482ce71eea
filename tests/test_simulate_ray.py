"""The simulator's Ray backend on a real Ray head on loopback, and the promise that without
`--ray` nothing imports Ray.

The head is `ray start --head --block` run as our child in a session of its own, on a free port,
with its temporary files under the test's folder. It is stopped by its PID: SIGTERM makes the
blocking `ray start` shut down every process its node started (Ray's own shutdown), and whatever
might be left of that session is then killed by its process group, which is ours. `ray stop` is
not used because it stops every Ray process of the machine, by name, not only this head's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from helpers import assert_models_equal, hello_expected, hello_job
from safetensors.numpy import load_file

from hauler.admin.api import simulate
from hauler.core.config import DataPlane
from hauler.core.errors import JobError
from hauler.simulator import SimulationPlan
from hauler.simulator import simulate as run_simulation

RAY = Path(sys.executable).parent / "ray"
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"
}  # Ray's switch to keep a node's IP on loopback
HEAD_START_S = 90.0
HEAD_STOP_S = 30.0
MAX_SOCKET_DIR = (
    45  # Ray's session sockets live ~60 characters below --temp-dir; AF_UNIX allows 107
)
SITES, WORKERS, ROUNDS = 8, 2, 2


def fedavg_expected(job_dir: Path, *, rounds: int, sites: int) -> dict[str, np.ndarray]:
    """hello-numpy after `rounds` of FedAvg over `sites` equal sites, in float32 as the fold does
    it:
    each site adds `increment`, the sum of weight x model accumulates in float32, then x 1 /
    total."""
    config = tomllib.loads((job_dir / "job.toml").read_text())["executor"]["config"]
    increment, weight = np.float32(config["increment"]), np.float32(config["steps"])
    scale = np.float32(1.0 / (float(weight) * sites))
    expected = {}
    for name, array in hello_expected(job_dir, rounds=0).items():
        for _ in range(rounds):
            trained = array + increment
            total = trained * weight
            for _ in range(sites - 1):
                total += trained * weight
            array = total * scale
        expected[name] = array
    return expected


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_started(head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_S
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"the Ray head did not start:\n{log.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.2)


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to the blocking `ray start` (it shuts its node down), then its own session's
    group."""
    head.terminate()
    try:
        head.wait(HEAD_STOP_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(
            head.pid, signal.SIGKILL
        )  # the group `start_new_session` made: only this head's processes
    except ProcessLookupError:
        pass
    head.wait()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs; yields its address."""
    folder = tmp_path_factory.mktemp("ray")
    temp_dir = (
        folder
        if len(str(folder)) <= MAX_SOCKET_DIR
        else Path(tempfile.mkdtemp(prefix="hauler-ray-"))
    )
    port, log = _free_port(), folder / "head.log"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **LOOPBACK_ENV}
    with open(log, "wb") as output:
        head = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-cpus",
                "2",
                "--num-gpus",
                "0",
                "--include-dashboard=false",
                "--disable-usage-stats",
                "--object-store-memory",
                str(200 << 20),
                "--temp-dir",
                str(temp_dir),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        _wait_started(head, log)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in LOOPBACK_ENV.items():
                patch.setenv(
                    name, value
                )  # before this process imports Ray: the driver joins on loopback too
            patch.delenv("RAY_ADDRESS", raising=False)
            yield f"127.0.0.1:{port}"
    finally:
        _stop(head)
        if temp_dir != folder:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _events(workspace: Path, name: str) -> list[dict]:
    (events,) = workspace.glob("jobs/*/events.jsonl")
    return [
        record
        for line in events.read_text().splitlines()
        if (record := json.loads(line))["event"] == name
    ]


def _with_executor(job_dir: Path, **values: object) -> None:
    job = tomllib.loads((job_dir / "job.toml").read_text())
    job["executor"].update(values)
    (job_dir / "job.toml").write_text(tomli_w.dumps(job))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["in_process", "subprocess"])
def test_eight_sites_on_ray_average_exactly(
    ray_head: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    import ray

    puts = []
    put = ray.put
    monkeypatch.setattr(
        ray, "put", lambda value, **options: puts.append(1) or put(value, **options)
    )
    job_dir = hello_job(tmp_path, rounds=ROUNDS, min_clients=2, arrays=3, array_bytes=1_000_004)
    _with_executor(job_dir, mode=mode)  # the code in a thread of the actor, or in a child of it
    workspace = tmp_path / "sim"

    job = simulate(job_dir, sites=SITES, workers=WORKERS, workspace=workspace, ray=ray_head)

    (final,) = (workspace / "jobs").glob(f"*/global/round-{ROUNDS}.safetensors")
    assert_models_equal(load_file(str(final)), fedavg_expected(job_dir, rounds=ROUNDS, sites=SITES))
    results = _events(workspace, "site.result")
    assert len(results) == SITES * ROUNDS
    assert {record["worker"] for record in results} == set(range(1, WORKERS + 1))
    assert (
        len(puts) == ROUNDS
    )  # the global model enters the object store once a round, not once a site
    assert not (
        workspace / "jobs" / job.id / "workers"
    ).exists()  # the workers' files are on the nodes


NEW_MEMORY_SCRIPT = """
    import numpy as np

    import hauler

    while hauler.is_running():
        model = hauler.receive()
        config = hauler.context().config
        increment = np.float32(config["increment"])
        trained = {name: array + increment for name, array in model.items()}  # new memory
        hauler.send(trained, weight=config["steps"])
"""


@pytest.mark.slow
def test_updates_sent_from_the_codes_memory_come_back_in_many_windows(
    ray_head: str, tmp_path: Path
) -> None:
    """Small chunks and windows: every update takes several windows, the last chunk of each tensor
    is short, and the code sends arrays of its own (not the actor's model file)."""
    job_dir = hello_job(tmp_path, rounds=ROUNDS, arrays=3, array_bytes=40_004)
    (job_dir / "train.py").unlink()
    (job_dir / "train_script.py").write_text(textwrap.dedent(NEW_MEMORY_SCRIPT))
    job = tomllib.loads((job_dir / "job.toml").read_text())
    job["executor"] = {"script": "train_script.py", "config": job["executor"]["config"]}
    (job_dir / "job.toml").write_text(tomli_w.dumps(job))
    plan = SimulationPlan(
        job_dir,
        SITES,
        tmp_path / "sim",
        workers=WORKERS,
        ray=ray_head,
        dataplane=DataPlane(connections=1, chunk_bytes=4096, window_bytes=3 * 4096),
    )

    asyncio.run(run_simulation(plan))

    (final,) = (tmp_path / "sim" / "jobs").glob(f"*/global/round-{ROUNDS}.safetensors")
    assert_models_equal(load_file(str(final)), fedavg_expected(job_dir, rounds=ROUNDS, sites=SITES))


BAD_SITES = """
    import numpy as np

    from hauler.client import TrainContext, TrainOutput


    def train(model: dict[str, np.ndarray], context: TrainContext) -> TrainOutput:
        for array in model.values():
            array += np.float32(context.config["increment"])
        if context.site == "site-3":
            model["array_0"][7] = np.nan
        if context.site == "site-5":
            model["array_1"] *= np.float32(1000)
        return TrainOutput(weight=float(context.config["steps"]), metrics={})
"""


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_workers_screen_updates_before_the_fold(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Local and Ray workers screen the same way: site-3's NaN and site-5's oversized update are
    refused by name before any of their chunks is folded (the simulator needs every site, so the
    round then fails)."""
    job_dir = hello_job(tmp_path, rounds=1, arrays=2, array_bytes=40_000)
    (job_dir / "train.py").write_text(textwrap.dedent(BAD_SITES))
    job = tomllib.loads((job_dir / "job.toml").read_text())
    job["workflow"]["max_update_norm"] = 1.0
    (job_dir / "job.toml").write_text(tomli_w.dumps(job))
    workspace = tmp_path / "sim"
    address = request.getfixturevalue("ray_head") if backend == "ray" else None

    with pytest.raises(JobError, match="fewer than min_clients"):
        simulate(job_dir, sites=6, workers=WORKERS, workspace=workspace, ray=address)

    failed = {record["site"]: record["error"] for record in _events(workspace, "site.failed")}
    assert sorted(failed) == ["site-3", "site-5"]
    assert "non-finite values in tensor 'array_0'" in failed["site-3"]
    assert "max_update_norm" in failed["site-5"]
    assert len(_events(workspace, "site.result")) == 4


NO_RAY = """
import sys
from pathlib import Path

from hauler.admin.api import simulate

simulate(Path(sys.argv[1]), sites=3, workers=2, workspace=Path(sys.argv[2]))
loaded = sorted(name for name in sys.modules if name == "ray" or name.startswith("ray."))
print("ray modules:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_a_simulation_without_ray_imports_no_ray(tmp_path: Path) -> None:
    job_dir = hello_job(tmp_path, rounds=1, arrays=2, array_bytes=4_000)
    run = subprocess.run(
        [sys.executable, "-c", NO_RAY, str(job_dir), str(tmp_path / "sim")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ray modules: []" in run.stdout
    (final,) = (tmp_path / "sim" / "jobs").glob("*/global/round-1.safetensors")
    assert_models_equal(load_file(str(final)), fedavg_expected(job_dir, rounds=1, sites=3))


def test_an_address_nobody_answers_is_refused_at_once(tmp_path: Path) -> None:
    """`ray.init` would retry a dead address forever; the simulator says so instead, as a config
    error."""
    job_dir = hello_job(tmp_path, rounds=1, arrays=1, array_bytes=4_000)
    address = f"127.0.0.1:{_free_port()}"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hauler",
            "simulate",
            str(job_dir),
            "--sites",
            "2",
            "--workers",
            "1",
            "--workspace",
            str(tmp_path / "sim"),
            "--ray",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **LOOPBACK_ENV},
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"--ray {address}: no Ray cluster answers there" in run.stdout + run.stderr
