"""The Python API on a real POC federation (a server and two site processes on loopback):
submit, wait, events, status, metrics, logs, download, sites, delete and abort."""

from __future__ import annotations

import pytest
from helpers import assert_models_equal, federation, hello_expected, hello_job, wait_until
from safetensors.numpy import load_file

import hauler
from hauler.core.errors import JobError

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("api") / "poc"
    with federation(workspace, sites=2):
        yield workspace


def test_a_job_submitted_waited_for_downloaded_and_deleted_from_python(poc, tmp_path):
    job_dir = hello_job(tmp_path, rounds=2, arrays=2, array_bytes=200_004)
    with hauler.connect(workspace=poc) as session:
        assert sorted(site["name"] for site in session.sites()) == ["site-1", "site-2"]
        job = session.submit(job_dir)
        record = job.wait()
        assert record["status"] == "finished" and record["rounds_done"] == 2
        names = [event["event"] for event in job.events()]
        assert names[-1] == "job.finished" and names.count("site.result") == 4
        assert {r["kind"] for r in job.status()["metrics"]} >= {"site", "round"}
        lines = wait_until(
            lambda: [line for line in job.logs() if line["process"] != "server"],
            timeout_s=20,
            what="the sites' log lines, sent with their heartbeats",
        )
        assert {line["process"] for line in lines} <= {"site-1", "site-2"} and all(
            line["message"] for line in lines
        )
        assert_models_equal(load_file(job.download(tmp_path / "out")), hello_expected(job_dir, 2))
        assert job.id in [listed["id"] for listed in session.jobs()]
        job.delete()
        assert job.id not in [listed["id"] for listed in session.jobs()]
        with pytest.raises(JobError):
            session.job(job.id)


def test_a_job_waiting_for_sites_says_so_and_is_aborted_from_python(poc, tmp_path):
    job_dir = hello_job(tmp_path, rounds=1, min_clients=3, arrays=1, array_bytes=40_004)
    with hauler.connect(workspace=poc) as session:
        job = session.submit(job_dir)
        waiting = next(  # said each time who is there changes: a busy site may reconnect
            e
            for e in job.events(follow=True)
            if e["event"] == "sites.waiting" and len(e["connected"]) == 2
        )
        assert waiting["note"].startswith("waiting: 2 of 3 sites connected (site-1, site-2)"), (
            waiting
        )
        job.abort()
        with pytest.raises(JobError, match="aborted"):
            job.wait()
        assert job.record()["status"] == "aborted"
