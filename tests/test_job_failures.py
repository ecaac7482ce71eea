"""A job that cannot run on a site fails that job promptly, with the site's reason in its
events; the site process stays up for the next job."""

from __future__ import annotations

import re
import tomllib

import pytest
import tomli_w
from helpers import (
    edit_configs,
    federation,
    hauler,
    hello_job,
    ok,
    process_gone,
    read_jsonl,
    submitted_job_id,
)

pytestmark = pytest.mark.slow  # real processes, seconds each: `pytest -m 'not slow'` skips them

# The server gives up on a silent site after this; a prompt failure must not need it.
COMMUNICATION_TIMEOUT_S = 8

BROKEN = {
    "train_raises": (
        "train.py",
        '\n\ndef train(model, context):\n    raise RuntimeError("bug in the training code")\n',
    ),
    "import_raises": ("train.py", '\nraise RuntimeError("bug in the training code")\n'),
}


def short_timeout(workspace, site_settings: dict | None = None) -> None:
    edit_configs(workspace, "timeouts", {"communication_timeout": COMMUNICATION_TIMEOUT_S})
    if site_settings:
        edit_configs(workspace, None, site_settings, roles="sites")


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    """A one-site federation with default settings, shared by the tests that need no others."""
    workspace = tmp_path_factory.mktemp("failures") / "poc"
    with federation(workspace, sites=1, configure=short_timeout) as pids:
        yield workspace, pids


def run_failing_job(workspace, pids, job) -> tuple[str, list[dict], bool]:
    """Run `job`, which must fail; returns the submit output, the job's events, and whether
    site-1 was still alive afterwards."""
    result = hauler("submit", job, "--workspace", workspace, "--wait")
    assert result.returncode == 1 and "job.failed" in result.stdout, result.stdout + result.stderr
    job_dir = workspace / "server" / "jobs" / submitted_job_id(result.stdout)
    return result.stdout, read_jsonl(job_dir / "events.jsonl"), not process_gone(pids["site-1"])


def site_failures(events: list[dict]) -> list[str]:
    return [event["error"] for event in events if event["event"] == "site.failed"]


@pytest.mark.parametrize("module, code", BROKEN.values(), ids=BROKEN.keys())
def test_broken_job_code_fails_the_job_not_the_site(poc, tmp_path, module, code):
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    with open(job / module, "a") as source:
        source.write(code)
    _, events, site_alive = run_failing_job(*poc, job)
    assert any("bug in the training code" in error for error in site_failures(events)), (
        site_failures(events)
    )
    assert site_alive


def test_site_that_refuses_custom_code_fails_the_job_naming_the_digest_to_trust(tmp_path):
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    digest = ok(hauler("jobs", "digest", job)).stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    with federation(
        tmp_path / "poc",
        sites=1,
        configure=lambda w: short_timeout(w, {"allow_custom_code": False}),
    ) as pids:
        _, events, site_alive = run_failing_job(tmp_path / "poc", pids, job)
    failures = site_failures(events)
    assert any("refuses this job's code" in error and digest in error for error in failures), (
        failures
    )
    assert site_alive


def test_a_locked_down_site_runs_the_job_whose_code_it_trusts(tmp_path):
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    digest = ok(hauler("jobs", "digest", job)).stdout.strip()

    def configure(workspace):
        edit_configs(
            workspace, None, {"allow_custom_code": False, "trusted_code": [digest]}, roles="sites"
        )

    with federation(tmp_path / "poc", sites=1, configure=configure):
        ok(hauler("submit", job, "--workspace", tmp_path / "poc", "--wait"))
        (job / "train.py").write_text((job / "train.py").read_text() + "\n# changed after review\n")
        result = hauler("submit", job, "--workspace", tmp_path / "poc", "--wait")
        assert result.returncode == 1 and "refuses this job's code" in result.stdout, result.stdout


def test_broken_model_code_fails_the_submission_where_it_runs_and_reaches_no_server(poc, tmp_path):
    workspace, pids = poc
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    with open(job / "model.py", "a") as source:
        source.write('\n\ndef layout(config):\n    raise RuntimeError("bug in the model code")\n')
    before = set((workspace / "server" / "jobs").glob("*"))
    result = hauler("submit", job, "--workspace", workspace, "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "building the initial model with model.py failed: RuntimeError: bug in the model code"
        in result.stderr
    )
    assert set((workspace / "server" / "jobs").glob("*")) == before  # nothing was submitted
    assert not process_gone(pids["server"])


def test_the_server_runs_no_job_code_round_zero_is_built_where_the_job_is_submitted(poc, tmp_path):
    workspace, pids = poc
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    with open(job / "model.py", "a") as source:
        source.write(
            "\n\nimport os as _os, pathlib as _pathlib\n"
            "_pathlib.Path(__file__).with_name(f'imported-by-{_os.getpid()}').touch()\n"
        )
    result = ok(hauler("submit", job, "--workspace", workspace, "--wait"))
    app = workspace / "server" / "jobs" / submitted_job_id(result.stdout) / "app"
    assert app.is_dir() and not list(app.glob("imported-by-*"))  # the server imported nothing
    builders = [int(path.name.rsplit("-", 1)[1]) for path in job.glob("imported-by-*")]
    assert builders and pids["server"] not in builders


def test_a_server_that_allows_no_custom_code_refuses_to_build_round_zero(poc, tmp_path):
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    job_toml = job / "job.toml"
    job_toml.write_text(job_toml.read_text().replace("[model]\n", '[model]\nbuild = "server"\n'))
    result = hauler("submit", job, "--workspace", poc[0])
    assert (
        result.returncode == 1
        and "this server runs no job code (allow_custom_code = false" in result.stderr
    ), result.stdout + result.stderr


ATTACKS = """

import os as _os, socket as _socket


def _attacks(c):
    yield "read the server's key", lambda: open(c["key"]).read()
    yield "list another job's folder", lambda: _os.listdir(c["other_job"])
    yield (
        "connect to the server's port",
        lambda: _socket.create_connection(("127.0.0.1", c["port"]), 2).close() or 1,
    )


_layout = layout


def layout(config):
    for name, attack in _attacks(config):
        try:
            got = attack()
        except OSError:
            continue
        raise RuntimeError(f"{name} got through: {str(got)[:200]}")
    return _layout(config)
"""


def test_a_server_that_allows_custom_code_builds_round_zero_confined(tmp_path):
    """The job's model module runs on the server, and cannot read the server's key, list another
    job's folder or reach the server's port; a build that fails fails the job with its reason."""
    workspace = tmp_path / "poc"

    def configure(workspace):
        edit_configs(workspace, None, {"allow_custom_code": True}, roles="server")

    with federation(workspace, sites=1, configure=configure):
        other = submitted_job_id(
            ok(
                hauler(
                    "submit",
                    hello_job(
                        tmp_path / "other", rounds=1, min_clients=1, arrays=1, array_bytes=4000
                    ),
                    "--workspace",
                    workspace,
                )
            ).stdout
        )
        server = tomllib.loads((workspace / "server" / "server.toml").read_text())
        job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
        (job / "model.py").write_text((job / "model.py").read_text() + ATTACKS)
        config = tomllib.loads((job / "job.toml").read_text())
        config["model"].update(
            build="server",
            config={
                **config["model"]["config"],
                "key": str(workspace / "server" / server["tls"]["key"]),
                "other_job": str(workspace / "server" / "jobs" / other / "app"),
                "port": server["control_port"],
            },
        )
        (job / "job.toml").write_text(tomli_w.dumps(config))
        assert (workspace / "server" / "jobs" / other / "app").is_dir()  # there to be listed
        finished = ok(hauler("submit", job, "--workspace", workspace, "--wait"))
        assert "job.finished" in finished.stdout

        with open(job / "model.py", "a") as source:
            source.write(
                '\n\ndef fill(name, out, config):\n    raise RuntimeError("bug in fill")\n'
            )
        failed = hauler("submit", job, "--workspace", workspace, "--wait")
        assert failed.returncode == 1 and "building round 0 with model.py failed" in failed.stdout
        assert "RuntimeError: bug in fill" in failed.stdout  # shown to its submitter
