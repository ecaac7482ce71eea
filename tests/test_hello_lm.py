"""examples/hello-lm under the simulator, shrunk to seconds: a byte-level GPT whose lm_head is
tied to its token embedding, trained DiLoCo-style (local AdamW steps, a Nesterov server)."""

from __future__ import annotations

import math
import shutil
import tomllib
from pathlib import Path

import pytest
import tomli_w
from helpers import REPO

import hauler
from hauler.model import ModelFile

ROUNDS, SITES = 2, 2
TINY_MODEL = {"d_model": 32, "layers": 1, "heads": 2, "context": 32}
TINY_TRAINING = {"local_steps": 6, "batch_size": 8, "site_mib": 0.25, "val_windows": 16}


def tiny_job(folder: Path) -> Path:
    """A copy of hello-lm with a model and a run small enough for a test."""
    job_dir = folder / "hello-lm"
    shutil.copytree(
        REPO / "examples" / "hello-lm", job_dir, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = tomllib.loads((job_dir / "job.toml").read_text())
    config["workflow"].update(num_rounds=ROUNDS, min_clients=SITES)
    config["model"]["config"].update(TINY_MODEL)
    config["executor"]["config"].update(TINY_TRAINING)
    (job_dir / "job.toml").write_text(tomli_w.dumps(config))
    return job_dir


@pytest.mark.slow
def test_hello_lm_learns_and_stores_its_tied_lm_head_once(tmp_path):
    job = hauler.simulate(tiny_job(tmp_path), sites=SITES, workers=1, workspace=tmp_path / "sim")
    assert job.record()["status"] == "finished" and job.record()["rounds_done"] == ROUNDS

    last = job.folder.folder / "global" / f"round-{ROUNDS}.safetensors"
    with ModelFile.open(last) as model:
        assert model.manifest.ties == (("lm_head.weight", "wte.weight"),)
        assert "lm_head.weight" not in model.manifest.names  # stored once, under wte.weight

    reported = {(r["round"], r["site"]): r["metrics"] for r in job.metrics() if r["kind"] == "site"}
    sites = [f"site-{k}" for k in range(1, SITES + 1)]
    assert set(reported) == {(round, site) for round in range(ROUNDS) for site in sites}
    assert all(
        math.isfinite(m["val_loss"]) and math.isfinite(m["train_loss"]) for m in reported.values()
    )
    val_loss = {round: reported[round, "site-1"]["val_loss"] for round in range(ROUNDS)}
    assert val_loss[ROUNDS - 1] < val_loss[0] - 0.1, val_loss  # the global model learned
