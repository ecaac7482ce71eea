"""Training scripts that call hauler.receive()/send(), run by real sites of a real federation,
in the site process and as child processes: numpy and torch, full models and deltas, and
scripts that fail."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from helpers import (
    assert_models_equal,
    federation,
    hauler,
    hello_expected,
    hello_job,
    ok,
    process_gone,
    read_jsonl,
    submitted_job_id,
)
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

MODES = ("in_process", "subprocess")

NUMPY_SCRIPT = """
    import hauler

    while hauler.is_running():
        model = hauler.receive()
        context = hauler.context()
        increment = context.config["increment"]
        # new memory, not the received arrays
        trained = {name: array + np.float32(increment) for name, array in model.items()}
        hauler.send(trained, weight=context.config["steps"], metrics={"round_seen": context.round})
"""

TORCH_SCRIPT = """
    import hauler
    import torch

    while hauler.is_running():
        model = hauler.receive("torch")
        context = hauler.context()
        increment = context.config["increment"]
        state = {name: tensor.clone() + increment for name, tensor in model.items()}
        loss = torch.tensor(1.0 / (1 + context.round))
        hauler.send(state, weight=context.config["steps"], metrics={"loss": loss}, delta=DELTA)
"""


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("api") / "poc"
    with federation(workspace, sites=2) as pids:
        yield workspace, pids


def script_job(tmp_path, script: str, *, mode: str, rounds: int = 2, **values: object):
    """hello-numpy, trained by SCRIPT (values substituted) instead of its train() module."""
    job = hello_job(tmp_path, rounds=rounds, min_clients=2, arrays=3, array_bytes=400_004)
    text = "import numpy as np\n" + textwrap.dedent(script)
    for name, value in values.items():
        text = text.replace(name, repr(value))
    (job / "train_script.py").write_text(text)
    config = tomllib.loads((job / "job.toml").read_text())
    config["executor"] = {
        "script": "train_script.py",
        "mode": mode,
        "config": config["executor"]["config"],
    }
    (job / "job.toml").write_text(tomli_w.dumps(config))
    return job


def run(poc, job, *, expect_ok: bool = True):
    workspace, _ = poc
    result = hauler("submit", job, "--workspace", workspace, "--wait")
    assert (result.returncode == 0) == expect_ok, result.stdout + result.stderr
    job_id = submitted_job_id(result.stdout)
    return job_id, workspace / "server" / "jobs" / job_id


def final_model(poc, job_id, tmp_path):
    ok(hauler("jobs", "download", job_id, "-o", tmp_path / "out", "--workspace", poc[0]))
    return load_file(str(tmp_path / "out" / "global.safetensors"))


@pytest.mark.parametrize("mode", MODES)
def test_numpy_script_trains_like_hello_numpy(poc, tmp_path, mode):
    job = script_job(tmp_path, NUMPY_SCRIPT, mode=mode)
    job_id, server_job = run(poc, job)
    assert_models_equal(final_model(poc, job_id, tmp_path), hello_expected(job, rounds=2))
    sites = [row for row in read_jsonl(server_job / "metrics.jsonl") if row["kind"] == "site"]
    assert sorted((row["round"], row["site"], row["metrics"]["round_seen"]) for row in sites) == [
        (0, "site-1", 0),
        (0, "site-2", 0),
        (1, "site-1", 1),
        (1, "site-2", 1),
    ]
    if mode == "subprocess":  # one child per site for the whole job, with its own log
        assert all(
            (poc[0] / site / "jobs" / job_id / "trainer.log").exists()
            for site in ("site-1", "site-2")
        )


@pytest.mark.parametrize("mode", MODES)
def test_torch_state_dict_script(poc, tmp_path, mode):
    job = script_job(tmp_path, TORCH_SCRIPT, mode=mode, DELTA=False)
    job_id, server_job = run(poc, job)
    assert_models_equal(final_model(poc, job_id, tmp_path), hello_expected(job, rounds=2))
    losses = sorted(
        row["metrics"]["loss"]
        for row in read_jsonl(server_job / "metrics.jsonl")
        if row["kind"] == "site"
    )
    assert losses == [0.5, 0.5, 1.0, 1.0]


def test_deltas_aggregate_to_the_same_model(poc, tmp_path):
    job = script_job(tmp_path, TORCH_SCRIPT, mode="subprocess", DELTA=True)
    job_id, _ = run(poc, job)
    actual, expected = final_model(poc, job_id, tmp_path), hello_expected(job, rounds=2)
    assert sorted(actual) == sorted(expected)
    for (
        name,
        array,
    ) in expected.items():  # base + (trained - base) rounds once in float32: not bit for bit
        np.testing.assert_allclose(actual[name], array, rtol=0, atol=1e-6, err_msg=name)
        assert not np.array_equal(actual[name], hello_expected(job, rounds=1)[name])


FAILING = {
    "raises": (
        "raise_later",
        'raise RuntimeError("bug in the training script")',
        "bug in the training script",
    ),
    "wrong_shape": ("send_wrong", "pass", "'array_0' has shape (2,)"),
    "dies": ("die", "import os; os._exit(3)", "exited with code 3"),
    "returns_without_send": ("forget", "pass", "without calling hauler.send()"),
}

FAILING_SCRIPT = """
    import hauler

    hauler.is_running()
    model = hauler.receive()
    if "KIND" == "send_wrong":
        hauler.send({**model, "array_0": np.zeros(2, np.float32)})
    elif "KIND" != "forget":
        CODE
"""


# os._exit in the site's own process would end the site: that is what subprocess mode is for.
FAILING_RUNS = [
    (kind, mode) for kind in FAILING for mode in MODES if (kind, mode) != ("dies", "in_process")
]


@pytest.mark.parametrize("kind, mode", FAILING_RUNS)
def test_failing_script_fails_the_job_with_its_reason_and_the_site_lives(poc, tmp_path, kind, mode):
    name, code, reason = FAILING[kind]
    script = FAILING_SCRIPT.replace('"KIND"', repr(name)).replace("CODE", code)
    job = script_job(tmp_path, script, mode=mode, rounds=1)
    _, server_job = run(poc, job, expect_ok=False)
    errors = [
        event["error"]
        for event in read_jsonl(server_job / "events.jsonl")
        if event["event"] == "site.failed"
    ]
    assert errors and all(reason in error for error in errors), errors
    assert [role for role, pid in poc[1].items() if process_gone(pid)] == []


PYTORCH_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello-pytorch"


def test_hello_pytorch_learns_in_two_rounds(poc, tmp_path):
    """The example on two sites for two short rounds: the global model gets better, and the
    downloaded final model is better still (checked by the example's own baseline.py)."""
    job = tmp_path / "hello-pytorch"
    shutil.copytree(PYTORCH_EXAMPLE, job, ignore=shutil.ignore_patterns("__pycache__"))
    config = tomllib.loads((job / "job.toml").read_text())
    config["workflow"].update(num_rounds=2, min_clients=2)
    config["executor"]["config"].update(epochs=1)
    (job / "job.toml").write_text(tomli_w.dumps(config))
    job_id, server_job = run(poc, job)
    sites = [row for row in read_jsonl(server_job / "metrics.jsonl") if row["kind"] == "site"]
    start = {
        row["round"]: row["validation"]["accuracy_all"] for row in sites
    }  # the same model on every site
    assert start[0] < 0.3 and start[1] > start[0] + 0.3, start
    ok(hauler("jobs", "download", job_id, "-o", tmp_path / "out", "--workspace", poc[0]))
    evaluated = subprocess.run(
        [sys.executable, "baseline.py", str(tmp_path / "out" / "global.safetensors")],
        cwd=job,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    final = float(re.search(r"test accuracy ([0-9.]+)", evaluated.stdout).group(1))
    assert final > start[1], (final, start)
