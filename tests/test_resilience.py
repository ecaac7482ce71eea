"""Faults that long transfers meet, on real processes: a proxy that cuts and corrupts the
data plane, a site frozen with SIGSTOP, a server killed with SIGKILL and restarted."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import tomli_w
from faultproxy import FaultProxy
from helpers import (
    EXAMPLE,
    FAST_RETRIES,
    assert_models_equal,
    hello_expected,
    hello_job,
    route_sites_through,
    server_data_port,
)

from hauler.admin import Admin, poc
from hauler.core.events import read_json_lines
from hauler.model.rounds import RoundStore

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them


def _job(
    folder: Path,
    *,
    rounds: int,
    min_clients: int,
    array_bytes: int = 2 * 2**20 + 4,
    wait_after_min_s: float = 1,
) -> Path:
    job = folder / "job"
    shutil.copytree(EXAMPLE, job, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    config = {
        "name": "hello-numpy",
        "workflow": {
            "num_rounds": rounds,
            "min_clients": min_clients,
            "wait_time_after_min_received": wait_after_min_s,
        },
        "model": {"module": "model", "config": {"arrays": 4, "array_bytes": array_bytes}},
        "executor": {"module": "train", "config": {"increment": 0.1, "steps": 10}},
    }
    (job / "job.toml").write_text(tomli_w.dumps(config))
    return job


async def _run_job(workspace: Path, job: Path, on_event=None) -> tuple[str, str]:
    """Submit, follow the events; returns the job id and its final event."""
    async with Admin(poc.admin_config(workspace)) as admin:
        job_id = await admin.submit(job)
        final = ""
        async for event in admin.watch(job_id):
            final = event["event"]
            if on_event is not None:
                on_event(event)
        return job_id, final


async def _download(workspace: Path, job_id: str, out: Path) -> bytes:
    async with Admin(poc.admin_config(workspace)) as admin:
        path, _ = await admin.download(job_id, out)
    return path.read_bytes()


def test_twenty_cuts_and_bit_flips_leave_the_model_bit_identical(faulty_federation, tmp_path):
    workspace, proxy = faulty_federation
    job = _job(tmp_path, rounds=2, min_clients=2)
    traffic = 2 * 2 * 2 * 4 * (2 * 2**20 + 4)  # rounds x sites x directions x model bytes
    chooser = random.Random(20261124)
    proxy.cuts = sorted(chooser.randrange(2**20, traffic - 2**20) for _ in range(20))
    proxy.flips = sorted(chooser.randrange(2**20, traffic - 2**20) for _ in range(3))
    disturbed, final = asyncio.run(_run_job(workspace, job))
    assert final == "job.finished"
    assert proxy.cuts_done >= 15 and proxy.flips_done >= 1
    rows = [
        row
        for row in read_json_lines(workspace / "server" / "jobs" / disturbed / "metrics.jsonl")
        if row["kind"] == "site"
    ]
    reconnects = sum(row[d]["reconnects"] for row in rows for d in ("download", "upload"))
    resent = sum(row[d]["bytes_resent"] for row in rows for d in ("download", "upload"))
    assert reconnects >= proxy.cuts_done and resent > 0

    proxy.clear_faults()
    undisturbed, final = asyncio.run(_run_job(workspace, job))
    assert final == "job.finished"
    calm = [
        row
        for row in read_json_lines(workspace / "server" / "jobs" / undisturbed / "metrics.jsonl")
        if row["kind"] == "site"
    ]
    assert all(
        row[d]["reconnects"] == 0 and row[d]["bytes_resent"] == 0 and row[d]["lanes"] > 1
        for row in calm
        for d in ("download", "upload")
    ), calm
    assert asyncio.run(_download(workspace, disturbed, tmp_path / "a")) == asyncio.run(
        _download(workspace, undisturbed, tmp_path / "b")
    )


def test_a_stopped_site_times_out_by_silence_and_the_job_goes_on(tmp_path):
    workspace = tmp_path / "poc"
    poc.prepare(
        workspace,
        2,
        plaintext=True,
        dataplane=FAST_RETRIES,
        timeouts={
            "communication_timeout": 4.0,
            "streaming_read_timeout": 30.0,
            "streaming_ack_wait": 2.0,
        },
    )
    with FaultProxy(
        server_data_port(workspace), rate_bytes_per_s=1e6
    ) as proxy:  # a download takes seconds
        route_sites_through(workspace, proxy.port)
        pids = poc.start(workspace)
        stopped = []

        def stop_site_2_mid_download(event: dict) -> None:
            if (
                not stopped
                and event["event"] == "transfer.progress"
                and event["site"] == "site-2"
                and event["direction"] == "download"
                and event["bytes"] < event["total"]
            ):
                os.kill(pids["site-2"], signal.SIGSTOP)
                stopped.append(time.monotonic())

        try:
            # The round waits for site-2 longer than communication_timeout: only silence can end it.
            job = _job(
                tmp_path, rounds=1, min_clients=1, array_bytes=4 * 2**20, wait_after_min_s=60
            )
            job_id, final = asyncio.run(_run_job(workspace, job, stop_site_2_mid_download))
        finally:
            os.kill(pids["site-2"], signal.SIGCONT)
            poc.stop(workspace)
    assert stopped and final == "job.finished"
    events = read_json_lines(workspace / "server" / "jobs" / job_id / "events.jsonl")
    failed = [e for e in events if e["event"] == "site.failed"]
    assert [e["site"] for e in failed] == ["site-2"]
    assert (
        "communication_timeout" in failed[0]["error"] and "streaming_ack_wait" in failed[0]["error"]
    )
    assert [e["site"] for e in events if e["event"] == "site.result"] == ["site-1"]


TEARS = {
    "none": None,
    "newest_round_manifest_half_written": "manifest",
}  # every kind: test_rounds.py


@pytest.mark.parametrize("tear", TEARS.values(), ids=TEARS.keys())
def test_a_server_killed_mid_job_resumes_it_after_a_restart(tmp_path, tear):
    workspace = tmp_path / "poc"
    poc.prepare(workspace, 2, dataplane=FAST_RETRIES)
    with FaultProxy(server_data_port(workspace), rate_bytes_per_s=20e6) as proxy:
        route_sites_through(workspace, proxy.port)
        pids = poc.start(workspace)
        try:
            job_id = asyncio.run(
                _kill_server_in_round(workspace, _job(tmp_path, rounds=3, min_clients=2), 1, pids)
            )
            torn = _tear_newest_round(workspace / "server" / "jobs" / job_id, tear)
            _restart_server(workspace)
            record = asyncio.run(_wait_until_ended(workspace, job_id))
            assert record["status"] == "finished", record
            model = safetensors.numpy.load_file(_sync_download(workspace, job_id, tmp_path / "out"))
        finally:
            poc.stop(workspace)
    for name, values in model.items():
        k = int(name.split("_")[1])
        expected = ((np.arange(values.size) % 1000 + k) / 1000).astype(np.float32) + np.float32(0.3)
        np.testing.assert_allclose(values, expected, atol=1e-5)
    events = read_json_lines(workspace / "server" / "jobs" / job_id / "events.jsonl")
    assert [e["round"] for e in events if e["event"] == "round.complete"][-2:] == [1, 2]
    skipped = {e["round"]: e["reason"] for e in events if e["event"] == "round.skipped"}
    assert (torn in skipped) == (tear is not None), skipped  # a torn round is said, and run again


def _tear_newest_round(job_dir: Path, tear: str | None) -> int | None:
    """Damage the newest committed round as a crash or a full disk can; returns its number."""
    if tear is None:
        return None
    rounds = RoundStore(job_dir, keep_rounds=2)
    newest = rounds.latest()
    assert newest is not None and newest >= 1
    target = rounds.path(newest) if tear == "file" else rounds.manifest_path(newest)
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    return newest


async def _kill_server_in_round(
    workspace: Path, job: Path, round: int, pids: dict[str, int]
) -> str:
    async with Admin(poc.admin_config(workspace)) as admin:
        job_id = await admin.submit(job)
        try:
            async for event in admin.watch(job_id):
                if event["event"] == "transfer.progress" and event["round"] == round:
                    os.kill(pids["server"], signal.SIGKILL)
                    break
        except Exception:
            pass
    return job_id


def _restart_server(workspace: Path) -> None:
    _restart(workspace, "server", ["server", "--config", str(workspace / "server" / "server.toml")])


async def _wait_until_ended(workspace: Path, job_id: str, limit_s: float = 90.0) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            async with Admin(poc.admin_config(workspace)) as admin:
                record = (await admin.status(job_id))["job"]
                if record["status"] in ("finished", "failed", "aborted"):
                    return record
        except Exception:
            pass
        await asyncio.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {limit_s} s")


def _sync_download(workspace: Path, job_id: str, out: Path) -> Path:
    async def fetch() -> Path:
        async with Admin(poc.admin_config(workspace)) as admin:
            return (await admin.download(job_id, out))[0]

    return asyncio.run(fetch())


def test_a_site_killed_mid_download_and_back_within_a_second_is_given_its_task_again(tmp_path):
    workspace = tmp_path / "poc"
    poc.prepare(workspace, 2, plaintext=True, dataplane=FAST_RETRIES)
    with FaultProxy(server_data_port(workspace), rate_bytes_per_s=2e6) as proxy:
        route_sites_through(workspace, proxy.port)
        pids = poc.start(workspace)
        killed = []

        def kill_and_restart_site_2(event: dict) -> None:
            if (
                not killed
                and event["event"] == "transfer.progress"
                and event["site"] == "site-2"
                and event["round"] == 0
                and 0 < event["bytes"] < event["total"]
            ):
                os.kill(pids["site-2"], signal.SIGKILL)
                killed.append(
                    _restart(
                        workspace,
                        "site-2",
                        ["client", "--config", str(workspace / "site-2" / "site.toml")],
                    )
                )

        try:
            job = _job(
                tmp_path, rounds=2, min_clients=2, wait_after_min_s=2, array_bytes=512 * 1024 + 4
            )
            job_id, final = asyncio.run(_run_job(workspace, job, kill_and_restart_site_2))
            model = safetensors.numpy.load_file(_sync_download(workspace, job_id, tmp_path / "out"))
        finally:
            poc.stop(workspace)
    assert killed and final == "job.finished"
    events = read_json_lines(workspace / "server" / "jobs" / job_id / "events.jsonl")
    assert not [e for e in events if e["event"] == "site.failed"]
    assert [(e["round"], e["site"]) for e in events if e["event"] == "site.restarted"] == [
        (0, "site-2")
    ]
    assert sorted((e["round"], e["site"]) for e in events if e["event"] == "site.result") == [
        (0, "site-1"),
        (0, "site-2"),
        (1, "site-1"),
        (1, "site-2"),
    ]
    assert_hello_numpy(model, rounds=2)


def test_a_site_whose_control_stream_drops_keeps_its_task_and_its_transfers_go_on(tmp_path):
    workspace = tmp_path / "poc"
    poc.prepare(workspace, 2, plaintext=True, dataplane=FAST_RETRIES)
    with (
        FaultProxy(server_data_port(workspace), rate_bytes_per_s=2e6) as data,
        FaultProxy(_server_control_port(workspace)) as control,
    ):
        route_sites_through(workspace, data.port)
        _route_control_of(workspace / "site-2", control.port)
        poc.start(workspace)
        dropped = []

        def drop_site_2_s_control_stream(event: dict) -> None:
            if (
                not dropped
                and event["event"] == "transfer.progress"
                and event["site"] == "site-2"
                and event["round"] == 0
                and 0 < event["bytes"] < event["total"]
            ):
                control.cut_all()
                dropped.append(event["bytes"])

        try:
            job = _job(
                tmp_path, rounds=2, min_clients=2, wait_after_min_s=2, array_bytes=512 * 1024 + 4
            )
            job_id, final = asyncio.run(_run_job(workspace, job, drop_site_2_s_control_stream))
            model = safetensors.numpy.load_file(_sync_download(workspace, job_id, tmp_path / "out"))
        finally:
            poc.stop(workspace)
    assert dropped and final == "job.finished"
    events = read_json_lines(workspace / "server" / "jobs" / job_id / "events.jsonl")
    assert not [e for e in events if e["event"] in ("site.failed", "site.restarted")], events
    rows = [
        row
        for row in read_json_lines(workspace / "server" / "jobs" / job_id / "metrics.jsonl")
        if row["kind"] == "site" and row["site"] == "site-2" and row["round"] == 0
    ]
    assert (
        rows[0]["download"]["reconnects"] == 0
    )  # the download went on while the control stream was down
    assert_hello_numpy(model, rounds=2)


def assert_hello_numpy(model: dict[str, np.ndarray], *, rounds: int) -> None:
    for name, values in model.items():
        k = int(name.split("_")[1])
        expected = ((np.arange(values.size) % 1000 + k) / 1000).astype(np.float32) + np.float32(
            0.1 * rounds
        )
        np.testing.assert_allclose(values, expected, atol=1e-5)


def _server_control_port(workspace: Path) -> int:
    return tomllib.loads((workspace / "server" / "server.toml").read_text())["control_port"]


def _route_control_of(site: Path, port: int) -> None:
    config = site / "site.toml"
    config.write_text(tomli_w.dumps({**tomllib.loads(config.read_text()), "control_port": port}))


def _restart(workspace: Path, role: str, arguments: list[str]) -> int:
    """Start `hauler ARGUMENTS` again as `role`, recording its PID so `poc stop` stops it."""
    with open(workspace / "run" / f"{role}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hauler", *arguments],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (workspace / "run" / f"{role}.pid").write_text(str(process.pid))
    return process.pid


def test_poc_stop_mid_job_then_start_resumes_it_to_the_exact_result(tmp_path):
    """`poc stop` stops the server first, so the job is still running in its store (not failed by
    sites leaving), and the next `poc start` carries it on to the same model."""
    workspace = tmp_path / "poc"
    job = hello_job(tmp_path, rounds=4, arrays=2, array_bytes=400_004)
    (job / "train.py").write_text(SLOW_HELLO)
    job_id, model = stopped_in_round_and_resumed(workspace, job, 1, tmp_path / "out")
    assert_models_equal(model, hello_expected(job, 4))
    events = read_json_lines(workspace / "server" / "jobs" / job_id / "events.jsonl")
    assert not any(e["event"] == "job.failed" for e in events)
    assert [e["event"] for e in events].count(
        "job.started"
    ) == 2  # it was running when stopped, and went on


SLOW_HELLO = '''"""hello-numpy's training, half a second a round: time to stop the federation
mid-job."""

import time

from hauler.client import TrainContext, TrainOutput


def train(model, context: TrainContext) -> TrainOutput:
    time.sleep(0.5)
    for array in model.values():
        array += context.config.get("increment", 0.125)
    return TrainOutput(weight=float(context.config.get("steps", 8)))
'''


def stopped_in_round_and_resumed(
    workspace: Path, job: Path, round: int, out: Path
) -> tuple[str, dict[str, np.ndarray]]:
    """A plaintext POC of two sites runs `job`, is stopped (`poc stop`) once it is in `round`,
    started again, and carries the job on to its end; returns its id and its final model."""
    poc.prepare(workspace, 2, plaintext=True, dataplane=FAST_RETRIES)
    poc.start(workspace)
    try:
        job_id = asyncio.run(_stop_in_round(workspace, job, round))
        poc.start(workspace)
        record = asyncio.run(_wait_until_ended(workspace, job_id))
        assert record["status"] == "finished", record
        return job_id, safetensors.numpy.load_file(_sync_download(workspace, job_id, out))
    finally:
        poc.stop(workspace)


async def _stop_in_round(workspace: Path, job: Path, round: int) -> str:
    async with Admin(poc.admin_config(workspace)) as admin:
        job_id = await admin.submit(job)
        async for event in admin.watch(job_id):
            if event["event"] == "round.complete" and event["round"] == round - 1:
                break
    await asyncio.to_thread(poc.stop, workspace)
    return job_id
