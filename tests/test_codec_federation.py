"""Codecs and server optimizers on real processes: the model lands where plain numpy says it
must; a round's delta is encoded once and downloaded by every site that holds the round before,
while a site that joins late gets the whole model; an encoded upload resumes across cut
connections to the same result; a server stopped mid-job resumes with its optimizer state."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import tomli_w
from helpers import EXAMPLE, FAST_RETRIES
from test_resilience import (
    SLOW_HELLO,
    _restart,
    _run_job,
    _sync_download,
    stopped_in_round_and_resumed,
)

from hauler.admin import poc
from hauler.aggregate import OptimizerSettings, make_optimizer
from hauler.core.events import read_json_lines

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

INCREMENT = 0.1
ARRAY_BYTES = 1 << 20


def job(folder: Path, *, rounds: int, optimizer: str, codec: str, slow: float = 0.0) -> Path:
    """hello-numpy with a codec both ways and a server optimizer (training `slow` s a round)."""
    path = folder / f"job-{optimizer}-{codec}"
    shutil.copytree(EXAMPLE, path, ignore=shutil.ignore_patterns("__pycache__"))
    config = {
        "name": "hello-numpy",
        "workflow": {
            "num_rounds": rounds,
            "min_clients": 2,
            "wait_time_after_min_received": 2,
            "optimizer": optimizer,
        },
        "transfer": {"upload": codec, "download": codec},
        "model": {"module": "model", "config": {"arrays": 3, "array_bytes": ARRAY_BYTES}},
        "executor": {"module": "train", "config": {"increment": INCREMENT, "steps": 10}},
    }
    (path / "job.toml").write_text(tomli_w.dumps(config))
    if slow:
        (path / "train.py").write_text(SLOW_HELLO.replace("time.sleep(0.5)", f"time.sleep({slow})"))
    return path


def moved(optimizer: str, rounds: int) -> float:
    """How far every value moves: each round's averaged update is INCREMENT everywhere, and the
    server optimizer's rule (plain numpy, one element) turns it into steps."""
    stepper = make_optimizer(OptimizerSettings(optimizer))
    state = {name: np.full(1, stepper.initial_state(name)) for name in stepper.state_names}
    step, total = np.zeros(1), 0.0
    for _ in range(rounds):
        stepper.step(np.full(1, INCREMENT), state, step)
        total += float(step[0])
    return total


def assert_moved(model: dict[str, np.ndarray], by: float, tolerance: float = 2e-3) -> None:
    for name, values in model.items():
        k = int(name.split("_")[1])
        expected = ((np.arange(values.size) % 1000 + k) / 1000).astype(np.float32) + np.float32(by)
        np.testing.assert_allclose(values, expected, atol=tolerance, err_msg=name)


def site_rows(workspace: Path, job_id: str) -> list[dict]:
    path = workspace / "server" / "jobs" / job_id / "metrics.jsonl"
    return [row for row in read_json_lines(path) if row["kind"] == "site"]


def test_a_delta_is_encoded_once_for_every_site_and_a_late_site_gets_the_whole_model(tmp_path):
    workspace = tmp_path / "poc"
    poc.prepare(workspace, 3, plaintext=True, dataplane=FAST_RETRIES)
    pids = poc.start(workspace)
    try:
        os.kill(pids["site-3"], signal.SIGTERM)  # site-3 joins later
        job_dir = job(tmp_path, rounds=5, optimizer="fedadam", codec="int8", slow=2.0)

        def join_late(event: dict) -> None:
            if event["event"] == "round.complete" and event["round"] == 0:
                config = workspace / "site-3" / "site.toml"
                _restart(workspace, "site-3", ["client", "--config", str(config)])

        job_id, final = asyncio.run(_run_job(workspace, job_dir, on_event=join_late))
        assert final == "job.finished"
        model = safetensors.numpy.load_file(_sync_download(workspace, job_id, tmp_path / "out"))
    finally:
        poc.stop(workspace)
    assert_moved(model, moved("fedadam", 5))
    rows = site_rows(workspace, job_id)
    downloads = {(r["round"], r["site"]): r["download"] for r in rows}
    late = sorted(round for round, site in downloads if site == "site-3")
    assert late and late[0] >= 1, late
    assert downloads[late[0], "site-3"]["codec"] == "none"  # it held no model: the whole of it
    for (round, site), download in downloads.items():
        whole = round == 0 or (site == "site-3" and round == late[0])
        assert download["codec"] == ("none" if whole else "int8"), (round, site)
        if not whole:  # int8 of float32: about a quarter, and digests checked on landing
            assert download["wire_bytes"] < 0.3 * download["bytes"]
    assert all(r["upload"]["codec"] == "int8" for r in rows)
    events = read_json_lines(workspace / "server" / "jobs" / job_id / "events.jsonl")
    encoded = [e["round"] for e in events if e["event"] == "round.encoded"]
    assert encoded == [1, 2, 3, 4, 5]  # once a round, however many sites downloaded it


def test_encoded_transfers_cut_and_corrupted_resume_to_the_same_model(faulty_federation, tmp_path):
    workspace, proxy = faulty_federation
    job_dir = job(tmp_path, rounds=3, optimizer="nesterov", codec="int4")
    traffic = 3 * 2 * 2 * 3 * ARRAY_BYTES // 6  # about what int4 puts on the wire, both ways
    chooser = random.Random(20261205)
    proxy.cuts = sorted(chooser.randrange(1 << 16, traffic) for _ in range(8))
    proxy.flips = sorted(chooser.randrange(1 << 16, traffic) for _ in range(2))
    disturbed, final = asyncio.run(_run_job(workspace, job_dir))
    assert final == "job.finished" and proxy.cuts_done >= 4
    rows = site_rows(workspace, disturbed)
    assert sum(r["upload"]["reconnects"] + r["download"]["reconnects"] for r in rows) > 0
    proxy.clear_faults()
    undisturbed, final = asyncio.run(_run_job(workspace, job_dir))
    assert final == "job.finished"
    assert all(
        r[d]["reconnects"] == 0
        for r in site_rows(workspace, undisturbed)
        for d in ("download", "upload")
    )
    first = _sync_download(workspace, disturbed, tmp_path / "a").read_bytes()
    again = _sync_download(workspace, undisturbed, tmp_path / "b").read_bytes()
    assert first == again  # resumed streams carry the same bytes, residuals and all
    assert_moved(
        safetensors.numpy.load_file(tmp_path / "a" / "global.safetensors"),
        moved("nesterov", 3),
        5e-3,
    )


def test_a_server_stopped_mid_job_resumes_with_its_optimizer_state(tmp_path):
    workspace = tmp_path / "poc"
    job_dir = job(tmp_path, rounds=4, optimizer="fedadam", codec="int8", slow=0.5)
    job_id, model = stopped_in_round_and_resumed(workspace, job_dir, 2, tmp_path / "out")
    events = read_json_lines(workspace / "server" / "jobs" / job_id / "events.jsonl")
    assert [e["event"] for e in events].count("job.started") == 2
    # fedadam's moments came back from round 2's state file; lost, the last two rounds would
    # have started them from zero again and moved the model by 2 x moved(2) instead
    assert_moved(model, moved("fedadam", 4))
    restarted_as_new = 2 * moved("fedadam", 2)
    assert abs(moved("fedadam", 4) - restarted_as_new) > 0.01  # the test can tell them apart
