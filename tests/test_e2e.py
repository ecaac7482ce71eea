"""End to end on real processes: one local federation (a server and two sites) per module,
driven only through the `hauler` command, as a user would."""

from __future__ import annotations

import re
import time
import tomllib

import numpy as np
import pytest
import tomli_w
from helpers import (
    assert_models_equal,
    edit_configs,
    edit_job,
    federation,
    hauler,
    hello_expected,
    hello_job,
    ok,
    read_jsonl,
    submitted_job_id,
    wait_until,
)
from safetensors.numpy import load_file, save_file

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

ROUND_KEYS = {"download_s", "train_s", "upload_s", "aggregate_s"}


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    """A running federation with small chunks, so every tensor travels as several."""
    workspace = tmp_path_factory.mktemp("e2e") / "poc"
    (workspace.parent / "models").mkdir()

    def configure(workspace):
        edit_configs(workspace, "dataplane", {"chunk_bytes": 256 << 10, "window_bytes": 1 << 20})
        edit_configs(
            workspace, None, {"model_dirs": [str(workspace.parent / "models")]}, roles="server"
        )

    with federation(workspace, sites=2, configure=configure):
        yield workspace


def job_dir_on_server(poc, job_id):
    return poc / "server" / "jobs" / job_id


def job_status(poc, job_id) -> str:
    return ok(hauler("jobs", "status", job_id, "--workspace", poc)).stdout


def test_hello_numpy_two_sites_two_rounds_gives_initial_plus_rounds_times_increment(poc, tmp_path):
    job = hello_job(tmp_path, rounds=2, min_clients=2, arrays=4, array_bytes=1_000_004)
    submitted = ok(hauler("submit", job, "--workspace", poc, "--wait"))
    job_id = submitted_job_id(submitted.stdout)
    assert "job.finished" in submitted.stdout

    downloaded = ok(hauler("jobs", "download", job_id, "-o", tmp_path / "out", "--workspace", poc))
    assert "after 2 rounds" in downloaded.stdout  # rounds 0 and 1: counted, not numbered
    assert_models_equal(
        load_file(str(tmp_path / "out" / "global.safetensors")), hello_expected(job, rounds=2)
    )

    listed = ok(hauler("jobs", "list", "--workspace", poc)).stdout
    assert re.search(rf"{job_id}\s.*hello-numpy.*finished.*2/2", listed), listed
    status = job_status(poc, job_id)
    assert f"job {job_id} (hello-numpy): finished, rounds 2/2" in status
    assert re.search(r"^\W*0\W", status, re.M) and re.search(r"^\W*1\W", status, re.M), (
        status
    )  # a row per round

    server_job = job_dir_on_server(poc, job_id)
    rounds = [row for row in read_jsonl(server_job / "metrics.jsonl") if row["kind"] == "round"]
    assert [row["round"] for row in rounds] == [0, 1]
    for row in rounds:
        assert ROUND_KEYS <= set(row) and all(row[key] >= 0 for key in ROUND_KEYS)
        assert sorted(row["sites"]) == ["site-1", "site-2"]
    for row in read_jsonl(server_job / "metrics.jsonl"):
        if row["kind"] == "site":  # a clean link: every byte moved once, on every lane
            for direction in ("download", "upload"):
                assert (row[direction]["reconnects"], row[direction]["bytes_resent"]) == (0, 0), (
                    direction,
                    row,
                )
    events = [event["event"] for event in read_jsonl(server_job / "events.jsonl")]
    assert events[:2] == ["initial_model.received", "job.started"] and events[-1] == "job.finished"
    assert events.count("round.complete") == 2 and events.count("site.result") == 4
    assert "round.refold" not in events  # nobody failed, nothing folded twice
    assert (server_job / "global" / "round-2.safetensors").exists()


def test_cyclic_relays_the_model_through_both_sites_on_the_data_plane(poc, tmp_path):
    """2 passes through 2 real sites: 4 hops, each site's upload served as the next download,
    bit for bit (weights of 3 would show in an average of one)."""
    job = hello_job(tmp_path, rounds=2, min_clients=2, arrays=2, array_bytes=300_004, steps=3)
    edit_job(job, "workflow", {"name": "cyclic", "seed": 3})
    submitted = ok(hauler("submit", job, "--workspace", poc, "--wait"))
    job_id = submitted_job_id(submitted.stdout)
    ok(hauler("jobs", "download", job_id, "-o", tmp_path / "out", "--workspace", poc))
    assert_models_equal(
        load_file(str(tmp_path / "out" / "global.safetensors")), hello_expected(job, 4)
    )
    records = read_jsonl(job_dir_on_server(poc, job_id) / "metrics.jsonl")
    hops = [
        row["sites"]
        for row in sorted(records, key=lambda r: r.get("round", -1))
        if row["kind"] == "round"
    ]
    assert hops == [["site-1"], ["site-2"]] * 2
    assert all(row["download"]["bytes"] == 600_008 for row in records if row["kind"] == "site")
    assert re.search(
        rf"{job_id}\s.*finished.*4/4", ok(hauler("jobs", "list", "--workspace", poc)).stdout
    )


def test_jobs_abort_marks_a_running_job_aborted(poc, tmp_path):
    job = hello_job(tmp_path, rounds=1, min_clients=3, name="waits-for-a-third-site")
    job_id = submitted_job_id(ok(hauler("submit", job, "--workspace", poc)).stdout)
    try:
        wait_until(lambda: "running" in job_status(poc, job_id), timeout_s=60, what="job running")
        wait_until(
            lambda: any(
                e["event"] == "sites.waiting"
                for e in read_jsonl(job_dir_on_server(poc, job_id) / "events.jsonl")
            ),
            timeout_s=30,
            what="job waiting for sites",
        )
        assert (
            f"aborted job {job_id}"
            in ok(hauler("jobs", "abort", job_id, "--workspace", poc)).stdout
        )
        wait_until(lambda: "aborted" in job_status(poc, job_id), timeout_s=30, what="job aborted")
    finally:
        hauler("jobs", "abort", job_id, "--workspace", poc)  # never leave it blocking the queue
    events = [
        event["event"] for event in read_jsonl(job_dir_on_server(poc, job_id) / "events.jsonl")
    ]
    assert events[-1] == "job.aborted"
    listed = ok(hauler("jobs", "list", "--workspace", poc)).stdout
    assert re.search(rf"{job_id}\s.*aborted", listed), listed
    again = hauler("jobs", "abort", job_id, "--workspace", poc)
    assert again.returncode != 0 and "already aborted" in again.stderr


def test_unknown_job_is_a_clear_error(poc):
    result = hauler("jobs", "status", "0123456789ab", "--workspace", poc)
    assert result.returncode != 0 and "no job '0123456789ab'" in result.stderr
    assert "Traceback" not in result.stderr


def server_jobs(poc) -> list:
    jobs = poc / "server" / "jobs"
    return sorted(jobs.iterdir()) if jobs.exists() else []


def write_job_toml(job, content: str | bytes | None) -> None:
    path = job / "job.toml"
    if content is None:
        path.unlink()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


MALFORMED = {
    "unknown_key": (
        'name = "x"\n[workflow]\nnm_rounds = 3\n[model]\nmodule = "model"\n'
        '[executor]\nmodule = "train"\n',
        ["job.toml: workflow.nm_rounds: unknown key"],
    ),
    "invalid_toml": ('name = "x\n[workflow]\n', ["job.toml: not valid TOML"]),
    "wrong_type": (
        'name = "x"\n[workflow]\nnum_rounds = "two"\n[model]\nmodule = "model"\n'
        '[executor]\nmodule = "train"\n',
        ["job.toml: workflow.num_rounds:"],
    ),
    "missing_section": ('name = "x"\n[model]\nmodule = "model"\n', ["job.toml: executor:"]),
    "not_utf8": (b'name = "caf\xe9"\n', ["job.toml: "]),
    "missing_job_toml": (None, ["no job.toml"]),
}


@pytest.mark.parametrize("content, expected", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_job_is_refused_with_the_file_and_key(poc, tmp_path, content, expected):
    job = hello_job(tmp_path)
    write_job_toml(job, content)
    jobs_before = server_jobs(poc)
    result = hauler("submit", job, "--workspace", poc)
    assert result.returncode == 2, result.stderr
    assert str(job) in result.stderr
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert server_jobs(poc) == jobs_before  # nothing reached the server


def test_malformed_job_is_refused_even_when_the_server_is_down(tmp_path):
    admin = tmp_path / "admin.toml"
    admin.write_text(
        tomli_w.dumps({"control_port": 9, "data_port": 9, "timeouts": {"communication_timeout": 2}})
    )
    job = hello_job(tmp_path)
    write_job_toml(job, MALFORMED["unknown_key"][0])
    result = hauler("submit", job, "--kit", admin)
    assert result.returncode == 2 and "workflow.nm_rounds: unknown key" in result.stderr


@pytest.mark.parametrize("command", [("jobs", "list"), ("sites",), ("submit", "JOB")])
def test_a_cli_call_to_a_stopped_server_fails_within_seconds_saying_what_to_do(tmp_path, command):
    ok(hauler("poc", "prepare", "--workspace", tmp_path / "poc", "--sites", 1))  # never started
    arguments = [hello_job(tmp_path) if part == "JOB" else part for part in command]
    started = time.monotonic()
    result = hauler(*arguments, "--workspace", tmp_path / "poc")
    # The CLI gives up after 3 s of trying; the rest is the interpreter's start, which a busy
    # 2-core machine stretches. What matters: seconds, not the minutes of a retry loop.
    assert time.monotonic() - started < 10.0
    assert result.returncode != 0 and "no server at 127.0.0.1:" in result.stderr, result.stderr
    assert "hauler poc start" in result.stderr and "Traceback" not in result.stderr


# ----- starting from a checkpoint: uploaded with the job, or a file of the server's ---------------


def pretrained(path, seed: int = 3) -> dict[str, np.ndarray]:
    """A checkpoint as PyTorch users save one (metadata, tensors in name order); values that
    stay exact when hello-numpy adds 0.125 to them."""
    rng = np.random.default_rng(seed)
    tensors = {
        "encoder.weight": (rng.integers(-64, 64, (300, 41)) / 8).astype(np.float32),
        "encoder.bias": (rng.integers(-64, 64, (41,)) / 8).astype(np.float32),
        "head.weight": (rng.integers(-64, 64, (41, 7)) / 8).astype(np.float64),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def without_model_section(job):
    config = tomllib.loads((job / "job.toml").read_text())
    del config["model"]
    (job / "job.toml").write_text(tomli_w.dumps(config))


def trained_from(tensors: dict[str, np.ndarray], rounds: int) -> dict[str, np.ndarray]:
    return {
        name: (array + array.dtype.type(0.125) * rounds).astype(array.dtype)
        for name, array in tensors.items()
    }


def downloaded(poc, job_id, folder) -> dict[str, np.ndarray]:
    ok(hauler("jobs", "download", job_id, "-o", folder, "--workspace", poc))
    return load_file(str(folder / "global.safetensors"))


def test_a_job_starts_from_a_checkpoint_uploaded_with_it(poc, tmp_path):
    job = hello_job(tmp_path, rounds=2, min_clients=2)
    without_model_section(job)
    tensors = pretrained(tmp_path / "checkpoint.safetensors")
    submitted = ok(
        hauler(
            "submit",
            job,
            "--initial-model",
            tmp_path / "checkpoint.safetensors",
            "--workspace",
            poc,
            "--wait",
        )
    )
    assert_models_equal(
        downloaded(poc, submitted_job_id(submitted.stdout), tmp_path / "out"),
        trained_from(tensors, 2),
    )


def test_a_job_starts_from_a_checkpoint_in_the_server_s_model_dirs(poc, tmp_path):
    tensors = pretrained(poc.parent / "models" / "pretrained.safetensors", seed=5)
    job = hello_job(tmp_path, rounds=2, min_clients=2)
    job_toml = job / "job.toml"
    config = tomllib.loads(job_toml.read_text())
    config["model"] = {"file": "pretrained.safetensors"}
    job_toml.write_text(tomli_w.dumps(config))
    submitted = ok(hauler("submit", job, "--workspace", poc, "--wait"))
    assert_models_equal(
        downloaded(poc, submitted_job_id(submitted.stdout), tmp_path / "out"),
        trained_from(tensors, 2),
    )
    assert (
        load_file(str(poc.parent / "models" / "pretrained.safetensors")).keys() == tensors.keys()
    )  # untouched


@pytest.mark.parametrize(
    "name", ["missing.safetensors", "../poc/server/server.key", "/etc/hostname"]
)
def test_a_file_outside_the_server_s_model_dirs_is_refused_at_submission(poc, tmp_path, name):
    job = hello_job(tmp_path)
    config = tomllib.loads((job / "job.toml").read_text())
    config["model"] = {"file": name}
    (job / "job.toml").write_text(tomli_w.dumps(config))
    jobs_before = server_jobs(poc)
    result = hauler("submit", job, "--workspace", poc)
    assert result.returncode == 1 and "is not a file in the server's model_dirs" in result.stderr, (
        result.stderr
    )
    assert server_jobs(poc) == jobs_before
