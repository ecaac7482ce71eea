"""Helpers shared by the test modules: model layouts and files, the `hauler` command,
hello-numpy jobs and their expected results, and local federations of real processes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from hauler.model import Manifest, ModelFile, numpy_dtype

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "hello-numpy"
SMALL_CHUNK = 4096  # the smallest chunk a config allows: many chunks from small models

Layout = Sequence[tuple[str, str, tuple[int, ...]]]

# Every dtype, with sizes that are not multiples of SMALL_CHUNK, empty tensors first,
# in the middle and last, a scalar, and a 2-D empty tensor.
MIXED_LAYOUT: Layout = [
    ("empty_first", "F32", (0,)),
    ("weights", "F32", (10_001,)),
    ("scalar", "F32", ()),
    ("half", "F16", (3, 1001)),
    ("brain", "BF16", (2049,)),
    ("empty_2d", "I64", (4, 0)),
    ("steps", "I64", (1001,)),
    ("small_int", "I32", (7,)),
    ("short", "I16", (5,)),
    ("tiny", "I8", (3,)),
    ("bytes", "U8", (4097,)),
    ("flags", "BOOL", (33,)),
    ("double", "F64", (513,)),
    ("empty_last", "BF16", (0,)),
]


def manifest_of(layout: Layout, chunk_bytes: int = SMALL_CHUNK) -> Manifest:
    return Manifest.build(layout, chunk_bytes)


def fill_random_bytes(model: ModelFile, seed: int) -> None:
    """Arbitrary bit patterns (NaNs included): for checks that compare bytes."""
    rng = np.random.default_rng(seed)
    for index in range(len(model.manifest.tensors)):
        view = model.tensor_bytes(index)
        view[:] = rng.integers(0, 256, len(view), dtype=np.uint8).tobytes()


def fill_exact_values(model: ModelFile, seed: int) -> None:
    """Values that every dtype holds exactly and whose small weighted sums stay exact:
    multiples of 1/4 in [-32, 32] for floats, integers for the rest."""
    rng = np.random.default_rng(seed)
    for array in model.arrays().values():
        if array.dtype == np.bool_:
            array[...] = rng.integers(0, 2, array.shape).astype(bool)
        elif array.dtype.kind in "iu":
            info = np.iinfo(array.dtype)
            low, high = max(info.min, -1000), min(info.max, 1000)
            array[...] = rng.integers(low, high + 1, array.shape).astype(array.dtype)
        else:
            array[...] = (rng.integers(-128, 129, array.shape) / 4).astype(array.dtype)


def create_model(
    path: Path,
    layout: Layout,
    *,
    chunk_bytes: int = SMALL_CHUNK,
    fill: Callable[[ModelFile, int], None] = fill_random_bytes,
    seed: int = 0,
) -> ModelFile:
    model = ModelFile.create(path, manifest_of(layout, chunk_bytes))
    fill(model, seed)
    model.compute_digests()
    return model


def tensor_bytes(model: ModelFile) -> list[bytes]:
    return [bytes(model.tensor_bytes(index)) for index in range(len(model.manifest.tensors))]


def as_float64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64)


def expected_average(
    models: Sequence[ModelFile], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Weighted average per tensor, computed exactly in float64 and cast like FedAvg casts
    (integers and booleans rounded half to even)."""
    total = float(sum(weights))
    result = {}
    for index, tensor in enumerate(models[0].manifest.tensors):
        dtype = numpy_dtype(tensor.dtype)
        average = sum(w * as_float64(m.array(index)) for m, w in zip(models, weights)) / total
        if dtype.kind in "iub":
            average = np.rint(average)
        result[tensor.name] = np.asarray(average).astype(dtype)
    return result


# ----- the `hauler` command, as a real process -------------------------------------------------


def hauler(*arguments: str | Path, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m hauler ARGUMENTS` from the repository under test and capture its output
    (no check: tests assert)."""
    environment = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hauler", *map(str, arguments)],
        capture_output=True,
        cwd=REPO,
        text=True,
        timeout=timeout_s,
        env=environment,
        stdin=subprocess.DEVNULL,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Assert a command succeeded, showing its output if not."""
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def submitted_job_id(stdout: str) -> str:
    match = re.search(r"submitted job ([0-9a-f]+)", stdout)
    assert match, f"no job id in {stdout!r}"
    return match.group(1)


def wait_until(
    condition: Callable[[], Any], *, timeout_s: float = 60.0, what: str = "condition"
) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s:g} s")
        time.sleep(0.1)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


# ----- hello-numpy jobs -------------------------------------------------------------------------


def hello_job(
    folder: Path,
    *,
    rounds: int = 2,
    min_clients: int = 2,
    wait_s: float = 10.0,
    arrays: int = 4,
    array_bytes: int = 1_000_004,
    increment: float = 0.125,
    steps: int = 8,
    name: str = "hello-numpy",
) -> Path:
    """A copy of examples/hello-numpy with its job.toml sized for tests.

    increment and steps default to powers of two so every float32 step of training and
    averaging is exact: the final model must then equal the expected one bit for bit."""
    job_dir = folder / name
    shutil.copytree(EXAMPLE, job_dir, ignore=shutil.ignore_patterns("__pycache__"))
    job = tomllib.loads((job_dir / "job.toml").read_text())
    job["name"] = name
    job["workflow"].update(
        num_rounds=rounds, min_clients=min_clients, wait_time_after_min_received=wait_s
    )
    job["model"]["config"] = {"arrays": arrays, "array_bytes": array_bytes}
    job["executor"]["config"] = {"increment": increment, "steps": steps}
    (job_dir / "job.toml").write_text(tomli_w.dumps(job))
    return job_dir


def edit_job(job_dir: Path, section: str, values: dict[str, Any]) -> Path:
    """Merge `values` into the `[section]` table of a job folder's job.toml."""
    job = tomllib.loads((job_dir / "job.toml").read_text())
    job.setdefault(section, {}).update(values)
    (job_dir / "job.toml").write_text(tomli_w.dumps(job))
    return job_dir


EVALUATE = '''

def evaluate(model, context):
    """The model's first value, and who measured it: enough to tell models and sites apart."""
    return {"first": float(model["array_0"].reshape(-1)[0]), "site": context.settings["site_index"]}
'''


def with_evaluate(job_dir: Path) -> Path:
    """hello-numpy's train module given an `evaluate(model, context)` (see EVALUATE)."""
    with open(job_dir / "train.py", "a") as module:
        module.write(EVALUATE)
    return job_dir


SITE_TRAIN = (
    '''"""Adds `increment` x (site_index + 1) to every array: each site's local model is known."""

from hauler.client import TrainContext, TrainOutput


def train(model, context: TrainContext) -> TrainOutput:
    step = context.config["increment"] * (1 + context.settings["site_index"])
    for array in model.values():
        array += step
    return TrainOutput(weight=context.config["steps"])
'''
    + EVALUATE
)


def cross_site_job(folder: Path, *, rounds: int = 1) -> Path:
    """hello-numpy's model (array_0 starts at 0.0) trained by SITE_TRAIN for `rounds`, then
    evaluated across sites: site k's local model starts with 0.125 x k (after one round)."""
    job_dir = hello_job(folder, rounds=rounds, arrays=2, array_bytes=40_004, name="cross-site")
    (job_dir / "train.py").write_text(SITE_TRAIN)
    return edit_job(job_dir, "workflow", {"name": "cross_site_evaluation"})


def expected_matrix(sites: int, kept: Sequence[str] = ()) -> dict[str, list[list[float | None]]]:
    """What cross_site_job's matrix holds after one round: the first value of each model
    evaluated (global 0.25 for 3 sites; site k's 0.125 x k), and the index of the site that
    evaluated it; None where the site did not (its own model, or any at a site that keeps
    its own)."""
    names = [f"site-{k}" for k in range(1, sites + 1)]
    models = ["global", *(name for name in names if name not in kept)]
    first = {"global": 0.125 * (sites + 1) / 2, **{n: 0.125 * (i + 1) for i, n in enumerate(names)}}
    rows = {"first": [], "site": []}
    for index, site in enumerate(names):
        evaluated = ["global"] if site in kept else [m for m in models if m != site]
        rows["first"].append([first[m] if m in evaluated else None for m in models])
        rows["site"].append([float(index) if m in evaluated else None for m in models])
    return rows


def assert_matrix(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """The same cells measured, each within float32's rounding of the expected value."""
    assert sorted(actual) == sorted(expected)
    for name, rows in expected.items():
        for got, want in zip(actual[name], rows, strict=True):
            assert [g is None for g in got] == [w is None for w in want], (name, got, want)
            for value, wanted in zip(got, want):
                assert value is None or abs(value - wanted) <= 1e-6 * abs(wanted), (name, got)


def hello_expected(job_dir: Path, rounds: int) -> dict[str, np.ndarray]:
    """The initial model (from the job's own model.py) plus `rounds` x increment, in float32."""
    job = tomllib.loads((job_dir / "job.toml").read_text())
    spec = importlib.util.spec_from_file_location(
        f"hello_model_{id(job_dir)}", job_dir / "model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    increment = np.float32(job["executor"]["config"]["increment"])
    expected = {}
    for name, dtype, shape in module.layout(job["model"]["config"]):
        array = np.empty(shape, numpy_dtype(dtype))
        module.fill(name, array, job["model"]["config"])
        for _ in range(rounds):
            array += increment
        expected[name] = array
    return expected


def assert_models_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype, name
        assert actual[name].shape == array.shape, name
        differ = np.flatnonzero(actual[name].reshape(-1) != array.reshape(-1))
        assert differ.size == 0, (
            f"{name}: {differ.size} values differ, first at {differ[0]}: "
            f"{actual[name].reshape(-1)[differ[0]]!r} != {array.reshape(-1)[differ[0]]!r}"
        )


# ----- local federations of real processes -------------------------------------------------------


def edit_configs(
    workspace: Path, section: str | None, values: dict[str, Any], *, roles: str = "server,sites"
) -> None:
    """Merge `values` into `[section]` (None: the top level) of the server's and/or the sites'
    config files."""
    paths = []
    if "server" in roles:
        paths.append(workspace / "server" / "server.toml")
    if "sites" in roles:
        paths.extend(sorted(workspace.glob("site-*/site.toml")))
    for path in paths:
        config = tomllib.loads(path.read_text())
        (config if section is None else config.setdefault(section, {})).update(values)
        path.write_text(tomli_w.dumps(config))


@contextlib.contextmanager
def federation(
    workspace: Path, *, sites: int, configure: Callable[[Path], None] | None = None
) -> Iterator[dict[str, int]]:
    """`hauler poc prepare` + `start`; always `hauler poc stop` afterwards. Yields role -> PID."""
    ok(hauler("poc", "prepare", "--workspace", workspace, "--sites", sites))
    if configure is not None:
        configure(workspace)
    try:
        started = ok(hauler("poc", "start", "--workspace", workspace, "--wait-s", 60))
        yield {role: int(pid) for role, pid in re.findall(r"(\S+): pid (\d+)", started.stdout)}
    finally:
        hauler("poc", "stop", "--workspace", workspace)


# ----- frames, fed by hand ------------------------------------------------------------------------


def feed(
    reader: Any,
    data: bytes,
    piece_bytes: int = 1 << 30,
    on_frame: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Push `data` through a FrameReader the way BufferedProtocol does, at most `piece_bytes`
    at a time (and never more than the buffer it hands out); each completed frame goes to
    `on_frame` at once, as a connection's handler gets it, and all are returned."""
    frames, position = [], 0
    while position < len(data):
        buffer = reader.get_buffer()
        assert len(buffer) > 0, "the reader handed out an empty buffer"
        count = min(len(buffer), piece_bytes, len(data) - position)
        buffer[:count] = data[position : position + count]
        position += count
        frame = reader.buffer_updated(count)
        if frame is not None:
            frames.append(frame)
            if on_frame is not None:
                on_frame(frame)
    return frames


# Faults: a POC whose sites retry fast, and that can be routed through a FaultProxy.
FAST_RETRIES = {
    "chunk_bytes": 256 << 10,  # small models still travel as many chunks
    "retry_backoff_s": 0.05,
    "retry_backoff_max_s": 0.5,
    "max_retries": 50,
    "connections": 4,
}


def route_sites_through(workspace: Path, port: int) -> None:
    """Make every site of a POC dial the data plane at `port` (a FaultProxy's)."""
    for config in workspace.glob("site-*/site.toml"):
        data = tomllib.loads(config.read_text())
        config.write_text(tomli_w.dumps({**data, "data_port": port}))


def server_data_port(workspace: Path) -> int:
    """The data port a POC's server listens on."""
    return tomllib.loads((workspace / "server" / "server.toml").read_text())["data_port"]
