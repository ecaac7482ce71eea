"""Live progress of a site's transfers: bars with bytes, speed and ETA in a terminal, nothing
in a log file. The site under test runs as a real process on a pseudo-terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from helpers import REPO, hauler, hello_job, ok, submitted_job_id
from rich.console import Console

from hauler.admin.progress import KEPT_BARS, TransferBars

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them


def test_bars_advance_by_the_bytes_given_and_old_finished_bars_go():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with TransferBars(console) as bars:
        advances = [bars.track(f"transfer {k}", 100) for k in range(KEPT_BARS + 3)]
        for advance in advances:
            advance(60)
            advance(40)
        live = bars.track("live", 1000)
        live(250)
        tasks = {task.description: task for task in bars.progress.tasks}
    assert tasks["live"].completed == 250 and not tasks["live"].finished
    assert (
        sum(task.finished for task in tasks.values()) == KEPT_BARS
    )  # the oldest finished ones were dropped
    assert f"transfer {KEPT_BARS + 2}" in tasks and "transfer 0" not in tasks


def read_until(master: int, process: subprocess.Popen, done, timeout_s: float) -> str:
    """Everything the terminal shows until `done(text)` or the timeout."""
    text, deadline = "", time.monotonic() + timeout_s
    while time.monotonic() < deadline and not done(text) and process.poll() is None:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            text += os.read(master, 65536).decode(errors="replace")
    return text


def test_site_console_shows_its_transfers_on_a_terminal_only(tmp_path):
    workspace = tmp_path / "poc"
    ok(hauler("poc", "prepare", "--workspace", workspace, "--sites", 1))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hauler",
            "server",
            "--config",
            workspace / "server" / "server.toml",
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    master, slave = pty.openpty()
    site = subprocess.Popen(
        [sys.executable, "-m", "hauler", "client", "--config", workspace / "site-1" / "site.toml"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": "160"},
    )
    os.close(slave)
    try:
        # 12 MB: three 4 MiB chunks, so each bar moves more than once and shows a speed
        job = hello_job(tmp_path, rounds=2, min_clients=1, arrays=2, array_bytes=6_000_000)
        submitted = hauler("submit", job, "--workspace", workspace, "--wait")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job_id = submitted_job_id(submitted.stdout)
        shown = read_until(master, site, lambda text: text.count("upload") >= 2, timeout_s=20)
        for what in (
            f"job {job_id} round 0 download",
            f"job {job_id} round 1 download",
            f"job {job_id} upload",
        ):
            assert what in shown, shown[-2000:]
        assert "12.0 MB" in shown and "/s" in shown  # bytes of the 12 MB model, and a speed
    finally:
        for process in (site, server):
            process.terminate()
            process.wait(timeout=30)
        os.close(master)


def test_site_logging_to_a_file_draws_no_bars(tmp_path):
    workspace = tmp_path / "poc"
    ok(hauler("poc", "prepare", "--workspace", workspace, "--sites", 1))
    ok(hauler("poc", "start", "--workspace", workspace, "--wait-s", 60))
    try:
        job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=2, array_bytes=2_000_000)
        ok(hauler("submit", job, "--workspace", workspace, "--wait"))
    finally:
        ok(hauler("poc", "stop", "--workspace", workspace))
    log = (workspace / "run" / "site-1.log").read_text()
    assert "download" not in log and "━" not in log, log[-2000:]
