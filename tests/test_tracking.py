"""Experiment tracking to MLflow: a job's metrics records, sent as they are written, read back
through MLflow's own client, from a real tracking server (`mlflow server` on loopback, one per
module) for a simulated job and a real federation, and from the embedded store in a job's
folder; the server's allow-list of tracking URIs; a tracking server that is not there."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from helpers import (
    edit_configs,
    federation,
    hauler,
    hello_job,
    ok,
    read_jsonl,
    submitted_job_id,
    wait_until,
)

import hauler as api
from hauler.core.config import JobConfig, ServerConfig, ServerTracking, TrackingConfig, parse
from hauler.core.errors import ConfigError
from hauler.core.events import EventBus
from hauler.core.package import pack
from hauler.core.tracking import Points, Run, open_metrics, sent, tracking_target
from hauler.model import Manifest
from hauler.server.access import AccessPolicy
from hauler.server.jobstore import JobStore
from hauler.server.runner import JobRunner
from hauler.server.sites import SiteRegistry
from hauler.server.transfers import TransferRegistry

# MLflow 3.17's SQLite store uses a loader strategy SQLAlchemy 2.1 deprecates; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
SITES, ROUNDS = 2, 2
# The tracking server: no background job runner, no telemetry; both only cost this test time.
MLFLOW_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
TRAIN = '''"""hello-numpy's training, reporting a loss that falls round after round and a metric
whose name MLflow refuses as it is; it takes `sleep_s`, so its processes are sampled. It
validates the global model it receives, too."""

import time

from hauler.client import TrainContext, TrainOutput


def train(model, context: TrainContext) -> TrainOutput:
    time.sleep(context.config["sleep_s"])
    for array in model.values():
        array += 0.125
    metrics = {"loss": 1.0 / (context.round + 1), "top-1 %": 0.5 + context.round / 10}
    return TrainOutput(weight=8.0, metrics=metrics)


def evaluate(model, context: TrainContext) -> dict[str, float]:
    return {"accuracy": 0.25 * (context.round + 1)}  # of the global model received
'''
# A site record's metrics in MLflow, and where each is in the record.
SITE_METRICS = {
    "train/loss": lambda r: r["metrics"]["loss"],
    "train/top-1 _": lambda r: r["metrics"]["top-1 %"],
    "validation/accuracy": lambda r: r["validation"]["accuracy"],
    "weight": lambda r: r["weight"],
    "train_s": lambda r: r["train_s"],
    "download/wire_bytes": lambda r: r["download"]["wire_bytes"],
    "upload/bytes": lambda r: r["upload"]["bytes"],
    "upload/mb_per_s": lambda r: r["upload"]["mb_per_s"],
}


def mlflow_client(uri: str) -> Any:
    """MLflow's own client of `uri` (imported here: it takes seconds, which only the tests that
    read MLflow pay)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server on a free loopback port, SQLite in a temporary folder;
    yields its URI, and stops it by its PID."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port]
    command += ["--workers", 1, "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--default-artifact-root", (folder / "artifacts").as_uri()]
    with (folder / "server.log").open("w") as log:
        process = subprocess.Popen(
            list(map(str, command)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **MLFLOW_ENV},
            start_new_session=True,  # its workers in a process group of its own PID
        )
        try:
            uri = f"http://127.0.0.1:{port}"
            wait_until(lambda: process.poll() is not None or answers(uri), timeout_s=150)
            assert process.poll() is None, (folder / "server.log").read_text()
            yield uri
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's PID (it stops its workers), then SIGKILL to whatever is left of
    its process group, whose id is that same PID."""
    process.terminate()
    try:
        process.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tracked_job(folder: Path, tracking: dict[str, Any], sleep_s: float = 0.0) -> Path:
    """A small hello-numpy job with TRAIN and the given [tracking] table."""
    job_dir = hello_job(folder, rounds=ROUNDS, arrays=2, array_bytes=40_004, name="tracked-hello")
    (job_dir / "train.py").write_text(TRAIN)
    config = tomllib.loads((job_dir / "job.toml").read_text())
    config["executor"]["config"]["sleep_s"] = sleep_s
    (job_dir / "job.toml").write_text(tomli_w.dumps({**config, "tracking": tracking}))
    return job_dir


def runs_of(client: Any, job_id: str) -> dict[str, Any]:
    """The job's MLflow runs by process (the job's own run under the process that ran it)."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`hauler.job_id` = '{job_id}'")
    return {run.data.tags["hauler.process"]: run for run in runs}


def history(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def samples(client: Any, run: Any, key: str) -> list[float]:
    """A resource metric's values in the order taken (its steps are the sample numbers)."""
    points = history(client, run, key)
    assert [step for step, _ in points] == list(range(len(points)))
    return [value for _, value in points]


def assert_tracked(
    client: Any, job_id: str, records: list[dict[str, Any]], own: str
) -> dict[str, Any]:
    """The job's metrics records are in MLflow: a run per site nested under the job's, each
    value equal to the record's, step = round; the samples of `own` (the process that ran the
    job) and the rounds in the job's run. Returns the runs by process."""
    runs = runs_of(client, job_id)
    sites = sorted({r["site"] for r in records if r["kind"] == "site"})
    assert sorted(runs) == sorted([own, *sites])
    parent = runs.pop(own)
    assert parent.info.run_name == "tracked-hello" and parent.info.status == "FINISHED"
    for site, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == site and run.info.status == "FINISHED"
        mine = [r for r in records if r.get("site") == site and r["kind"] == "site"]
        assert [r["round"] for r in mine] == list(range(ROUNDS))
        for key, value in SITE_METRICS.items():
            assert history(client, run, key) == [(r["round"], value(r)) for r in mine], key
    rounds = [r for r in records if r["kind"] == "round"]
    assert history(client, parent, "round/round_s") == [(r["round"], r["round_s"]) for r in rounds]
    assert samples(client, parent, "resources/rss_anon_bytes") == [
        r["rss_anon_bytes"] for r in records if r.get("process") == own
    ]
    return runs


# ----- configuration and the server's allow-list -------------------------------------------------


def test_an_empty_tracking_table_tracks_into_the_jobs_folder_and_unknown_keys_are_errors(tmp_path):
    job = {"name": "j", "executor": {"module": "train"}}
    tracking = parse(JobConfig, {**job, "tracking": {}}, "job.toml").tracking
    target = tracking_target(tracking, tmp_path / "jobs" / "abc")
    assert target.uri == f"sqlite:///{tmp_path / 'jobs' / 'abc' / 'mlflow' / 'mlflow.db'}"
    assert tracking_target(None, tmp_path) is None  # no table, no server default: not tracked
    with pytest.raises(ConfigError, match="job.toml: tracking.uri: unknown key"):
        parse(JobConfig, {**job, "tracking": {"uri": "http://x"}}, "job.toml")


def test_a_server_sends_only_where_its_allow_list_says(tmp_path):
    allowed = ServerTracking(mlflow="http://default:5000", allowed_mlflow_uris=["http://ok:5000"])
    for uri in ["http://ok:5000", "http://default:5000"]:
        target = tracking_target(
            TrackingConfig(mlflow=uri), tmp_path, default=allowed.mlflow, allowed=["http://ok:5000"]
        )
        assert target.uri == uri and target.folder is None
    assert tracking_target(None, tmp_path, default="http://default:5000", allowed=[]).uri == (
        "http://default:5000"
    )
    for uri in ["http://ok:5000/", "file:///etc", "sqlite:////srv/other.db"]:
        with pytest.raises(ConfigError, match=f"'{uri}' is not .* allowed_mlflow_uris"):
            tracking_target(TrackingConfig(mlflow=uri), tmp_path, allowed=["http://ok:5000"])
    with pytest.raises(ConfigError, match=r"'http://user:\*\*\*@evil:5000'") as refused:
        tracking = TrackingConfig(mlflow="http://user:secret@evil:5000")
        tracking_target(tracking, tmp_path, allowed=["http://ok:5000"])
    assert "secret" not in str(refused.value)  # a URI's password is never repeated


async def test_a_job_tracked_where_the_server_does_not_allow_is_refused_at_submission(tmp_path):
    tracking = ServerTracking(allowed_mlflow_uris=["http://127.0.0.1:5000"])
    config = ServerConfig(workspace=tmp_path / "server", tracking=tracking)
    initial = Manifest.build([("w", "F32", (8,))], 4 << 20).with_digests(["0123456789abcdef"])
    store = JobStore(tmp_path / "server" / "jobs.sqlite")
    transfers = TransferRegistry(config.dataplane, config.timeouts, AccessPolicy([]))
    runner = JobRunner(config, store, SiteRegistry(), transfers)
    try:
        refused = tracked_job(tmp_path / "a", {"mlflow": "http://10.0.0.1:5000"})
        with pytest.raises(ConfigError, match=r"'http://10.0.0.1:5000'.*allowed_mlflow_uris"):
            await runner.submit(pack(refused, 1 << 20), ("admin", "org"), initial)
        assert runner.store.list() == [] and list(runner.jobs_dir.iterdir()) == []
        for tracking in [{"mlflow": "http://127.0.0.1:5000"}, {}]:  # allowed, and the local store
            job_dir = tracked_job(tmp_path / str(len(tracking)), tracking)
            await runner.submit(pack(job_dir, 1 << 20), ("admin", "org"), initial)
        assert len(runner.store.list()) == 2
    finally:
        store.close()


def test_metric_names_are_made_acceptable_to_mlflow_and_resources_counted_per_process():
    points = Points("server")
    site = {"kind": "site", "round": 3, "site": "site-1", "started_s": 2.5, "weight": 8, "ok": True}
    site["metrics"] = {"top-1 %": 0.5, "..": 1.0, "a/b": 2.0, "": 3.0}
    assert {(p.run, p.key, p.value, p.step, p.timestamp_ms) for p in points.of(site)} == {
        ("site-1", "weight", 8.0, 3, 2500),
        ("site-1", "train/top-1 _", 0.5, 3, 2500),
        ("site-1", "train/_", 1.0, 3, 2500),
        ("site-1", "train/a_b", 2.0, 3, 2500),
        ("site-1", "train/_", 3.0, 3, 2500),
    }
    sample = {
        "kind": "resources",
        "t": 1.0,
        "cpu_percent": 5.0,
        "rss_bytes": 2,
        "rss_anon_bytes": 1,
    }
    evaluation = {"kind": "evaluation", "site": "site-1", "model": "site-2", "started_s": 4.0}
    evaluation |= {"evaluate_s": 0.5, "metrics": {"accuracy": 0.75}}
    assert {(p.run, p.key, p.value, p.step) for p in points.of(evaluation)} == {
        ("site-1", "evaluation/site-2/evaluate_s", 0.5, 0),
        ("site-1", "evaluation/site-2/metrics/accuracy", 0.75, 0),
    }
    steps = [
        (p.run, p.step)
        for record in [{**sample, "process": "server"}, {**sample, "process": "site-1"}] * 2
        for p in points.of(record)
        if p.key == "resources/cpu_percent"
    ]
    assert steps == [(None, 0), ("site-1", 0), (None, 1), ("site-1", 1)]  # evaluations not counted


# ----- real jobs, read back through MLflow's client --------------------------------------------


@pytest.mark.slow
def test_a_simulated_job_is_tracked_on_a_real_mlflow_server(mlflow_server, tmp_path):
    job_dir = tracked_job(tmp_path, {"mlflow": mlflow_server, "experiment": "hauler-tests"})
    job = api.simulate(job_dir, sites=SITES, workers=1, workspace=tmp_path / "sim")
    client = mlflow_client(mlflow_server)
    runs = assert_tracked(client, job.id, job.metrics(), own="simulator")
    experiment = client.get_experiment(runs["site-1"].info.experiment_id)
    assert experiment.name == "hauler-tests"
    started = [e for e in job.events() if e["event"].startswith("tracking.")]
    assert [e["event"] for e in started] == ["tracking.started"]
    assert (started[0]["uri"], started[0]["experiment"]) == (mlflow_server, "hauler-tests")


@pytest.mark.slow
async def test_a_job_resumed_after_a_restart_goes_on_in_the_runs_it_had(tmp_path):
    """A server stopped mid-job and started again tracks the job into the same runs (found by
    their tags), the site's second round beside its first, and ends them when the job ends."""
    job = JobConfig.model_validate({"name": "tracked-hello", "executor": {"module": "train"}})
    target = tracking_target(TrackingConfig(), tmp_path / "job")
    run = Run.of(job, "0123456789ab", "server")
    for round, ending in ((0, None), (1, "job.finished")):  # a start, a stop, a restart
        bus = EventBus()
        metrics = open_metrics(tmp_path / "metrics.jsonl", bus, target, run)
        metrics.write({"kind": "site", "site": "site-1", "round": round, "weight": 2.0 + round})
        if ending:
            bus.emit(ending)
        metrics.close()
        await sent(metrics)
    client = mlflow_client(target.uri)
    every = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`hauler.job_id` != ''"
    )
    assert len(every) == 2  # the job's and the site's, made once
    runs = runs_of(client, run.job_id)
    assert sorted(runs) == ["server", "site-1"]
    assert history(client, runs["site-1"], "weight") == [(0, 2.0), (1, 3.0)]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}


@pytest.mark.slow
def test_the_embedded_default_is_a_store_in_the_jobs_own_folder(tmp_path):
    job = api.simulate(tracked_job(tmp_path, {}), sites=SITES, workers=1, workspace=tmp_path)
    store = job.folder.folder / "mlflow"
    client = mlflow_client(f"sqlite:///{store / 'mlflow.db'}")
    runs = assert_tracked(client, job.id, job.metrics(), "simulator")
    experiment = client.get_experiment(runs["site-1"].info.experiment_id)
    assert experiment.name == "tracked-hello"  # the job's name, when [tracking] names none
    assert experiment.artifact_location == (store / "artifacts").as_uri()


@pytest.mark.slow
def test_a_tracking_server_that_is_not_there_is_said_once_and_the_job_goes_on(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not retried
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    job = api.simulate(
        tracked_job(tmp_path, {"mlflow": uri}), sites=SITES, workers=1, workspace=tmp_path / "sim"
    )
    assert job.record()["status"] == "finished" and job.record()["rounds_done"] == ROUNDS
    failed = [e for e in job.events() if e["event"].startswith("tracking.")]
    assert [(e["event"], e["uri"]) for e in failed] == [("tracking.failed", uri)]
    assert "Connection refused" in failed[0]["error"]
    assert len([r for r in job.metrics() if r["kind"] == "site"]) == SITES * ROUNDS


@pytest.mark.slow
def test_a_real_federation_tracks_to_an_allowed_server_and_refuses_others(mlflow_server, tmp_path):
    def configure(workspace: Path) -> None:  # site samples reach the server every second
        edit_configs(workspace, "timeouts", {"heartbeat_interval": 1.0})
        edit_configs(
            workspace, "tracking", {"allowed_mlflow_uris": [mlflow_server]}, roles="server"
        )

    workspace = tmp_path / "poc"
    with federation(workspace, sites=SITES, configure=configure):
        other = f"http://127.0.0.1:{free_port()}"
        refused = hauler(
            "submit", tracked_job(tmp_path / "a", {"mlflow": other}), "--workspace", workspace
        )
        assert refused.returncode != 0 and "allowed_mlflow_uris" in refused.stderr + refused.stdout
        assert other in refused.stderr + refused.stdout
        job_dir = tracked_job(tmp_path / "b", {"mlflow": mlflow_server}, sleep_s=1.0)
        job_id = submitted_job_id(
            ok(hauler("submit", job_dir, "--workspace", workspace, "--wait")).stdout
        )
        client = mlflow_client(mlflow_server)

        def ended() -> bool:  # once the server has taken the sites' last samples
            runs = runs_of(client, job_id)
            return "server" in runs and runs["server"].info.status == "FINISHED"

        wait_until(ended, timeout_s=60, what="the job's run ended")
        records = read_jsonl(workspace / "server" / "jobs" / job_id / "metrics.jsonl")
    runs = assert_tracked(client, job_id, records, own="server")
    for site, run in runs.items():
        taken = [r["rss_anon_bytes"] for r in records if r.get("process") == site]
        assert len(taken) >= 1 and samples(client, run, "resources/rss_anon_bytes") == taken
