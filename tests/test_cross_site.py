"""Cross-site evaluation on real processes: a server and three sites, one of which keeps its
local model to itself and one of which dies mid-evaluation; the rest of the matrix is there,
the dead site's cells marked missing, and `hauler jobs report` prints and draws it."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import tomli_w
from helpers import (
    assert_matrix,
    cross_site_job,
    edit_configs,
    expected_matrix,
    federation,
    hauler,
    ok,
    read_jsonl,
    submitted_job_id,
)
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

DIES = """

import os

_measure = evaluate


def evaluate(model, context):
    if (context.site, context.model_name) == ("site-3", "site-2"):
        os._exit(3)  # the whole site process, in the middle of cross-site evaluation
    return _measure(model, context)
"""


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    """Three sites; site-1 keeps its local model; a site that goes is given up after 3 s."""
    workspace = tmp_path_factory.mktemp("cross_site") / "poc"

    def configure(workspace):
        edit_configs(workspace, "timeouts", {"communication_timeout": 3.0})
        config = workspace / "site-1" / "site.toml"
        config.write_text(
            tomli_w.dumps({**tomllib.loads(config.read_text()), "share_local_model": False})
        )

    with federation(workspace, sites=3, configure=configure):
        yield workspace


def test_a_site_that_dies_leaves_the_rest_of_the_matrix_and_its_cells_missing(poc, tmp_path):
    job = cross_site_job(tmp_path)
    with open(job / "train.py", "a") as module:
        module.write(DIES)
    job_id = submitted_job_id(ok(hauler("submit", job, "--workspace", poc, "--wait")).stdout)
    server_job = poc / "server" / "jobs" / job_id
    records = read_jsonl(server_job / "metrics.jsonl")
    [summary] = [r for r in records if r["kind"] == "cross_site"]
    assert (summary["models"], summary["kept"]) == (["global", "site-2", "site-3"], ["site-1"])
    expected = expected_matrix(3, kept=["site-1"])
    for rows in expected.values():
        rows[2][1] = None  # site-3 died evaluating site-2's model
    assert_matrix(summary["matrix"], expected)
    [missing] = [r for r in records if r["kind"] == "evaluation" and "missing" in r]
    assert (missing["site"], missing["model"]) == ("site-3", "site-2")
    assert "site-3" in missing["missing"], missing

    stored = load_file(str(server_job / "local" / "site-3.safetensors"))  # handed over, then died
    assert stored["array_0"][0] == np.float32(0.375)
    assert not (server_job / "local" / "site-1.safetensors").exists()  # kept on its site

    shown = ok(hauler("jobs", "report", job_id, "-o", tmp_path / "report", "--workspace", poc))
    assert "cross-site evaluation: first" in shown.stdout and "missing" in shown.stdout
    assert (tmp_path / "report" / "cross_site.png").stat().st_size > 0
