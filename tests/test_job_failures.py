"""A job that cannot run on a site fails that job promptly, with the site's reason in its
events; the site process stays up for the next job."""

from __future__ import annotations

import pytest
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

# The server gives up on a silent site after this; a prompt failure must not need it.
COMMUNICATION_TIMEOUT_S = 8

BROKEN = {
    "train_raises": ("train.py", '\n\ndef train(model, context):\n    raise RuntimeError("bug in the training code")\n'),
    "import_raises": ("train.py", '\nraise RuntimeError("bug in the training code")\n'),
}


def run_failing_job(tmp_path, job, *, site_settings: dict | None = None) -> tuple[str, list[dict], bool]:
    """Run `job` on a one-site federation; returns the submit output, the job's events, and
    whether site-1 was still alive afterwards."""

    def configure(workspace):
        edit_configs(workspace, "timeouts", {"communication_timeout": COMMUNICATION_TIMEOUT_S})
        if site_settings:
            edit_configs(workspace, None, site_settings, roles="sites")

    with federation(tmp_path / "poc", sites=1, configure=configure) as pids:
        result = hauler("submit", job, "--workspace", tmp_path / "poc", "--wait")
        assert result.returncode == 1 and "job.failed" in result.stdout, result.stdout + result.stderr
        job_dir = tmp_path / "poc" / "server" / "jobs" / submitted_job_id(result.stdout)
        return result.stdout, read_jsonl(job_dir / "events.jsonl"), not process_gone(pids["site-1"])


def site_failures(events: list[dict]) -> list[str]:
    return [event["error"] for event in events if event["event"] == "site.failed"]


@pytest.mark.parametrize("module, code", BROKEN.values(), ids=BROKEN.keys())
def test_broken_job_code_fails_the_job_not_the_site(tmp_path, module, code):
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    with open(job / module, "a") as source:
        source.write(code)
    _, events, site_alive = run_failing_job(tmp_path, job)
    assert any("bug in the training code" in error for error in site_failures(events)), site_failures(events)
    assert site_alive


def test_site_that_refuses_custom_code_fails_the_job_with_its_reason(tmp_path):
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    _, events, site_alive = run_failing_job(tmp_path, job, site_settings={"allow_custom_code": False})
    assert any("refuses jobs that carry custom code" in error for error in site_failures(events)), site_failures(events)
    assert site_alive


def test_broken_model_code_fails_the_job_and_the_server_lives(tmp_path):
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    with open(job / "model.py", "a") as source:
        source.write('\n\ndef layout(config):\n    raise RuntimeError("bug in the model code")\n')
    with federation(tmp_path / "poc", sites=1) as pids:
        result = hauler("submit", job, "--workspace", tmp_path / "poc", "--wait")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "building the initial model with model.py failed: RuntimeError: bug in the model code" in result.stdout
        assert not process_gone(pids["server"])


def test_the_server_builds_round_zero_in_a_child_process(tmp_path):
    """The job's model code never runs in the server (its imports and memory stay out of it)."""
    job = hello_job(tmp_path, rounds=1, min_clients=1, arrays=1, array_bytes=4000)
    with open(job / "model.py", "a") as source:
        source.write("\n\nimport os as _os, pathlib as _pathlib\n"
                     "_pathlib.Path(__file__).with_name(f'imported-by-{_os.getpid()}').touch()\n")
    with federation(tmp_path / "poc", sites=1) as pids:
        result = ok(hauler("submit", job, "--workspace", tmp_path / "poc", "--wait"))
        app = tmp_path / "poc" / "server" / "jobs" / submitted_job_id(result.stdout) / "app"
        builders = [int(path.name.rsplit("-", 1)[1]) for path in app.glob("imported-by-*")]
        assert builders and pids["server"] not in builders
